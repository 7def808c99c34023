"""Measure a model (and compare two) by generating images for a prompt file and scoring them.

  python -m ddspo_jax.evaluate --model runs/sd15 --compare <base folder> --prompts p.txt \\
      --scorer pickscore --scorer-path ./PickScore_v1 --out eval/

--model / --compare take what `sample` takes (a diffusers folder, "tiny", a training run folder). Both models
generate every prompt from the same initial noise (prompt i, image k: the noise of (seed, k * n_prompts + i),
so image 0 of prompt i is what `sample --seed` gives), through the project's one sampler. Images are written
as PNGs and an interrupted run resumes: images already on disk are read back, not generated again (scoring a
PNG equals scoring the image, the scorers quantise the same way).

Reported, with 95 % intervals from a bootstrap over prompts (the unit the papers average over): each model's
mean score; with --compare, the paired difference (model - compare), the win rate over prompts (ties half)
and, for scorers with a pairwise definition (pickscore), the mean preference probability P(model > compare).
Writes results.jsonl (one line per image), summary.json and grid.png (prompt, image, score).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ddspo_jax.data.prompts import load_prompts
from ddspo_jax.errors import ConfigError, DataError, run_command
from ddspo_jax.files import remove_orphan_temps, write_text_atomic
from ddspo_jax.sample import check_common_args, generate_images, load_model, model_identity, save_png
from ddspo_jax.scoring import make_scorer

# The package's JAX-importing modules are imported inside the functions that use them: `--help` and a
# mistyped argument answer in ~0.4 s instead of ~4 s (JAX, Flax, Orbax start-up, measured on 2 cores);
# tests/test_structure.py checks that every function-local import is one of those.

BOOTSTRAP = 2000


def bootstrap_ci(values: np.ndarray, n: int = BOOTSTRAP, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over the first axis (prompts)."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(values), (n, len(values)))
    stats = values[idx].mean(axis=1)
    lo, hi = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def wilson(k: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (95 % by default)."""
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def tag_summary(scores: dict[str, np.ndarray], tags: list[str], n_boot: int = BOOTSTRAP, seed: int = 0) -> dict:
    """GenEval's report of 0/1 verdicts [n_prompts, ipp] per model: accuracy per tag with a Wilson interval over
    its images, overall = mean of the tag accuracies with a bootstrap interval (prompts resampled within
    each tag); for two models the paired difference of overall and of each tag."""
    names, tags = list(scores), np.asarray(tags)
    uniq = sorted(set(tags.tolist()))
    idx = {t: np.nonzero(tags == t)[0] for t in uniq}
    rng = np.random.default_rng(seed)
    boots = [{t: rng.integers(0, len(ix), len(ix)) for t, ix in idx.items()} for _ in range(n_boot)]

    def overall(per_prompt, b=None):
        return float(np.mean([per_prompt[ix if b is None else ix[b[t]]].mean() for t, ix in idx.items()]))

    out: dict = {"tags": uniq, "models": {}}
    per = {m: scores[m].mean(axis=1) for m in names}
    for m in names:
        s = scores[m]
        row = {t: {"accuracy": float(s[ix].mean()), "ci95": wilson(float(s[ix].sum()), int(s[ix].size)),
                   "n_images": int(s[ix].size)} for t, ix in idx.items()}
        dist = [overall(per[m], b) for b in boots]
        out["models"][m] = {"overall": overall(per[m]), "overall_ci95": tuple(np.percentile(dist, [2.5, 97.5])),
                            "per_tag": row}
    if len(names) == 2:
        d = per[names[0]] - per[names[1]]
        dist = [overall(d, b) for b in boots]
        out["paired"] = {"overall_difference": overall(d), "overall_difference_ci95": tuple(np.percentile(dist, [2.5, 97.5])),
                         "per_tag_difference": {t: float(d[ix].mean()) for t, ix in idx.items()}}
    return out


