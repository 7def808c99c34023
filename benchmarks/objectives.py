"""The paper's comparisons (Tab. 1 / Tab. 6) on the scene world: every objective on the same records, scored by
the pixel judge on the held-out GenEval-style prompts, over several seeds.

  python benchmarks/objectives.py [--out docs/world] [--seeds 3] [--steps 40] [--pairs 256] [--eval-stride 2]

Methods: reference (no training), SFT, Diffusion-DPO, DSPO (its weight w swept on seed 0 first; the best is
then run on every seed, and reported), DSPO+CPP, DDSPO, and DDSPO's efficient variants Rand-positive and
Not-paired. Every run starts from the world model (configs/world.py), reads the same preference records and
differs only in `train.objective` / `train.dspo_weight` / `data.variant` and the seed (which draws timesteps
and noise). Writes objectives.csv (one row per run: overall and per-tag accuracy), objectives_summary.csv
(mean +- std per method) and objectives.png under --out; prints the summary table. Runs live under --work
and resume from their checkpoints: delete it to start over.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = [  # (label, overrides)
    ("SFT", {"train.objective": "sft"}),
    ("Diffusion-DPO", {"train.objective": "dpo"}),
    ("DSPO", {"train.objective": "dspo"}),
    ("DSPO+CPP", {"train.objective": "dspo_cpp"}),
    ("DDSPO", {"train.objective": "ddspo"}),
    ("DDSPO Rand-positive", {"train.objective": "ddspo", "data.variant": "rand_positive"}),
    ("DDSPO Not-paired", {"train.objective": "ddspo", "data.variant": "not_paired"}),
]


def base_cfg(args, out: Path):
    from ddspo_jax.config import validate
    from ddspo_jax.configs.world import get_config

    c = get_config()
    if args.model:
        c.model.path = args.model
    c.data.records, c.data.prompt_limit = str(out / "records"), args.pairs
    c.train.steps, c.train.checkpoint_every = args.steps, args.steps
    c.train.sample_every, c.train.export_at_end, c.train.eval_prompts = -1, False, ""
    c.prepare.steps = args.sampler_steps
    return validate(c)


def with_overrides(c, overrides: dict, seed: int, out: Path):
    from ddspo_jax.config import validate

    c = c.copy_and_resolve_references()
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(c, section), name, value)
    c.seed = seed
    c.output_dir = str(out)
    return validate(c)


class Scorer:
    """The held-out set scored by the pixel judge with one compiled sampler (train's TrainingEval)."""

    def __init__(self, cfg, eval_prompts: str, limit: int):
        import ml_collections

        from ddspo_jax import parallel
        from ddspo_jax.backbones import load_backbone
        from ddspo_jax.evaluate import TrainingEval

        c = cfg.copy_and_resolve_references()
        c.train.eval_prompts, c.train.eval_limit, c.train.eval_scorer = eval_prompts, limit, "shapes"
        self.bb = load_backbone(ml_collections.ConfigDict(c.model.to_dict()), c.schedule, log=None)
        self.ev = TrainingEval(c, self.bb, parallel.make_mesh(), None, lambda *a: None)
        self.ev._setup()

    def __call__(self, params) -> dict[str, float]:
        return self.ev.scores(params)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/world")
    ap.add_argument("--work", default="runs/objectives", help="records and runs")
    ap.add_argument("--model", default="", help="the reference (default: configs/world.py's world model)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--sampler-steps", type=int, default=0, help="(0: the model's own, world: DDIM 20)")
    ap.add_argument("--eval-limit", type=int, default=0, help="score only the first N held-out prompts")
    ap.add_argument("--eval-stride", type=int, default=1, help="score every K-th held-out prompt (all tags kept)")
    ap.add_argument("--dspo-weights", default="beta,1000,100", help="DSPO w values swept on seed 0 ('beta': w = β)")
    args = ap.parse_args(argv)

    from ddspo_jax import prepare, train
    from ddspo_jax.configs.world import PROMPTS

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    cfg = base_cfg(args, work)
    prepare.run_prepare(cfg, progress=False)
    eval_file = PROMPTS / "world_eval.jsonl"
    if args.eval_stride > 1:
        lines = eval_file.read_text().splitlines()[::args.eval_stride]
        eval_file = work / "eval.jsonl"
        eval_file.write_text("\n".join(lines) + "\n")
    score = Scorer(cfg, str(eval_file), args.eval_limit)
    rows = [{"method": "Reference", "seed": 0, **score(score.bb.params)}]
    print(f"Reference: {rows[0]}", flush=True)

    def run(label, overrides, seed):
        c = with_overrides(cfg, overrides, seed, work / f"{label.replace(' ', '_')}-s{seed}")
        params = train.train(c, log=lambda *a: None)["params"]
        r = {"method": label, "seed": seed, **score(params)}
        print(f"{label} seed {seed}: overall {r['shapes_overall']:.3f} ({time.time() - t0:.0f}s)", flush=True)
        return r

    best_w = None
    for label, overrides in METHODS:
        if overrides["train.objective"] == "dspo":  # sweep w on seed 0, keep the best
            sweep = []
            for w in args.dspo_weights.split(","):
                o = {**overrides, "train.dspo_weight": None if w == "beta" else float(w)}
                r = run(f"DSPO w={w}", o, 0)
                rows.append(r)
                sweep.append((r["shapes_overall"], w, o))
            _, best_w, overrides = max(sweep, key=lambda s: s[0])
            label = f"DSPO (w={best_w})"
            rows += [{**r, "method": label} for r in rows if r["method"] == f"DSPO w={best_w}"]
            seeds = range(1, args.seeds)
        else:
            seeds = range(args.seeds)
        rows += [run(label, overrides, s) for s in seeds]

    keys = [k for k in rows[0] if k.startswith("shapes_")]
    with open(out / "objectives.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["method", "seed"] + keys)
        w.writeheader()
        w.writerows(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows if not r["method"].startswith("DSPO w=")))
    summary = []
    for m in methods:
        vals = np.array([[r[k] for k in keys] for r in rows if r["method"] == m])
        summary.append({"method": m, "runs": len(vals),
                        **{k: f"{vals[:, i].mean():.3f} ± {vals[:, i].std(ddof=1) if len(vals) > 1 else 0:.3f}"
                           for i, k in enumerate(keys)}})
    with open(out / "objectives_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["method", "runs"] + keys)
        w.writeheader()
        w.writerows(summary)
    _figure(rows, methods, keys, out / "objectives.png")
    short = [k.replace("shapes_", "") for k in keys]
    print(f"| method | runs | {' | '.join(short)} |")
    print("|---|---|" + "---|" * len(keys))
    for s in summary:
        print(f"| {s['method']} | {s['runs']} | " + " | ".join(s[k] for k in keys) + " |")
    print(f"wrote {out / 'objectives.csv'}, {out / 'objectives_summary.csv'}, {out / 'objectives.png'} "
          f"({time.time() - t0:.0f}s; {args.pairs} pairs, {args.steps} steps, seeds {args.seeds}, DSPO w={best_w})")
    return 0


def _figure(rows, methods, keys, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.3 * len(keys) + 3, 4))
    width = 0.8 / len(methods)
    for j, m in enumerate(methods):
        vals = np.array([[r[k] for k in keys] for r in rows if r["method"] == m])
        ax.bar(np.arange(len(keys)) + j * width, vals.mean(0), width, yerr=vals.std(0), label=m, capsize=2)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, [k.replace("shapes_", "") for k in keys], fontsize=8)
    ax.set_ylabel("accuracy (pixel judge)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
