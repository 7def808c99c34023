"""Procedural compositional scenes in GenEval's spirit: shapes of a few colours, counted and placed.

A scene is a list of objects (shape, colour, centre, size) on a flat dark background, rendered with numpy at
4x supersampling and box-filtered down (anti-aliased edges). Shapes are axis-aligned (square, upright
triangle, circle, ring) so that the judge can tell them apart from the pixels: a ring encloses a hole, the
others by how much of their bounding box they fill (square ~1, circle ~pi/4, triangle ~1/2). Objects never touch, so each is one connected blob.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SHAPES = ("circle", "square", "triangle", "ring")
RING_HOLE = 0.55  # inner radius / outer radius
PALETTE = {  # saturated, far apart in RGB and in hue
    "red": (0.90, 0.12, 0.12),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.88, 0.15),
    "purple": (0.70, 0.20, 0.85),
    "orange": (0.95, 0.55, 0.10),
}
COLORS = tuple(PALETTE)
BACKGROUND = (0.12, 0.12, 0.12)
SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    x: float  # centre, pixels (0 = left edge)
    y: float  # centre, pixels (0 = top edge)
    r: float  # half the side / radius / half the triangle's base, pixels


def _mask(o: Obj, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Coverage of `o` at supersampled pixel centres (xx, yy) (booleans)."""
    dx, dy = xx - o.x, yy - o.y
    if o.shape == "circle":
        return dx * dx + dy * dy <= o.r * o.r
    if o.shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= o.r * o.r) & (d2 >= (RING_HOLE * o.r) ** 2)
    if o.shape == "square":
        return (np.abs(dx) <= o.r) & (np.abs(dy) <= o.r)
    if o.shape == "triangle":  # upright isosceles: apex at the top, base at the bottom, height 2r
        t = (dy + o.r) / (2 * o.r)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * o.r)
    raise ValueError(f"unknown shape {o.shape!r}")


def render(objects, resolution: int = 64) -> np.ndarray:
    """Objects -> [R, R, 3] float32 image in [0, 1], anti-aliased. Each object is rasterised inside its
    bounding box only (every shape lies within centre +- r), ~10x faster than the whole canvas."""
    s = SUPERSAMPLE
    img = np.empty((resolution * s, resolution * s, 3), np.float32)
    img[:] = BACKGROUND
    for o in objects:
        x0, x1 = max(int(np.floor(o.x - o.r)) - 1, 0), min(int(np.ceil(o.x + o.r)) + 1, resolution)
        y0, y1 = max(int(np.floor(o.y - o.r)) - 1, 0), min(int(np.ceil(o.y + o.r)) + 1, resolution)
        if x0 >= x1 or y0 >= y1:
            continue
        xx, yy = np.meshgrid((np.arange(x0 * s, x1 * s) + 0.5) / s, (np.arange(y0 * s, y1 * s) + 0.5) / s)
        img[y0 * s:y1 * s, x0 * s:x1 * s][_mask(o, xx, yy)] = PALETTE[o.color]
    return img.reshape(resolution, s, resolution, s, 3).mean(axis=(1, 3))


def _place(rng, resolution: int, placed: list, r: float, region=None, tries: int = 400):
    """A centre for an object of size r inside `region` (x0, x1, y0, y1 in pixels) not touching `placed`."""
    margin = r + 1.5
    x0, x1, y0, y1 = region or (margin, resolution - margin, margin, resolution - margin)
    x0, x1, y0, y1 = max(x0, margin), min(x1, resolution - margin), max(y0, margin), min(y1, resolution - margin)
    if x0 > x1 or y0 > y1:
        return None
    for _ in range(tries):
        x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
        # circumscribed circles (radius r*sqrt(2) for squares) apart by a 3 px gap
        if all(np.hypot(x - p.x, y - p.y) > 1.42 * (r + p.r) + 3.0 for p in placed):
            return x, y
    return None


def size_range(resolution: int, count: int = 1) -> tuple[float, float]:
    """Object half-size range in pixels: smaller when many objects share the canvas."""
    hi = resolution * (0.14 if count <= 2 else 0.11)
    return resolution * 0.08, hi


