"""`shapes`: GenEval's verdict on the scene world, from the pixels (ddspo_jax.world.judge).

The prompt file must be in GenEval's metadata format (JSONL lines with tag / prompt / include / exclude, e.g.
ddspo_jax/configs/prompts/world_eval.jsonl); each image scores 1 when its metadata line holds, else 0, and
`evaluate` reports per-tag accuracies with Wilson intervals and the overall as GenEval does (mean of tags).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ddspo_jax.errors import DataError, MissingFileError
from ddspo_jax.scoring import register


@register("shapes")
class Shapes:
    name, unit, binary = "shapes", "GenEval accuracy", True

    def __init__(self, path=None, prompts_path: str | None = None, **_):
        src = Path(path or prompts_path or "")
        if not src.is_file():
            raise MissingFileError(f"scorer 'shapes' needs the GenEval-format metadata of the prompts (the "
                                   f"--prompts .jsonl, or --scorer-path); {src} is not a file")
        self.meta = {}
        for lineno, line in enumerate(src.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                m = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{src}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(m, dict) or "include" not in m or "prompt" not in m:
                raise DataError(f"{src}:{lineno}: not a GenEval metadata line (needs prompt and include)")
            self.meta[m["prompt"]] = m

    def _line(self, prompt):
        if prompt not in self.meta:
            raise DataError(f"prompt {prompt!r} has no metadata line in the shapes scorer's file")
        return self.meta[prompt]

    def tag(self, prompt: str) -> str:
        return self._line(prompt).get("tag", "all")

    def score(self, images, prompts):
        from ddspo_jax.world.judge import judge

        out = []
        for img, p in zip(np.asarray(images), prompts):
            out.append(1.0 if judge(img, self._line(p))[0] else 0.0)
        return np.asarray(out)
