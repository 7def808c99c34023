"""What `ddspo_jax.evaluate` measures images with: a small registry of scorers.

A scorer is made once from a local folder (`make_scorer(name, path)`) and then scores batches of generated
images [N, H, W, 3] in [0, 1] against their prompts, on device. `score` returns one number per image
(higher is better); a scorer with a pairwise definition (PickScore's preference probability) also has
`prefer(images_a, images_b, prompts)` -> P(a preferred over b); a scorer of verdicts (`binary`, 0 / 1 per
image) with a `tag(prompt)` gets GenEval's per-tag table. New scorers register with `@register(name)` in a
module listed in PLUGINS.
"""

from __future__ import annotations

import importlib

from ddspo_jax.errors import ConfigError
from ddspo_jax.scoring.registry import register, Scorer, SCORERS

__all__ = ["Scorer", "SCORERS", "register", "make_scorer", "known", "PLUGINS"]

# The modules that register scorers, imported by name on first use: CLIP-family models here, the scene
# world's pixel judge in the world (a plugin, so this layer imports nothing of the world).
PLUGINS = ("ddspo_jax.scoring.clip", "ddspo_jax.world.judge")


def _load_plugins() -> None:
    for name in PLUGINS:
        importlib.import_module(name)



def make_scorer(name: str, path: str | None = None, **options) -> Scorer:
    """The registered scorer `name`, loaded from `path` (a local model folder; never downloaded)."""
    _load_plugins()

    if name not in SCORERS:
        raise ConfigError(f"unknown scorer {name!r}; known: {', '.join(sorted(SCORERS))}")
    return SCORERS[name](path, **options)


def known() -> list[str]:
    _load_plugins()

    return sorted(SCORERS)
