"""Why DDSPO does or does not move the scene world's held-out alignment: its learning rate and β, measured.

  python benchmarks/ddspo_regime.py [--out docs/world] [--points 7.8e-5:16000,2e-5:16000,...] [--steps 40]

Every point fine-tunes the world model with DDSPO on the same records as benchmarks/objectives.py (256 pairs,
configs/world.py otherwise) at one (lr, β), seed 0, and reports: the last logged training loss and implicit
accuracy (the preference fitted on the training pairs), how far the weights moved (relative RMS change of
the UNet), and the held-out GenEval scores (the mean over tags as GenEval reports it, and the mean over all
prompts, which the small tags do not dominate). Writes ddspo_regime.csv under --out and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from objectives import Scorer, base_cfg, with_overrides  # noqa: E402

DEFAULT_POINTS = "7.8e-5:16000,2e-5:16000,5e-6:16000,7.8e-5:2000,2e-5:2000,5e-6:2000"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/world")
    ap.add_argument("--work", default="runs/objectives", help="records (shared with objectives.py) and runs")
    ap.add_argument("--model", default="")
    ap.add_argument("--points", default=DEFAULT_POINTS, help="lr:beta pairs, comma-separated")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--sampler-steps", type=int, default=20)
    ap.add_argument("--eval-limit", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import jax

    from ddspo_jax import prepare, train
    from ddspo_jax.configs.world import PROMPTS

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cfg = base_cfg(args, work)
    prepare.run_prepare(cfg, progress=False)
    score = Scorer(cfg, str(PROMPTS / "world_eval.jsonl"), args.eval_limit)
    ref = score.bb.params

    ref_scores = score(ref)
    ref_each = score.ev.last_scores.copy()

    def per_prompt() -> dict:
        d = score.ev.last_scores - ref_each  # paired over the same prompts and noise
        half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
        return {"prompt_mean": float(score.ev.last_scores.mean()), "prompt_diff": float(d.mean()),
                "prompt_diff_lo": float(d.mean() - half), "prompt_diff_hi": float(d.mean() + half)}

    rows = [{"lr": 0.0, "beta": 0.0, "loss": float("nan"), "implicit_acc": float("nan"), "moved": 0.0,
             **per_prompt(), **ref_scores}]
    print(f"reference: overall {ref_scores['shapes_overall']:.3f}", flush=True)
    for point in args.points.split(","):
        lr, beta = (float(v) for v in point.split(":"))
        c = with_overrides(cfg, {"train.objective": "ddspo", "train.lr": lr, "train.beta": beta}, args.seed,
                           work / f"regime-lr{lr:g}-b{beta:g}-s{args.seed}")
        s = train.train(c, log=lambda *a: None)
        params = s["params"]
        num = sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
                  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))
        den = sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in jax.tree.leaves(ref))
        r = score(params)
        rows.append({"lr": lr, "beta": beta, "loss": s["metrics"].get("loss", float("nan")),
                     "implicit_acc": s["metrics"].get("implicit_acc", float("nan")), "moved": (num / den) ** 0.5,
                     **per_prompt(), **r})
        print(f"lr {lr:g} beta {beta:g}: overall {r['shapes_overall']:.3f} loss {rows[-1]['loss']:.4f} "
              f"acc {rows[-1]['implicit_acc']:.2f} moved {rows[-1]['moved']:.2e} ({time.time() - t0:.0f}s)", flush=True)
    keys = list(rows[0])
    with open(out / "ddspo_regime.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(rows)
    tags = [k for k in keys if k.startswith("shapes_")]
    print("| lr | β | train loss | train acc | weights moved | " + " | ".join(t.replace("shapes_", "") for t in tags)
          + " | prompt mean | vs reference [95 %] |")
    print("|---|---|---|---|---|" + "---|" * (len(tags) + 2))
    for r in rows:
        name = ("reference", "") if r["lr"] == 0 else (f"{r['lr']:g}", f"{r['beta']:g}")
        print(f"| {name[0]} | {name[1]} | {r['loss']:.4f} | {r['implicit_acc']:.2f} | {r['moved']:.2e} | "
              + " | ".join(f"{r[t]:.3f}" for t in tags) + f" | {r['prompt_mean']:.3f} | {r['prompt_diff']:+.3f} [{r['prompt_diff_lo']:+.3f}, {r['prompt_diff_hi']:+.3f}] |")
    print(f"wrote {out / 'ddspo_regime.csv'} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