def tag_table(s: dict, labels: dict[str, str]) -> str:
    names = list(s["models"])
    lines = ["GenEval accuracy per tag [95 % Wilson interval]; overall = mean of tags [bootstrap interval]",
             f"  {'tag':<14}" + "".join(f"{labels[m][:30]:>32}" for m in names) + ("   difference" if len(names) == 2 else "")]
    for t in s["tags"]:
        cells = "".join(f"{s['models'][m]['per_tag'][t]['accuracy']:>10.3f} [{s['models'][m]['per_tag'][t]['ci95'][0]:.3f}, "
                        f"{s['models'][m]['per_tag'][t]['ci95'][1]:.3f}]  " for m in names)
        diff = f"  {s['paired']['per_tag_difference'][t]:+.3f}" if "paired" in s else ""
        lines.append(f"  {t:<14}{cells}{diff}")
    cells = "".join(f"{s['models'][m]['overall']:>10.3f} [{s['models'][m]['overall_ci95'][0]:.3f}, "
                    f"{s['models'][m]['overall_ci95'][1]:.3f}]  " for m in names)
    diff = ""
    if "paired" in s:
        p = s["paired"]
        diff = f"  {p['overall_difference']:+.3f} [{p['overall_difference_ci95'][0]:+.3f}, {p['overall_difference_ci95'][1]:+.3f}]"
    lines.append(f"  {'overall':<14}{cells}{diff}")
    return "\n".join(lines)


def summarize(scores: dict[str, np.ndarray], prefer: np.ndarray | None = None) -> dict:
    """scores: name -> [n_prompts, images_per_prompt]; the first name is the model, the second the compare."""
    out: dict = {"models": {}}
    per_prompt = {name: s.mean(axis=1) for name, s in scores.items()}
    for name, p in per_prompt.items():
        out["models"][name] = {"mean": float(p.mean()), "ci95": bootstrap_ci(p), "std": float(p.std(ddof=1))
                               if len(p) > 1 else float("nan"), "n_prompts": int(len(p)),
                               "n_images": int(scores[name].size)}
    names = list(scores)
    if len(names) == 2:
        a, b = per_prompt[names[0]], per_prompt[names[1]]
        diff = a - b
        wins = (a > b) + 0.5 * (a == b)
        out["paired"] = {"difference": float(diff.mean()), "difference_ci95": bootstrap_ci(diff),
                         "win_rate": float(wins.mean()), "win_rate_ci95": bootstrap_ci(wins)}
        if prefer is not None:
            p = prefer.mean(axis=1)
            out["paired"].update(preference=float(p.mean()), preference_ci95=bootstrap_ci(p))
    return out


def _fmt(v, ci):
    return f"{v:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]"


def table(summary: dict, labels: dict[str, str], unit: str) -> str:
    lines = [f"{unit}: mean over prompts [95 % bootstrap interval]"]
    for name, m in summary["models"].items():
        lines.append(f"  {labels[name]:<40} {_fmt(m['mean'], m['ci95'])}   ({m['n_prompts']} prompts, "
                     f"{m['n_images']} images)")
    if "paired" in summary:
        p = summary["paired"]
        lines.append(f"  {'difference (model - compare)':<40} {_fmt(p['difference'], p['difference_ci95'])}")
        lines.append(f"  {'win rate of model over prompts':<40} {_fmt(p['win_rate'], p['win_rate_ci95'])}")
        if "preference" in p:
            lines.append(f"  {'P(model preferred)':<40} {_fmt(p['preference'], p['preference_ci95'])}")
    return "\n".join(lines)


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.float32) / 255.0


def generate_or_load(name: str, spec: str, prompts: Sequence[str], folder: Path, args) -> np.ndarray:
    """Images [n_prompts, ipp, H, W, 3]: PNGs already in `folder` are read, the rest generated and written."""
    from tqdm import tqdm


    n, ipp = len(prompts), args.images_per_prompt
    folder.mkdir(parents=True, exist_ok=True)
    remove_orphan_temps(folder)  # PNGs a killed run was writing (SIGKILL skips save_png's own clean-up)
    jobs = [(k, i) for k in range(ipp) for i in range(n)]
    path = lambda k, i: folder / f"{i:05d}_{k}.png"  # noqa: E731
    todo = [(k, i) for k, i in jobs if not path(k, i).is_file()]
    if todo:
        import jax

        from ddspo_jax import parallel, sampling
        from ddspo_jax.backbones import generation_settings

        dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
        bb, params = load_model(spec, dtype=dtype, step=args.step if name == "model" else None)
        settings = generation_settings(bb, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                                       resolution=args.resolution, seed=args.seed)
        mesh = parallel.make_mesh()
        gen, rep = sampling.Generator(bb, settings, mesh), sampling.replicate(params, mesh)
        for a in tqdm(range(0, len(todo), args.batch), desc=f"generate {name}", unit="batch"):
            chunk = todo[a:a + args.batch]
            imgs = generate_images(bb, gen, rep, [prompts[i] for _, i in chunk], [k * n + i for k, i in chunk],
                                   batch=args.batch)
            for (k, i), img in zip(chunk, imgs):
                save_png(img, path(k, i))
    print(f"evaluate: {name}: {len(jobs) - len(todo)} images found in {folder}, {len(todo)} generated")
    first = _read_png(path(0, 0))
    out = np.zeros((n, ipp, *first.shape), np.float32)
    for k, i in jobs:
        out[i, k] = _read_png(path(k, i))
    return out


