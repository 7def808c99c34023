"""What `ddspo_jax.evaluate` measures images with: a small registry of scorers.

A scorer is made once from a local folder (`make_scorer(name, path)`) and then scores batches of generated
images [N, H, W, 3] in [0, 1] against their prompts, on device. `score` returns one number per image
(higher is better); a scorer with a pairwise definition (PickScore's preference probability) also has
`prefer(images_a, images_b, prompts)` -> P(a preferred over b); a scorer of verdicts (`binary`, 0 / 1 per
image) with a `tag(prompt)` gets GenEval's per-tag table. New scorers register with `@register(name)`.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import numpy as np

from ddspo_jax.errors import ConfigError


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


def make_scorer(name: str, path: str | None = None, **options) -> Scorer:
    """The registered scorer `name`, loaded from `path` (a local model folder; never downloaded)."""
    from ddspo_jax.scoring import clip, shapes  # noqa: F401  (registers clip_score, pickscore, aesthetic, shapes)

    if name not in SCORERS:
        raise ConfigError(f"unknown scorer {name!r}; known: {', '.join(sorted(SCORERS))}")
    return SCORERS[name](path, **options)


def known() -> list[str]:
    from ddspo_jax.scoring import clip, shapes  # noqa: F401

    return sorted(SCORERS)
