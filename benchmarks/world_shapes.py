"""What the judge saw in an `evaluate --scorer shapes` folder: per-class shape hits, colours, object counts.

  python benchmarks/world_shapes.py OUT_DIR          # OUT_DIR written by python -m ddspo_jax.evaluate

GenEval's verdict is all-or-nothing per image, so two world models' overall scores differ by less than their
±0.1 intervals unless one is far better. These rates count each asked-for object group instead (454 prompts
ask for ~800): `shape hit` of a class = the fraction of its include lines with at least `count` detected
objects of that class (any colour), `colour+shape` = with the asked colour too, `right count` = images with as
many objects as the line asks for in all. docs/world/world_model.md compares world models by them. The last
line per model: RESULT model=... shape_hit=... colour_shape_hit=... <class>=...
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def detections(out: str | Path) -> tuple[dict, list[tuple[dict, dict, list]]]:
    """(evaluate.json's settings, [(results.jsonl row, its prompt's metadata, the judge's detections)]): the
    one pass over the images that `diagnose` and `paired_counts` both read."""
    from ddspo_jax.evaluate import _read_png
    from ddspo_jax.world import judge, prompts

    out = Path(out)
    settings = json.loads((out / "evaluate.json").read_text())
    metas = prompts.read_jsonl(settings["prompts"])
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    return settings, [(r, metas[r["prompt_index"]], judge.detect(_read_png(out / r["file"]))) for r in rows]


def diagnose(out: str | Path, seen=None) -> dict[str, dict]:
    """model name ("model" / "compare") -> rates over the images of results.jsonl (`seen`: `detections(out)`
    when the caller has it)."""
    settings, seen = seen or detections(out)
    result = {}
    for name in dict.fromkeys(r["model"] for r, _, _ in seen):
        hit, asked, found = collections.Counter(), collections.Counter(), collections.Counter()
        col_hit = col_asked = right_count = objects = images = 0
        for _, meta, det in (x for x in seen if x[0]["model"] == name):
            images += 1
            objects += len(det)
            found.update(d.shape for d in det)
            right_count += len(det) == sum(int(q["count"]) for q in meta["include"])
            for q in meta["include"]:
                asked[q["class"]] += 1
                hit[q["class"]] += sum(d.shape == q["class"] for d in det) >= int(q["count"])
                if "color" in q:
                    col_asked += 1
                    col_hit += sum(d.shape == q["class"] and d.color == q["color"] for d in det) >= int(q["count"])
        result[name] = {"spec": settings["models"][name], "images": images, "objects_per_image": objects / images,
                        "right_count": right_count / images,
                        "shape_hit": sum(hit.values()) / max(sum(asked.values()), 1),
                        "colour_shape_hit": col_hit / max(col_asked, 1),
                        **{c: hit[c] / asked[c] for c in sorted(asked)},
                        "detected": dict(sorted(found.items()))}
    return result


def paired_counts(out: str | Path, n_boot: int = 2000, seed: int = 0, seen=None) -> dict:
    """"model" against "compare" on the same noise, per image: detected objects, whether their number is the
    number asked, and the excess (detected - asked); mean differences with a paired 95 % bootstrap interval
    over prompts, overall and per tag: which way a method moves the *number* of objects, whatever their shape
    (on the scene world DDSPO moves it the way the reference already errs: docs/world/study.md)."""
    per = {}
    for r, meta, det in (seen or detections(out))[1]:
        n, asked = len(det), sum(int(q["count"]) for q in meta["include"])
        per.setdefault(r["model"], {})[(r["prompt_index"], Path(r["file"]).name)] = (n, n == asked, n - asked,
                                                                                    meta["tag"])
    keys = sorted(set(per["model"]) & set(per["compare"]))
    a = np.array([per["model"][k][:3] for k in keys], float)
    b = np.array([per["compare"][k][:3] for k in keys], float)
    prompt, tags = np.array([k[0] for k in keys]), np.array([per["model"][k][3] for k in keys])
    rng = np.random.default_rng(seed)

    def stats(sel):
        d = a[sel] - b[sel]
        ps = np.unique(prompt[sel])
        rows = {p_: np.where(prompt[sel] == p_)[0] for p_ in ps}
        boots = np.array([d[np.concatenate([rows[p_] for p_ in rng.choice(ps, len(ps))])].mean(0)
                          for _ in range(n_boot)])
        lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)
        return {name: {"model": float(a[sel, i].mean()), "compare": float(b[sel, i].mean()),
                       "diff": float(d[:, i].mean()), "ci": (float(lo[i]), float(hi[i]))}
                for i, name in enumerate(("objects", "right_count", "excess"))}

    return {"all": stats(np.ones(len(keys), bool)), **{t: stats(tags == t) for t in sorted(set(tags))}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="a folder written by python -m ddspo_jax.evaluate --scorer shapes")
    args = ap.parse_args(argv)
    if not (Path(args.out) / "results.jsonl").is_file():
        print(f"world_shapes: {args.out} has no results.jsonl (run python -m ddspo_jax.evaluate first)",
              file=sys.stderr)
        return 2
    seen = detections(args.out)  # each image read and judged once
    results = diagnose(args.out, seen)
    for name, r in results.items():
        classes = [k for k in r if k in ("circle", "square", "triangle", "ring")]
        print(f"{name} ({r['spec']}): {r['images']} images, {r['objects_per_image']:.2f} objects per image, "
              f"right count {r['right_count']:.3f}, detected {r['detected']}")
        print("RESULT " + " ".join([f"model={name}", f"shape_hit={r['shape_hit']:.3f}",
                                    f"colour_shape_hit={r['colour_shape_hit']:.3f}"]
                                   + [f"{c}={r[c]:.3f}" for c in classes]))
    if {"model", "compare"} <= set(results):
        print("paired, model - compare [95 % bootstrap over prompts]: objects per image | exact count | excess")
        for group, st in paired_counts(args.out, seen=seen).items():
            print(f"  {group:<14} " + " | ".join(f"{st[k]['model']:.3f} vs {st[k]['compare']:.3f} "
                                              f"({st[k]['diff']:+.3f} [{st[k]['ci'][0]:+.3f}, {st[k]['ci'][1]:+.3f}])"
                                              for k in ("objects", "right_count", "excess")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
