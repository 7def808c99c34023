"""GenEval-style prompts for the scene world, with GenEval's metadata lines.

Each line: {"tag", "prompt", "include": [{"class", "count", "color"?, "position"?: [relation, index]}],
"exclude"?: [...]}, tags single_object, two_object, counting, colors, position, color_attr, as GenEval's
`evaluation_metadata.jsonl`. `geneval_set()` is every prompt the templates make (the held-out evaluation
set); `training_set()` captions random scenes with phrases the templates never make (compound groups, or a
template with colours the template does not have), so the evaluation prompts are held out by construction.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np

from ddspo_jax.files import write_text_atomic
from ddspo_jax.world.scenes import COLORS, SHAPES

NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _plural(shape: str) -> str:
    return shape + "s"


def geneval_set() -> list[dict]:
    """Every prompt of the six templates, in a fixed order."""
    out = []
    for s in SHAPES:
        out.append({"tag": "single_object", "prompt": f"a photo of {_a(s)}", "include": [{"class": s, "count": 1}]})
    for s1, s2 in itertools.combinations(SHAPES, 2):
        out.append({"tag": "two_object", "prompt": f"a photo of {_a(s1)} and {_a(s2)}",
                    "include": [{"class": s1, "count": 1}, {"class": s2, "count": 1}]})
    for s, n in itertools.product(SHAPES, (2, 3, 4)):
        out.append({"tag": "counting", "prompt": f"a photo of {NUMBERS[n]} {_plural(s)}",
                    "include": [{"class": s, "count": n}], "exclude": [{"class": s, "count": n + 1}]})
    for s, c in itertools.product(SHAPES, COLORS):
        out.append({"tag": "colors", "prompt": f"a photo of {_a(c)} {s}",
                    "include": [{"class": s, "count": 1, "color": c}]})
    for (s1, s2), rel in itertools.product(itertools.permutations(SHAPES, 2), RELATIONS):
        out.append({"tag": "position", "prompt": f"a photo of {_a(s2)} {rel} {_a(s1)}",
                    "include": [{"class": s1, "count": 1}, {"class": s2, "count": 1, "position": [rel, 0]}]})
    for (s1, s2), (c1, c2) in itertools.product(itertools.permutations(SHAPES, 2), itertools.permutations(COLORS, 2)):
        out.append({"tag": "color_attr", "prompt": f"a photo of {_a(c1)} {s1} and {_a(c2)} {s2}",
                    "include": [{"class": s1, "count": 1, "color": c1}, {"class": s2, "count": 1, "color": c2}]})
    return out


def _phrase(n: int, color: str | None, shape: str) -> str:
    words = ([color] if color else []) + [shape if n == 1 else _plural(shape)]
    return (_a(" ".join(words)) if n == 1 else f"{NUMBERS[n]} {' '.join(words)}")


def _colored(color: str | None, shape: str) -> str:
    return _a(f"{color} {shape}" if color else shape)


FORMS = ("compound", "position", "counting", "partial", "plain")
DEFAULT_FORMS = FORMS  # the shipped prompt file's and world model's (docs/world/world_model.md: why "plain")


def training_set(n: int, seed: int = 0, forms: tuple[str, ...] = DEFAULT_FORMS) -> list[dict]:
    """`n` distinct training captions, none an evaluation prompt, in these forms (equally likely) that together
    use every word of the templates, so the evaluation set tests recombination, not new words:
      compound  "a photo of two red circles and a blue square"  (two groups, counts 1-3, both coloured)
      position  "a photo of a red square left of a triangle"    (the position template with 1-2 colours)
      counting  "a photo of three red circles"                  (the counting template with a colour)
      partial   "a photo of a red circle and a square"          (two objects, one coloured)
      plain     "a photo of two circles and a square"           (two groups, counts 1-3, not both 1, no colour)
    The uncoloured and fully coloured variants of position, counting and partial ARE template prompts, hence
    held out. Without `plain` no caption is colourless, so every uncoloured template (single_object,
    two_object, counting, position) asks for a "no colour word" never seen: the four-form model drew one
    object for most of them (counting 0.062, two_object 0.125); trained from scratch with all five forms it
    scores counting 0.562, two_object 0.583 and overall 0.399 vs 0.268 on the held-out set, at a cost in colour
    binding (color_attr 0.070 -> 0.019; docs/world/world_model.md)."""
    unknown = set(forms) - set(FORMS)
    if unknown or not forms:
        raise ValueError(f"caption forms {sorted(unknown) or forms} are not among {FORMS}")
    rng = np.random.default_rng(seed)
    held_out = {m["prompt"] for m in geneval_set()}
    out, seen = [], set()
    while len(out) < n:
        form = FORMS.index(forms[int(rng.integers(len(forms)))])
        s1, s2 = (str(x) for x in rng.choice(SHAPES, 2, replace=False))
        c1, c2 = (str(x) for x in rng.choice(COLORS, 2))
        if form == 0:
            n1, n2 = (int(x) for x in rng.integers(1, 4, 2))
            if n1 == n2 == 1:
                n1 = 2
            m = {"tag": "compound", "prompt": f"a photo of {_phrase(n1, c1, s1)} and {_phrase(n2, c2, s2)}",
                 "include": [{"class": s1, "count": n1, "color": c1}, {"class": s2, "count": n2, "color": c2}],
                 "exclude": [{"class": s1, "count": n1 + 1}, {"class": s2, "count": n2 + 1}]}
        elif form == 1:
            rel = str(RELATIONS[rng.integers(len(RELATIONS))])
            keep = int(rng.integers(3))  # 0: both coloured, 1: only the first named, 2: only the anchor
            k2, k1 = (c2 if keep != 2 else None), (c1 if keep != 1 else None)
            m = {"tag": "position", "prompt": f"a photo of {_colored(k2, s2)} {rel} {_colored(k1, s1)}",
                 "include": [{"class": s1, "count": 1, **({"color": k1} if k1 else {})},
                             {"class": s2, "count": 1, **({"color": k2} if k2 else {}), "position": [rel, 0]}]}
        elif form == 2:
            k = int(rng.integers(2, 5))
            m = {"tag": "counting", "prompt": f"a photo of {NUMBERS[k]} {c1} {_plural(s1)}",
                 "include": [{"class": s1, "count": k, "color": c1}], "exclude": [{"class": s1, "count": k + 1}]}
        elif form == 3:
            m = {"tag": "partial", "prompt": f"a photo of {_colored(c1, s1)} and {_colored(None, s2)}",
                 "include": [{"class": s1, "count": 1, "color": c1}, {"class": s2, "count": 1}]}
        else:
            n1, n2 = (int(x) for x in rng.integers(1, 4, 2))
            if n1 == n2 == 1:
                n1 = 2
            m = {"tag": "plain", "prompt": f"a photo of {_phrase(n1, None, s1)} and {_phrase(n2, None, s2)}",
                 "include": [{"class": s1, "count": n1}, {"class": s2, "count": n2}],
                 "exclude": [{"class": s1, "count": n1 + 1}, {"class": s2, "count": n2 + 1}]}
        if m["prompt"] in seen or m["prompt"] in held_out:
            continue
        seen.add(m["prompt"])
        out.append(m)
    return out


def split_dev(pool: list[dict], n_dev: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, dev) of a pool of training captions: dev takes n_dev captions, the same number of each form (a
    form with fewer gives what it has), drawn at random; train keeps the rest in the pool's order. The dev split
    is where every choice of the DDSPO study is made (benchmarks/world_study.py), so that world_eval.jsonl is
    scored only for the final tables; its forms are balanced so that no form's few prompts dominate it."""
    rng = np.random.default_rng([seed, 1])
    by_form: dict[str, list[int]] = {}
    for i, m in enumerate(pool):
        by_form.setdefault(m["tag"], []).append(i)
    per = n_dev // max(len(by_form), 1)
    dev_idx = sorted(int(i) for ix in by_form.values() for i in rng.permutation(ix)[:min(per, len(ix) // 2)])
    chosen = set(dev_idx)
    return [m for i, m in enumerate(pool) if i not in chosen], [pool[i] for i in dev_idx]


def word_groups() -> dict[str, list[str]]:
    """The world's vocabulary as word_swap groups (data.word_groups): a swap within a group keeps a caption
    grammatical and in the world's caption space ("left" <-> "right" and "above" <-> "below" apart, so a
    relation stays a relation phrase)."""
    return {"color": list(COLORS), "shape": list(SHAPES), "shapes": [_plural(s) for s in SHAPES],
            "number": [NUMBERS[n] for n in (2, 3, 4)], "side": ["left", "right"], "vertical": ["above", "below"]}


def write_jsonl(lines: list[dict], path: str | os.PathLike) -> None:
    write_text_atomic(Path(path), "".join(json.dumps(m) + "\n" for m in lines))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