def scene_for(meta: dict, rng: np.random.Generator, resolution: int = 64, distractors: bool = False):
    """A random scene that satisfies a GenEval metadata line (its includes and excludes), or None when the
    sampler fails to fit it (callers retry with another draw).

    Objects named without a colour take a random one; `position: [relation, i]` puts the object on that side
    of include i's object with a clear margin; `distractors` adds objects of classes nobody mentions."""
    inc = meta["include"]
    total = sum(int(q["count"]) for q in inc)
    lo, hi = size_range(resolution, total)
    placed: list[Obj] = []
    anchors: list[Obj] = []
    for q in inc:
        first = None
        for _ in range(int(q["count"])):
            r = rng.uniform(lo, hi)
            region = None
            if "position" in q:
                rel, idx = q["position"]
                a = anchors[int(idx)]
                gap = 0.15 * resolution + r + a.r
                region = {"left of": (0, a.x - gap, 0, resolution), "right of": (a.x + gap, resolution, 0, resolution),
                          "above": (0, resolution, 0, a.y - gap), "below": (0, resolution, a.y + gap, resolution)}[rel]
            xy = _place(rng, resolution, placed, r, region)
            if xy is None:
                return None
            o = Obj(q["class"], q.get("color") or COLORS[rng.integers(len(COLORS))], xy[0], xy[1], r)
            placed.append(o)
            first = first or o
        anchors.append(first)
    if distractors:
        named = {q["class"] for q in inc} | {q["class"] for q in meta.get("exclude", [])}
        free = [s for s in SHAPES if s not in named]
        for _ in range(rng.integers(0, 2) if free else 0):
            r = rng.uniform(lo, hi)
            xy = _place(rng, resolution, placed, r)
            if xy is not None:
                placed.append(Obj(free[rng.integers(len(free))], COLORS[rng.integers(len(COLORS))], *xy, r))
    return placed


FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
MISMATCHES = ("omit", "recolour", "swap_colours", "flip")


def mismatch(meta: dict, rng: np.random.Generator, kinds: tuple[str, ...] = MISMATCHES) -> dict:
    """A copy of `meta` whose scene differs from its caption in one respect, as a web image differs from its
    alt-text and as text-to-image models fail: an object left out (one fewer of a counted group, or the last
    group dropped), a colour changed, two groups' colours exchanged (attribute leakage), or a relation
    mirrored. The kind is drawn uniformly among those of `kinds` the caption allows; a caption that allows none
    (one uncoloured object) comes back unchanged. `prompt` is kept: the caption still asks for the whole scene."""
    inc = [dict(q) for q in meta["include"]]
    possible = []
    if any(int(q["count"]) > 1 for q in inc) or len(inc) > 1:
        possible.append("omit")
    if any(q.get("color") for q in inc):
        possible.append("recolour")
    if len({q.get("color") for q in inc if q.get("color")}) > 1:
        possible.append("swap_colours")
    if any("position" in q for q in inc):
        possible.append("flip")
    allowed = [k for k in possible if k in kinds]
    if not allowed:
        return meta
    kind = allowed[int(rng.integers(len(allowed)))]
    if kind == "omit":
        counted = [i for i, q in enumerate(inc) if int(q["count"]) > 1]
        if counted and (len(inc) == 1 or rng.random() < 0.5):
            q = inc[counted[int(rng.integers(len(counted)))]]
            q["count"] = int(q["count"]) - 1
        else:  # the last group: nothing refers to it (a position names an earlier group as its anchor)
            inc = inc[:-1]
    elif kind == "recolour":
        coloured = [q for q in inc if q.get("color")]
        q = coloured[int(rng.integers(len(coloured)))]
        others = [c for c in COLORS if c != q["color"]]
        q["color"] = others[int(rng.integers(len(others)))]
    elif kind == "swap_colours":
        a, b = [q for q in inc if q.get("color")][:2]
        a["color"], b["color"] = b["color"], a["color"]
    else:
        q = next(q for q in inc if "position" in q)
        q["position"] = [FLIP[q["position"][0]], q["position"][1]]
    return {**meta, "include": inc, "mismatch": kind}


def render_for(meta: dict, rng: np.random.Generator, resolution: int = 64, distractors: bool = False):
    """(image, objects) of a scene satisfying `meta` (retrying placement until one fits)."""
    for _ in range(100):
        objs = scene_for(meta, rng, resolution, distractors)
        if objs is not None:
            return render(objs, resolution), objs
    raise RuntimeError(f"could not place a scene for {meta['prompt']!r} at {resolution}px")
