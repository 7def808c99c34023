"""Judges an image against a GenEval metadata line from its pixels alone, as GenEval does with its detector.

Detection: pixels far from the background colour are foreground (noise of the generated images' strength
stays far below the threshold); its connected components are the objects (scenes never let objects touch),
except tiny ones (noise) and ones wider or taller than half the image (a frame the model sometimes draws; no
object of this world is that big), each with the palette colour nearest to the median of its inner pixels.
Shape, from the object's soft coverage so that blur does not decide it: a hole makes a ring, a centroid below
the middle of its extent a triangle, filled diagonal corners a square, else a circle. Position: centroids,
GenEval's rule (the offset along the relation's axis beats a margin). A line is correct iff every include
holds (at least `count` objects of the class, with the colour if given, on the given side of the include it
names) and every exclude holds (fewer than `count` objects of the class) — GenEval's `evaluate_image`.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path

import numpy as np
from scipy import ndimage

from ddspo_jax.errors import DataError, MissingFileError
from ddspo_jax.files import iter_jsonl
from ddspo_jax.scoring.registry import register
from ddspo_jax.world.scenes import BACKGROUND, PALETTE

FG_DISTANCE = 0.4  # RGB distance from the background that makes a pixel foreground (palette: >= 0.8)
MIN_AREA_FRAC = 0.004  # components smaller than this fraction of the image are noise
MAX_EXTENT_FRAC = 0.5  # wider or taller than this fraction of the image: not an object (scenes.size_range: <= 0.28)
POSITION_MARGIN = 0.05  # of the image size


@dataclasses.dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    x: float
    y: float
    area: int


def _shape(alpha: np.ndarray, comp: np.ndarray) -> str:
    """Shape of one object from its soft coverage `alpha` (0 background .. 1 inside, blur-robust) and its
    binary mask `comp` (same window): a hole -> ring; the area centroid 1/6 of the height below the middle of
    its extent -> (upright) triangle; coverage at the diagonals 0.8 r out -> square corners, else circle."""
    if ndimage.binary_fill_holes(comp).sum() > 1.2 * comp.sum():
        return "ring"
    ys, xs = np.mgrid[:alpha.shape[0], :alpha.shape[1]]
    m = alpha.sum()
    cx, cy = (alpha * xs).sum() / m, (alpha * ys).sum() / m
    rows = np.nonzero(alpha.max(axis=1) > 0.3)[0]
    top, bottom = rows.min(), rows.max() + 1
    if (cy + 0.5 - (top + bottom) / 2) / (bottom - top) > 0.06:
        return "triangle"
    r = alpha[int(round(cy - 0.5)) if cy >= 0.5 else 0].sum() / 2  # half the width through the centroid
    d = 0.8 * r
    pts = np.array([[cy + sy * d, cx + sx * d] for sy in (-1, 1) for sx in (-1, 1)]).T
    corners = ndimage.map_coordinates(alpha, pts, order=1, mode="constant")
    return "square" if corners.mean() > 0.45 else "circle"


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in an [H, W, 3] image in [0, 1]."""
    img = np.asarray(image, np.float32)
    h, w = img.shape[:2]
    bg = np.asarray(BACKGROUND, np.float32)
    dist = np.linalg.norm(img - bg, axis=-1)
    fg = dist > FG_DISTANCE
    names = list(PALETTE)
    pal = np.asarray([PALETTE[c] for c in names], np.float32)
    labels, _ = ndimage.label(fg)  # objects never touch: one component each
    out = []
    min_area = max(3, int(MIN_AREA_FRAC * h * w))
    for k, sl in enumerate(ndimage.find_objects(labels), 1):
        comp = labels[sl] == k
        area = int(comp.sum())
        if area < min_area:
            continue
        if max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) > MAX_EXTENT_FRAC * max(h, w):
            continue  # e.g. a frame drawn around the canvas (the world model makes a few): no shape of this world
        d = dist[sl][comp]  # the colour of its most saturated pixels (edges and thin parts blend with the ground)
        p = np.median(img[sl][comp][d >= np.quantile(d, 0.6)], axis=0) - bg
        # blur mixes an object's colour with the ground: p = a (c - bg); the palette colour whose line fits best
        dirs = pal - bg
        a = np.clip((dirs @ p) / (dirs * dirs).sum(-1), 0, None)
        ci = int(np.argmin(((p - a[:, None] * dirs) ** 2).sum(-1)))
        # a window 2 px larger, other objects masked out: the soft coverage of this object alone
        y0, y1 = max(sl[0].start - 2, 0), min(sl[0].stop + 2, h)
        x0, x1 = max(sl[1].start - 2, 0), min(sl[1].stop + 2, w)
        own = ndimage.binary_dilation(labels[y0:y1, x0:x1] == k, iterations=2)
        alpha = np.clip(dist[y0:y1, x0:x1] / np.linalg.norm(pal[ci] - bg), 0, 1) * own
        shape = _shape(alpha, labels[y0:y1, x0:x1] == k)
        m = alpha.sum()
        ys, xs = np.mgrid[y0:y1, x0:x1]
        out.append(Detection(shape, names[ci], float((alpha * xs).sum() / m + 0.5), float((alpha * ys).sum() / m + 0.5),
                             area))
    return out


