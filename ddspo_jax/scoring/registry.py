"""The scorer registry: scorers register a factory under a name with `@register(name)`."""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np


class Scorer(Protocol):
    name: str
    unit: str  # how summaries label the number ("CLIPScore", "probability", ...)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray: ...


SCORERS: dict[str, Callable[..., Scorer]] = {}


def register(name: str):
    def deco(factory):
        SCORERS[name] = factory
        return factory
    return deco