def score_all(scorer, images: np.ndarray, prompts: Sequence[str], batch: int) -> np.ndarray:
    from tqdm import tqdm

    n, ipp = images.shape[:2]
    flat = images.reshape(n * ipp, *images.shape[2:])
    flat_prompts = [prompts[j // ipp] for j in range(n * ipp)]
    scores = []
    for a in tqdm(range(0, len(flat), batch), desc=f"score {scorer.name}", unit="batch"):
        scores.append(np.asarray(scorer.score(flat[a:a + batch], flat_prompts[a:a + batch]), np.float64))
    return np.concatenate(scores).reshape(n, ipp)


def labelled_grid(images: dict[str, np.ndarray], scores: dict[str, np.ndarray], prompts, labels,
                  limit: int = 24, per_row: int = 4) -> np.ndarray:
    """The first `limit` prompts, `per_row` to a row: for each, image 0 of every model side by side with its
    score under it (0/1 verdicts in red/green), the whole prompt wrapped beneath; the model names head each
    column."""
    import textwrap

    from PIL import Image, ImageDraw

    names = list(images)
    h, w = images[names[0]].shape[2:4]
    cell, line, pad = max(h, 96), 11, 6
    block_w = len(names) * (cell + 2) - 2
    wrap = max(block_w // 6, 8)
    shown = list(range(min(len(prompts), limit)))
    texts = [textwrap.wrap(prompts[i], wrap)[:4] for i in shown]
    text_rows = max((len(t) for t in texts), default=1)
    block_h = line + cell + line + text_rows * line
    cols = min(per_row, max(len(shown), 1))
    rows = (len(shown) + cols - 1) // cols
    sheet = Image.new("RGB", (pad + cols * (block_w + pad), pad + rows * (block_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, i in enumerate(shown):
        x0, y0 = pad + (k % cols) * (block_w + pad), pad + (k // cols) * (block_h + pad)
        for j, name in enumerate(names):
            x = x0 + j * (cell + 2)
            draw.text((x, y0), labels[name][-(cell // 6):], fill="black")
            img = Image.fromarray(np.round(np.clip(images[name][i, 0], 0, 1) * 255).astype(np.uint8))
            sheet.paste(img.resize((cell, cell), Image.NEAREST), (x, y0 + line))
            v = float(scores[name][i, 0])
            colour = {0.0: (200, 0, 0), 1.0: (0, 140, 0)}.get(v, (0, 0, 0))
            draw.text((x, y0 + line + cell), f"{v:.3f}", fill=colour)
        for r, t in enumerate(texts[k]):
            draw.text((x0, y0 + 2 * line + cell + r * line), t, fill=(70, 70, 70))
    return np.asarray(sheet)


def run(args) -> dict:

    prompts, _ = load_prompts(args.prompts, field=args.field or None, limit=args.limit or None)
    if not prompts:
        raise DataError(f"no prompts in {args.prompts}")
    scorer = make_scorer(args.scorer, args.scorer_path or None, prompts_path=args.prompts,
                         **({"head": args.scorer_head} if args.scorer_head else {}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = [("model", args.model)] + ([("compare", args.compare)] if args.compare else [])
    labels = dict(models)
    run_info = {"models": labels, "prompts": args.prompts, "seed": args.seed, "scorer": args.scorer,
                "scorer_path": args.scorer_path, "images_per_prompt": args.images_per_prompt,
                "steps": args.steps, "guidance": args.guidance, "sampler": args.sampler,
                "resolution": args.resolution, "step": args.step,
                "identity": {name: model_identity(spec, args.step if name == "model" else None)
                             for name, spec in models}}
    marker = out / "evaluate.json"
    if marker.is_file():  # resuming: the images on disk must be the ones these settings make
        old = json.loads(marker.read_text())
        changed = {k: (old.get(k), v) for k, v in run_info.items() if k != "scorer" and k != "scorer_path"
                   and old.get(k) != v}
        if changed:
            raise ConfigError(f"{out} holds images made with other settings {changed} (old, new); pass another "
                              "--out or delete it")
    write_text_atomic(marker, json.dumps(run_info, indent=1) + "\n")
    images = {name: generate_or_load(name, spec, prompts, out / name, args) for name, spec in models}
    scores = {name: score_all(scorer, images[name], prompts, args.batch) for name in images}
    prefer = None
    if args.compare and hasattr(scorer, "prefer"):
        n, ipp = scores["model"].shape
        a = images["model"].reshape(n * ipp, *images["model"].shape[2:])
        b = images["compare"].reshape(n * ipp, *images["compare"].shape[2:])
        flat_prompts = [prompts[j // ipp] for j in range(n * ipp)]
        prefer = np.concatenate([scorer.prefer(a[s:s + args.batch], b[s:s + args.batch],
                                               flat_prompts[s:s + args.batch])
                                 for s in range(0, n * ipp, args.batch)]).reshape(n, ipp)
    summary = summarize(scores, prefer)
    summary.update(scorer=args.scorer, unit=scorer.unit, settings=run_info)
    tags = None
    if getattr(scorer, "binary", False) and hasattr(scorer, "tag"):
        tags = [scorer.tag(p) for p in prompts]
        summary["geneval"] = tag_summary(scores, tags)
    with (out / "results.jsonl").open("w") as f:
        for name in scores:
            for i, prompt in enumerate(prompts):
                for k in range(args.images_per_prompt):
                    row = {"model": name, "spec": labels[name], "prompt_index": i, "prompt": prompt, "image": k,
                           "file": f"{name}/{i:05d}_{k}.png", "score": float(scores[name][i, k])}
                    if tags is not None:
                        row["tag"] = tags[i]
                    if prefer is not None and name == "model":
                        row["preference"] = float(prefer[i, k])
                    f.write(json.dumps(row) + "\n")
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    save_png(labelled_grid(images, scores, prompts, labels), out / "grid.png")
    print(table(summary, labels, scorer.unit))
    if "geneval" in summary:
        print(tag_table(summary["geneval"], labels))
    print(f"evaluate: results.jsonl, summary.json and grid.png in {out}")
    return summary


class TrainingEval:
    """`train.eval_every`: the current model's score on `train.eval_prompts` (one image per prompt, the noise
    `evaluate` uses for image 0), beside the frozen reference's (scored once), logged as eval/* scalars.
    Single-process runs only, like the sample grid."""

    def __init__(self, cfg, backbone, mesh, writer, log):

        self.cfg, self.bb, self.mesh, self.writer, self.log = cfg, backbone, mesh, writer, log
        self.gen = None
        self.reference: dict | None = None
        t = cfg.train  # a bad prompt file or scorer stops the run before its first step, not at the evaluation
        self.prompts, _ = load_prompts(t.eval_prompts, limit=t.eval_limit or None)
        self.scorer = make_scorer(t.eval_scorer, t.eval_scorer_path or None, prompts_path=t.eval_prompts)
        for p in self.prompts:
            getattr(self.scorer, "tag", lambda q: None)(p)  # every prompt has its metadata line

    def _setup(self):
        from ddspo_jax import sampling
        from ddspo_jax.backbones import generation_settings

        self.bb.load_extras(text=True, vae=True)
        p = self.cfg.prepare
        settings = generation_settings(self.bb, sampler=p.sampler, steps=p.steps, guidance=p.guidance,
                                       resolution=p.resolution, seed=self.cfg.seed)
        self.gen = sampling.Generator(self.bb, settings, self.mesh)

    def scores(self, params) -> dict[str, float]:
        from ddspo_jax import sampling

        rep, n, b = sampling.replicate(params, self.mesh), len(self.prompts), self.cfg.prepare.batch_size
        images = np.concatenate([generate_images(self.bb, self.gen, rep, self.prompts[a:a + b],
                                                 range(a, min(a + b, n)), batch=b) for a in range(0, n, b)])
        s = np.asarray(self.scorer.score(images, self.prompts), np.float64)
        self.last_scores = s
        out = {self.scorer.name: float(s.mean())}
        if getattr(self.scorer, "binary", False) and hasattr(self.scorer, "tag"):
            g = tag_summary({"m": s[:, None]}, [self.scorer.tag(q) for q in self.prompts], n_boot=1)
            out = {f"{self.scorer.name}_overall": g["models"]["m"]["overall"],  # GenEval's: mean of the tags
                   f"{self.scorer.name}_per_prompt": float(s.mean()),  # what small tags do not swing
                   **{f"{self.scorer.name}_{t}": v["accuracy"] for t, v in g["models"]["m"]["per_tag"].items()}}
        return out

    def table(self) -> str | None:
        """The last evaluation beside the reference: GenEval's per-tag table with intervals and the paired
        difference (a binary scorer with tags, e.g. shapes), else None."""
        if getattr(self, "reference_scores", None) is None or not (getattr(self.scorer, "binary", False)
                                                                    and hasattr(self.scorer, "tag")):
            return None
        s = tag_summary({"fine-tuned": self.last_scores[:, None], "reference": self.reference_scores[:, None]},
                        [self.scorer.tag(q) for q in self.prompts])
        return tag_table(s, {"fine-tuned": "fine-tuned", "reference": "reference"})

    def summary(self, step_no: int) -> dict | None:
        """The last evaluation beside the reference in `evaluate`'s summary.json format (its "geneval" block
        for a binary scorer with tags), so a training run's end-of-run score is kept, not only printed."""
        if getattr(self, "reference_scores", None) is None:
            return None
        scores = {"model": self.last_scores[:, None], "compare": self.reference_scores[:, None]}
        out = summarize(scores, None)
        out.update(scorer=self.scorer.name, unit=getattr(self.scorer, "unit", ""),
                   settings={"models": {"model": f"{self.cfg.output_dir} (step {step_no})",
                                        "compare": f"{self.cfg.model.path} (reference)"},
                             "prompts": self.cfg.train.eval_prompts, "images_per_prompt": 1, "seed": self.cfg.seed,
                             "step": step_no, "limit": self.cfg.train.eval_limit})
        if getattr(self.scorer, "binary", False) and hasattr(self.scorer, "tag"):
            out["geneval"] = tag_summary(scores, [self.scorer.tag(q) for q in self.prompts])
        return out

    def __call__(self, step_no, ref_params, params):
        import jax

        if jax.process_count() > 1:
            return None
        if self.gen is None:
            self._setup()
        if self.reference is None:
            self.reference = self.scores(ref_params)
            self.reference_scores = self.last_scores
        cur = self.scores(params)
        self.writer.write_scalars(step_no, {**{f"eval/{k}": v for k, v in cur.items()},
                                            **{f"eval/{k}_reference": v for k, v in self.reference.items()}})
        main = next(iter(cur))
        self.log(f"step {step_no}: eval {main} {cur[main]:.4f} (reference {self.reference[main]:.4f}) on "
                 f"{len(self.prompts)} prompts of {self.cfg.train.eval_prompts}")
        return cur


def parse_args(argv=None):
    from ddspo_jax.sampling import SAMPLERS

    ap = argparse.ArgumentParser(prog="python -m ddspo_jax.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", required=True, help="diffusers folder, 'tiny', or a training run folder")
    ap.add_argument("--compare", default="", help="a second model, generated from the same noise")
    ap.add_argument("--prompts", required=True, help="prompt file (.txt, .jsonl, .csv/.tsv, .parquet)")
    ap.add_argument("--field", default="", help="JSONL field / CSV or Parquet column of the prompts")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N prompts")
    ap.add_argument("--scorer", default="pickscore",
                    help="clip_score | pickscore | aesthetic | shapes (the scene world's GenEval judge; its "
                         "--prompts must be GenEval-format JSONL) (see ddspo_jax/scoring)")
    ap.add_argument("--scorer-path", default="", help="local folder of the scorer's model (never downloaded)")
    ap.add_argument("--scorer-head", default="", help="aesthetic: the head file (default "
                                                      "<scorer-path>/aesthetic_head.safetensors)")
    ap.add_argument("--images-per-prompt", type=int, default=1, help="images generated per prompt and model")
    ap.add_argument("--seed", type=int, default=0, help="initial-noise seed (the same for both models)")
    ap.add_argument("--out", required=True, help="output folder (re-running resumes from its images)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step of a run folder (default latest)")
    ap.add_argument("--steps", type=int, default=0, help="sampler steps (0: family default)")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default: family default)")
    ap.add_argument("--sampler", default="", choices=("",) + SAMPLERS)
    ap.add_argument("--resolution", type=int, default=0, help="pixels (0: the model's default)")
    ap.add_argument("--batch", type=int, default=8, help="images per generation / scoring call")
    ap.add_argument("--dtype", default="", choices=("", "float32", "bfloat16"),
                    help="compute dtype (default: float32 on CPU, bfloat16 on accelerators)")
    args = ap.parse_args(argv)
    if args.images_per_prompt < 1 or args.batch < 1:
        ap.error("--images-per-prompt and --batch must be >= 1")

    check_common_args(ap, args)
    return args


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # a bad flag: argparse printed its line; the exit code is returned like the others
        return int(e.code or 0)
    from ddspo_jax.parallel import cpu_host_setup

    cpu_host_setup()  # before JAX starts its backends
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