def _holds(rel: str, a: Detection, b: Detection, size: int) -> bool:
    """a `rel` b (a left of b, ...) by centroids."""
    m = POSITION_MARGIN * size
    dx, dy = a.x - b.x, a.y - b.y
    return {"left of": dx < -m, "right of": dx > m, "above": dy < -m, "below": dy > m}[rel]


def judge(image: np.ndarray, meta: dict) -> tuple[bool, str]:
    """(correct, why) for one image and one metadata line."""
    dets = detect(image)
    size = max(np.asarray(image).shape[:2])
    found: list[list[Detection]] = []
    for i, q in enumerate(meta["include"]):
        cands = [d for d in dets if d.shape == q["class"]]
        if len(cands) < q["count"]:
            return False, f"{q['count']} {q['class']} wanted, {len(cands)} found"
        if "color" in q:
            cands = [d for d in cands if d.color == q["color"]]
            if len(cands) < q["count"]:
                return False, f"{q['count']} {q['color']} {q['class']} wanted, {len(cands)} of that colour"
        if "position" in q:
            rel, j = q["position"]
            anchors = found[int(j)]
            cands = [d for d in cands if any(_holds(rel, d, a, size) for a in anchors)]
            if len(cands) < q["count"]:
                return False, f"{q['class']} not {rel} {meta['include'][int(j)]['class']}"
        found.append(cands)
    for q in meta.get("exclude", []):
        n = sum(d.shape == q["class"] for d in dets)
        if n >= q["count"]:
            return False, f"{n} {q['class']} found, fewer than {q['count']} wanted"
    return True, "correct"


# ------------------------------------------------------------------------------------------ the scorer
# `shapes`: GenEval's verdict on the scene world, from the pixels. The prompt file must be in GenEval's metadata
# format (JSONL lines with tag / prompt / include / exclude, e.g. ddspo_jax/configs/prompts/world_eval.jsonl);
# each image scores 1 when its metadata line holds, else 0, and `evaluate` reports per-tag accuracies with Wilson
# intervals and the overall as GenEval does (mean of tags). Registered as a plugin (ddspo_jax.scoring.PLUGINS).


@register("shapes")
class Shapes:
    name, unit, binary = "shapes", "GenEval accuracy", True

    def __init__(self, path=None, prompts_path: str | None = None, **_):
        src = Path(path or prompts_path or "")
        if not src.is_file():
            raise MissingFileError(f"scorer 'shapes' needs the GenEval-format metadata of the prompts (the "
                                   f"--prompts .jsonl, or --scorer-path); {src} is not a file")
        lines = iter_jsonl(src, ("prompt", "include"), what="a GenEval metadata line")
        self.meta = {m["prompt"]: m for _, m in lines}

    def _line(self, prompt):
        if prompt not in self.meta:
            raise DataError(f"prompt {prompt!r} has no metadata line in the shapes scorer's file")
        return self.meta[prompt]

    def tag(self, prompt: str) -> str:
        return self._line(prompt).get("tag", "all")

    def score(self, images, prompts):
        out = []
        for img, p in zip(np.asarray(images), prompts):
            out.append(1.0 if judge(img, self._line(p))[0] else 0.0)
        return np.asarray(out)
