"""DDSPO's effect on the scene world, measured the way the paper trains: fresh pairs (each seen once), every
choice made on a dev split, the same tuning budget for every method, the report on the held-out set once.

  python benchmarks/world_study.py diag    # the reference: CFG curve, seed noise, its c vs c- contrast over t
  python benchmarks/world_study.py sweep   # every method on dev: lr grid at its paper beta, then beta x{1/2, 2}
  python benchmarks/world_study.py final   # each method's best dev setting, --seeds seeds, world_eval.jsonl,
                                           # --ipp images per prompt, paired against the reference
  python benchmarks/world_study.py cfg     # the best DDSPO and DPO runs vs the reference at CFG 1/2/3/5 on dev
  python benchmarks/world_study.py direction  # where each best run moved f(x_t, c): along CFG's direction?
  python benchmarks/world_study.py ceiling  # the reference pushed explicitly away from c- while sampling: what
                                            # the contrast DDSPO amplifies can give on dev at most

Pairs: `--steps x --batch` distinct training captions of world_train.jsonl (prepare once, under --work), so no
pair is seen twice. Dev: world_dev.jsonl (`python -m ddspo_jax.world prompts`), disjoint from world_eval.jsonl
and from world_train.jsonl. Every run appends one CSV row under --out (docs/world/) as it finishes; a re-run
skips the rows already there, so a killed study resumes. The budget is a coordinate sweep, the same for every
method: lr over --lrs at the method's paper beta (4 runs), then beta at x1/2 and x2 at that method's best lr
(2 runs; SFT has no beta). Choices are made on dev per-prompt accuracy (dev's five tags are balanced, so it
equals the mean of tags up to rounding; it is the lower-variance of the two).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (label, overrides, paper beta): the paper's betas -- DDSPO / DSPO(+CPP) 16000 on SD (Tab. 8), Diffusion-DPO
# 8000 on SD-1.5 (its release, 2000-5000 on SDXL); SFT has none.
METHODS = [
    ("DDSPO", {"train.objective": "ddspo"}, 16000.0),
    ("Diffusion-DPO", {"train.objective": "dpo"}, 8000.0),
    ("DSPO", {"train.objective": "dspo", "train.dspo_weight": 100.0}, 16000.0),
    ("SFT", {"train.objective": "sft"}, None),
    ("DSPO+CPP", {"train.objective": "dspo_cpp", "train.dspo_weight": 100.0}, 16000.0),
    ("DDSPO Rand-positive", {"train.objective": "ddspo", "data.variant": "rand_positive"}, 16000.0),
    ("DDSPO Not-paired", {"train.objective": "ddspo", "data.variant": "not_paired"}, 16000.0),
]
LRS = "1e-6,5e-6,2e-5,1e-4"


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict) -> None:
    """One finished run; the header is the first row's keys (later rows must have the same)."""
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, list(row))
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()


class Study:
    """The world model, its records (train and dev pairs), and a scorer for any prompt set, CFG and seed."""

    def __init__(self, args):
        from ddspo_jax import parallel

        parallel.cpu_host_setup()
        import ml_collections

        from ddspo_jax import prepare
        from ddspo_jax.backbones import load_backbone
        from ddspo_jax.config import validate
        from ddspo_jax.configs.world import PROMPTS, get_config

        self.args, self.work, self.out = args, Path(args.work), Path(args.out)
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        c = get_config()
        if args.model:  # another world model (e.g. one from `world pretrain --caption-fragments`)
            c.model.path = args.model
        c.data.prompt_limit = args.steps * args.batch  # fresh pairs: each seen once
        c.data.records = str(self.work / "records")
        c.data.perturb = (f"{args.perturb}:1.0",)
        c.data.word_groups = str(PROMPTS / "world_word_groups.json")
        c.train.steps, c.train.batch_size, c.train.checkpoint_every = args.steps, args.batch, args.steps
        c.train.sample_every, c.train.export_at_end, c.train.eval_prompts = -1, False, ""
        c.train.warmup_steps = min(c.train.warmup_steps, args.steps // 4)
        self.cfg = validate(c)
        t0 = time.time()
        prepare.run_prepare(self.cfg, progress=False)
        self.prepare_s = time.time() - t0
        d = self.cfg.copy_and_resolve_references()
        d.data.prompts, d.data.prompt_limit = str(PROMPTS / "world_dev.jsonl"), args.dev_pairs
        d.data.records = str(self.work / "dev_records")
        prepare.run_prepare(validate(d), progress=False)
        self.dev_file, self.eval_file = str(PROMPTS / "world_dev.jsonl"), str(PROMPTS / "world_eval.jsonl")
        self.bb = load_backbone(ml_collections.ConfigDict(self.cfg.model.to_dict()), self.cfg.schedule, log=None)
        self.bb.load_extras(text=True, vae=True)
        self.mesh = parallel.make_mesh()
        self._gens, self._sets = {}, {}

    def prompt_set(self, path):
        from ddspo_jax.data.prompts import load_prompts
        from ddspo_jax.scoring import make_scorer

        if path not in self._sets:
            limit = self.args.dev_limit if path == self.dev_file else self.args.eval_limit
            prompts, _ = load_prompts(path, limit=limit or None)
            scorer = make_scorer("shapes", None, prompts_path=path)
            self._sets[path] = (prompts, scorer, [scorer.tag(p) for p in prompts])
        return self._sets[path]

    def verdicts(self, params, path, ipp=1, guidance=None, seed=0) -> np.ndarray:
        """0/1 verdicts [n_prompts, ipp]; image k of prompt i from noise index k * n + i (evaluate's), so two
        models at the same (path, guidance, seed) see the same noise."""
        from ddspo_jax import sampling
        from ddspo_jax.backbones import generation_settings
        from ddspo_jax.sample import generate_images

        prompts, scorer, _ = self.prompt_set(path)
        key = (guidance, seed)
        if key not in self._gens:
            self._gens[key] = sampling.Generator(self.bb, generation_settings(self.bb, guidance=guidance, seed=seed),
                                                 self.mesh)
        gen, rep, n, b = self._gens[key], sampling.replicate(params, self.mesh), len(prompts), 64
        jobs = [(k, i) for k in range(ipp) for i in range(n)]
        out = np.zeros((n, ipp))
        for a in range(0, len(jobs), b):
            chunk = jobs[a:a + b]
            imgs = generate_images(self.bb, gen, rep, [prompts[i] for _, i in chunk], [k * n + i for k, i in chunk],
                                   batch=b)
            s = scorer.score(imgs, [prompts[i] for _, i in chunk])
            for (k, i), v in zip(chunk, s):
                out[i, k] = v
        return out

    def summary(self, v, path) -> dict:
        from ddspo_jax.evaluate import tag_summary

        tags = self.prompt_set(path)[2]
        g = tag_summary({"m": v}, tags, n_boot=1)["models"]["m"]
        return {"overall": g["overall"], "per_prompt": float(v.mean()),
                **{t: r["accuracy"] for t, r in g["per_tag"].items()}}

    def config(self, overrides: dict, seed: int, name: str):
        """The study's config with one run's overrides ("section.key": value), seed and output folder."""
        from ddspo_jax.config import validate

        c = self.cfg.copy_and_resolve_references()
        for key, value in overrides.items():
            section, key_name = key.split(".")
            setattr(getattr(c, section), key_name, value)
        c.seed, c.output_dir = seed, str(self.work / "runs" / name)
        return validate(c)

    def train(self, overrides, seed, name) -> tuple[dict, dict]:
        from ddspo_jax import train

        c = self.config(overrides, seed, name)
        s = train.train(c, log=lambda *a: None)
        return s["params"], {"train_loss": s["metrics"].get("loss", float("nan")),
                             "train_acc": s["metrics"].get("implicit_acc", float("nan"))}

    def heldout(self, params, overrides, seed) -> dict:
        """The objective's loss and implicit accuracy on the dev pairs (never trained on), same t / noise draw
        for every model: did the preference generalise, or was it memorised?"""
        import jax
        import jax.numpy as jnp

        from ddspo_jax.data.loader import PairLoader
        from ddspo_jax.step import pair_forward

        c = self.config(overrides, seed, "heldout")
        with PairLoader(self.work / "dev_records", batch_size=self.args.dev_pairs, shuffle=False, num_epochs=1,
                        dtype="float32", variant=c.data.variant) as loader:
            batch = next(loader)
        batch = {k: v for k, v in batch.items() if k in ("x0_w", "x0_l", "cond_w", "cond_l")}
        ids = jnp.arange(self.args.dev_pairs)
        denoise = lambda p, x, t, cond, g=None: self.bb.denoise(p, x, t, cond)  # noqa: E731
        loss, m = pair_forward(denoise, self.bb.schedule, c, params, self.bb.params, batch, ids,
                               jax.random.key(1234))(params)
        return {"dev_loss": float(loss), "dev_acc": float(m.get("implicit_acc", np.nan))}


def moved(params, ref) -> float:
    import jax

    num = sum(float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
              for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)))
    return (num / sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in jax.tree.leaves(ref))) ** 0.5


def sweep_points(label, beta0, rows, lrs=LRS, factors="0.5,2"):
    """This method's coordinate sweep given the rows done so far: lr at the paper beta, then beta x1/2, x2 at
    the best lr (on dev per-prompt accuracy)."""
    lrs = [float(x) for x in lrs.split(",")]
    pts = [(lr, beta0) for lr in lrs]
    done = [r for r in rows if r["method"] == label]
    first = [r for r in done if float(r["beta"] or 0) == (beta0 or 0)]
    if beta0 is not None and len(first) >= len(lrs):
        best = max(first, key=lambda r: float(r["dev_per_prompt"]))
        pts += [(float(best["lr"]), beta0 * float(f)) for f in factors.split(",") if f]
    return pts


def cmd_diag(st: Study, args):
    """Reference on dev: CFG 1/2/3/5/7.5 at seed 0, and seeds 0-2 at the model's CFG (the noise floor); the
    reference's contrast d(f_ref(x_t, c), f_ref(x_t, c-)) against its size d(f_ref(x_t, c), 0) over t."""
    path = st.out / "study_reference.csv"
    done = {(r["guidance"], r["seed"]) for r in read_rows(path)}
    for g, seed in [(5.0, 0), (5.0, 1), (5.0, 2), (1.0, 0), (2.0, 0), (3.0, 0), (7.5, 0)]:
        if (str(g), str(seed)) in done:
            continue
        v = st.verdicts(st.bb.params, st.dev_file, args.dev_ipp, g, seed)
        append_row(path, {"guidance": g, "seed": seed, "ipp": args.dev_ipp,
                          **{f"dev_{k}": f"{x:.4f}" for k, x in st.summary(v, st.dev_file).items()}})
        print(f"reference dev cfg {g} seed {seed}: {st.summary(v, st.dev_file)}", flush=True)
    import jax
    import jax.numpy as jnp

    from ddspo_jax.data.loader import PairLoader

    with PairLoader(st.work / "dev_records", batch_size=args.dev_pairs, shuffle=False, num_epochs=1,
                    dtype="float32") as loader:
        b = next(loader)
    sch, rows = st.bb.schedule, []
    for t in [50, 150, 250, 400, 550, 700, 850, 950]:
        noise = jax.random.normal(jax.random.key(t), b["x0_w"].shape)
        tt = jnp.full((len(noise),), t, jnp.int32)
        x = sch.add_noise(jnp.asarray(b["x0_w"]), noise, tt)
        tm = sch.model_timestep(tt)
        fc = st.bb.denoise(st.bb.params, x, tm, b["cond_w"])
        fn = st.bb.denoise(st.bb.params, x, tm, b["cond_l"])
        u = st.bb.denoise(st.bb.params, x, tm, {k: np.repeat(v, len(noise), 0)
                                                for k, v in st.bb.negative_cond(1).items()})
        msq = lambda a, b_: float(jnp.mean(jnp.square(a - b_)))  # noqa: E731
        rows.append({"t": t, "d_c_cneg": msq(fc, fn), "d_c_uncond": msq(fc, u), "d_c_noise": msq(fc, noise),
                     "ratio_cneg_uncond": msq(fc, fn) / max(msq(fc, u), 1e-12)})
    with open(st.out / "study_contrast.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        print(r)


def cmd_sweep(st: Study, args):
    path = st.out / "sweep.csv"
    for label, overrides, beta0 in methods(args):
        while True:
            rows = read_rows(path)
            done = {(r["method"], float(r["lr"]), float(r["beta"] or 0)) for r in rows}
            todo = [p for p in sweep_points(label, beta0, rows, args.lrs, args.beta_factors)
                    if (label, p[0], p[1] or 0) not in done]
            if not todo:
                break
            lr, beta = todo[0]
            o = {**overrides, "train.lr": lr, **({"train.beta": beta} if beta else {})}
            t0 = time.time()
            params, tr = st.train(o, 0, f"sweep-{label.replace(' ', '_')}-lr{lr:g}-b{beta or 0:g}")
            v = st.verdicts(params, st.dev_file, args.dev_ipp)
            row = {"method": label, "lr": lr, "beta": beta or "", "seed": 0, **tr, **st.heldout(params, o, 0),
                   "moved": moved(params, st.bb.params),
                   **{f"dev_{k}": x for k, x in st.summary(v, st.dev_file).items()}, "seconds": time.time() - t0}
            append_row(path, {k: (f"{x:.5g}" if isinstance(x, float) else x) for k, x in row.items()})
            print(f"{label} lr {lr:g} beta {beta}: dev per-prompt {row['dev_per_prompt']:.3f} overall "
                  f"{row['dev_overall']:.3f} dev acc {row['dev_acc']:.2f} ({row['seconds']:.0f}s)", flush=True)


def methods(args):
    names = [m.strip() for m in args.methods.split(",")] if args.methods else [m for m, _, _ in METHODS]
    unknown = set(names) - {m for m, _, _ in METHODS}
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; known: {', '.join(m for m, _, _ in METHODS)}")
    return [m for m in METHODS if m[0] in names]


def best_settings(out: Path) -> dict:
    rows = read_rows(out / "sweep.csv")
    best = {}
    for label, overrides, beta0 in METHODS:
        mine = [r for r in rows if r["method"] == label]
        if mine:
            r = max(mine, key=lambda r: float(r["dev_per_prompt"]))
            best[label] = {**overrides, "train.lr": float(r["lr"]), **({"train.beta": float(r["beta"])} if r["beta"] else {})}
    return best


def cmd_final(st: Study, args):
    path = st.out / "final.csv"
    done = {(r["method"], r["seed"]) for r in read_rows(path)}

    def verdicts(name, params, seed):  # cached beside the runs: a resumed study regenerates nothing
        f = st.work / f"final-{name.replace(' ', '_')}-s{seed}-ipp{args.ipp}-n{args.eval_limit}.npy"  # its settings
        if not f.is_file():
            np.save(f, st.verdicts(params, st.eval_file, args.ipp, None, seed))
        return np.load(f)

    ref_v = {s: verdicts("Reference", st.bb.params, s) for s in range(args.seeds)}  # one per sampling seed
    for seed in range(args.seeds):  # the reference against itself under other seeds: the noise floor
        if ("Reference", str(seed)) not in done:
            append_row(path, _final_row("Reference", {}, seed, ref_v[seed], ref_v[0] if seed else None, st))
    best = best_settings(st.out)
    # DDSPO's seeds first, then its two rivals of the claim seed by seed, then the rest seed by seed: a study
    # cut short still reports DDSPO with all its seeds and its rivals with as many as it reached.
    order = [(METHODS[0][0], s) for s in range(args.seeds)]
    order += [(m, s) for s in range(args.seeds) for m, _, _ in METHODS[1:3]]
    order += [(m, s) for s in range(args.seeds) for m, _, _ in METHODS[3:]]
    for label, seed in order:
        if label not in best or (label, str(seed)) in done:
            continue
        params, tr = st.train(best[label], seed, f"final-{label.replace(' ', '_')}-s{seed}")
        v = verdicts(label, params, seed)
        append_row(path, _final_row(label, best[label], seed, v, ref_v[seed], st, tr))
        print(f"final {label} seed {seed} done", flush=True)


def _final_row(label, overrides, seed, v, ref, st, tr=None) -> dict:
    from ddspo_jax.evaluate import tag_summary

    s = st.summary(v, st.eval_file)
    row = {"method": label, "seed": seed, "lr": overrides.get("train.lr", ""), "beta": overrides.get("train.beta", ""),
           **{k: f"{x:.4f}" for k, x in s.items()}}
    if ref is not None:  # paired against the reference under the same sampling seed (same noise)
        tags = st.prompt_set(st.eval_file)[2]
        p = tag_summary({"m": v, "r": ref}, tags)["paired"]
        d = v.mean(1) - ref.mean(1)
        half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
        row.update(paired_overall=f"{p['overall_difference']:+.4f}",
                   paired_overall_lo=f"{p['overall_difference_ci95'][0]:+.4f}",
                   paired_overall_hi=f"{p['overall_difference_ci95'][1]:+.4f}",
                   paired_per_prompt=f"{d.mean():+.4f}", paired_per_prompt_lo=f"{d.mean() - half:+.4f}",
                   paired_per_prompt_hi=f"{d.mean() + half:+.4f}")
    else:
        row.update({k: "" for k in ("paired_overall", "paired_overall_lo", "paired_overall_hi", "paired_per_prompt",
                                    "paired_per_prompt_lo", "paired_per_prompt_hi")})
    row.update(tr or {"train_loss": "", "train_acc": ""})
    return row


def cmd_ceiling(st: Study, args):
    """What the c vs c- contrast holds, without training: the reference sampled with its conditional
    prediction pushed away from its c- prediction, f(c) + lam (f(c) - f(c-)), under the model's CFG, on dev.
    DDSPO's losing term moves f_theta(x, c) away from f_ref(x, c-): if no lam of this explicit push raises
    dev alignment, the contrast the objective amplifies carries no alignment this model can express."""
    from ddspo_jax import sampling
    from ddspo_jax.backbones import generation_settings
    from ddspo_jax.configs.world import PROMPTS
    from ddspo_jax.data.perturb import Perturber, load_word_groups

    path = st.out / "study_ceiling.csv"
    done = {(r["strategy"], r["lam"], r["seed"]) for r in read_rows(path)}
    prompts, scorer, _ = st.prompt_set(st.dev_file)
    n, b, bb = len(prompts), 64, st.bb
    groups = load_word_groups(PROMPTS / "world_word_groups.json")
    rep = sampling.replicate(bb.params, st.mesh)
    for strategy in args.strategies.split(","):
        pert = Perturber({strategy: 1.0}, seed=st.cfg.seed, word_groups=groups,
                         frac_range=tuple(st.cfg.data.removal_range))
        negs = [pert(p, i).neg_prompt for i, p in enumerate(prompts)]
        for lam in (float(x) for x in args.lams.split(",")):
            for seed in range(args.seeds):
                if (strategy, str(lam), str(seed)) in done or (lam == 0.0 and strategy != "random_removal"):
                    continue
                gs = generation_settings(bb, seed=seed)

                def denoise(params, x, t, cond, lam=lam):
                    fc = bb.denoise(params, x, t, cond["c"])
                    return fc + lam * (fc - bb.denoise(params, x, t, cond["neg"])) if lam else fc
                sampler = sampling.make_sampler(denoise, bb.schedule, sampler=gs["sampler"], steps=gs["steps"],
                                                guidance=gs["guidance"], mesh=st.mesh, steps_offset=gs["steps_offset"],
                                                set_alpha_to_one=gs["set_alpha_to_one"])
                v = np.zeros((n, 1))
                for a in range(0, n, b):
                    idx = list(range(a, min(a + b, n)))
                    pad = idx + idx[-1:] * (b - len(idx))
                    c, neg = bb.encode([prompts[i] for i in pad]), bb.encode([negs[i] for i in pad])
                    u = {k: np.repeat(x, b, 0) for k, x in bb.negative_cond(1).items()}
                    noise = sampling.initial_noise(seed, pad, tuple(gs["latent_shape"]))
                    args_ = sampling.shard_batch(st.mesh, noise, {"c": c, "neg": neg}, {"c": u, "neg": u})
                    imgs = bb.decode(np.asarray(sampler(rep, *args_)))[:len(idx)]
                    v[idx, 0] = scorer.score(imgs, [prompts[i] for i in idx])
                s = st.summary(v, st.dev_file)
                append_row(path, {"strategy": strategy, "lam": lam, "seed": seed,
                                  **{f"dev_{k}": f"{x:.4f}" for k, x in s.items()}})
                print(f"ceiling {strategy} lam {lam} seed {seed}: {s}", flush=True)


def cmd_cfg(st: Study, args):
    """Does a fine-tune beat the reference at the reference's own best CFG, or only move the best CFG?"""
    path = st.out / "study_cfg.csv"
    done = {(r["method"], r["guidance"]) for r in read_rows(path)}
    best = best_settings(st.out)
    models = [("Reference", None)] + [(m, best[m]) for m in ("DDSPO", "Diffusion-DPO") if m in best]
    for label, o in models:
        params = st.bb.params if o is None else st.train(o, 0, f"cfg-{label.replace(' ', '_')}")[0]
        for g in (1.0, 2.0, 3.0, 5.0):
            if (label, str(g)) in done:
                continue
            s = st.summary(st.verdicts(params, st.dev_file, args.dev_ipp, g, 0), st.dev_file)
            append_row(path, {"method": label, "guidance": g, **{f"dev_{k}": f"{x:.4f}" for k, x in s.items()}})
            print(f"cfg {label} {g}: {s}", flush=True)


def cmd_direction(st: Study, args):
    """Where each method's best dev run moved the prediction f(x_t, c), on the dev pairs' winners: the change
    delta = f_theta - f_ref against the reference's guidance direction g = f_ref(c) - f_ref(empty) and its
    contrast direction h = f_ref(c) - f_ref(c-), per t. k = <delta, g> / |g|^2 is the extra CFG scale the
    change amounts to along g (DDSPO's loss pushes f_theta(x^l, c) away from f_ref(x^l, c-), i.e. along h)."""
    import jax
    import jax.numpy as jnp

    from ddspo_jax.data.loader import PairLoader
    from ddspo_jax.checkpoint import restore_trained_params

    with PairLoader(st.work / "dev_records", batch_size=args.dev_pairs, shuffle=False, num_epochs=1,
                    dtype="float32") as loader:
        b = next(loader)
    rows, sch = [], st.bb.schedule
    best = best_settings(st.out)
    sweep = {r["method"]: r for r in read_rows(st.out / "sweep.csv")}
    for label in best:
        o = best[label]
        name = f"sweep-{label.replace(' ', '_')}-lr{o['train.lr']:g}-b{o.get('train.beta', 0):g}"
        run = st.work / "runs" / name
        if not run.is_dir() or label not in sweep:
            continue
        params = restore_trained_params(run)[0]
        for t in [100, 300, 500, 700, 900]:
            noise = jax.random.normal(jax.random.key(t), b["x0_w"].shape)
            tt = jnp.full((len(noise),), t, jnp.int32)
            x, tm = sch.add_noise(jnp.asarray(b["x0_w"]), noise, tt), sch.model_timestep(tt)
            uncond = {k: np.repeat(v, len(noise), 0) for k, v in st.bb.negative_cond(1).items()}
            fc, fn, fu = (st.bb.denoise(st.bb.params, x, tm, cond) for cond in (b["cond_w"], b["cond_l"], uncond))
            delta = st.bb.denoise(params, x, tm, b["cond_w"]) - fc
            g, h = fc - fu, fc - fn
            flat = lambda a: np.asarray(a, np.float64).reshape(len(a), -1)  # noqa: E731
            d_, g_, h_ = flat(delta), flat(g), flat(h)
            cos = lambda a, c: float(np.mean(np.sum(a * c, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(c, axis=1) + 1e-20)))  # noqa: E731
            rows.append({"method": label, "t": t, "rel_change": float(np.linalg.norm(d_) / np.linalg.norm(flat(fc))),
                         "cos_guidance": cos(d_, g_), "cos_contrast": cos(d_, h_),
                         "extra_cfg": float(np.sum(d_ * g_) / np.sum(g_ * g_))})
            print(rows[-1], flush=True)
    with open(st.out / "study_direction.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def cmd_report(out: Path, seeds: int) -> str:
    """The study's tables (markdown) from the CSVs, and study.png: per method mean +- std over seeds of the
    held-out overall and per-prompt accuracy, the paired differences from the reference, and the noise floor.
    Needs no model: `python benchmarks/world_study.py report`."""
    lines = []
    final = read_rows(out / "final.csv")
    tags = [k for k in (final[0] if final else {}) if k not in ("method", "seed", "lr", "beta", "overall", "per_prompt",
                                                                  "train_loss", "train_acc")
            and not k.startswith("paired")]
    methods = list(dict.fromkeys(r["method"] for r in final))
    ms = lambda v: f"{np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}"  # noqa: E731
    lines.append("| method | lr | β | seeds | overall | per-prompt | paired overall [95 %] per seed | paired per-prompt "
                 "(mean over seeds) | " + " | ".join(tags) + " |")
    lines.append("|---|---|---|---|---|---|---|---|" + "---|" * len(tags))
    for m in methods:
        rs = [r for r in final if r["method"] == m]
        f = lambda k: [float(r[k]) for r in rs if r[k] != ""]  # noqa: E731
        paired = "; ".join(f"{float(r['paired_overall']):+.3f} [{float(r['paired_overall_lo']):+.3f}, "
                           f"{float(r['paired_overall_hi']):+.3f}]" for r in rs if r["paired_overall"])
        pp = f(("paired_per_prompt"))
        lines.append(f"| {m} | {rs[0]['lr'] or '—'} | {rs[0]['beta'] or '—'} | {len(rs)} | {ms(f('overall'))} | "
                     f"{ms(f('per_prompt'))} | {paired or '(reference seeds vs seed 0)'} | "
                     f"{(f'{np.mean(pp):+.4f}' if pp else '—')} | " + " | ".join(ms(f(t)) for t in tags) + " |")
    sweep = read_rows(out / "sweep.csv")
    ref = [r for r in read_rows(out / "study_reference.csv") if r["guidance"] == "5.0"]
    if sweep:
        lines += ["", "Dev sweep (per-prompt accuracy on world_dev.jsonl, one image per prompt, seed 0; the reference "
                  f"scores {ref[0]['dev_per_prompt'] if ref else '?'} under the same noise):", "",
                  "| method | lr | β | dev per-prompt | dev overall | held-out pair acc | held-out pair loss | "
                  "train acc | weights moved |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['lr']} | {r['beta'] or '—'} | {float(r['dev_per_prompt']):.3f} | "
                  f"{float(r['dev_overall']):.3f} | {float(r['dev_acc']):.2f} | {float(r['dev_loss']):.4f} | "
                  f"{float(r['train_acc']) if r['train_acc'] not in ('', 'nan') else float('nan'):.2f} | "
                  f"{float(r['moved']):.1e} |" for r in sweep]
        _sweep_figure(sweep, float(ref[0]["dev_per_prompt"]) if ref else None, out / "sweep.png")
    text = "\n".join(lines)
    if final:
        _study_figure(final, methods, out / "study.png")
    return text


def _sweep_figure(rows, ref, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    for j, m in enumerate(dict.fromkeys(r["method"] for r in rows)):
        pts = sorted((float(r["lr"]), float(r["dev_per_prompt"])) for r in rows if r["method"] == m
                     and (not r["beta"] or float(r["beta"]) == float(next(q["beta"] for q in rows if q["method"] == m))))
        ax.plot(*zip(*pts), "o-", label=m, color=f"C{j}", ms=4)
    if ref is not None:
        ax.axhline(ref, color="k", ls="--", lw=1, label="reference")
    ax.set_xscale("log")
    ax.set_xlabel("lr (at each method's paper beta)")
    ax.set_ylabel("dev per-prompt accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _study_figure(rows, methods, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, title in ((axes[0], "overall", "held-out GenEval overall"),
                           (axes[1], "per_prompt", "held-out per-prompt accuracy")):
        for j, m in enumerate(methods):
            v = [float(r[key]) for r in rows if r["method"] == m]
            ax.scatter([j] * len(v), v, s=14, color="C0" if m == "Reference" else "C1")
            ax.errorbar(j + 0.15, np.mean(v), yerr=np.std(v, ddof=1) if len(v) > 1 else 0, fmt="o", color="k", ms=4)
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=("diag", "sweep", "final", "cfg", "direction", "ceiling", "report"))
    ap.add_argument("--out", default="docs/world")
    ap.add_argument("--work", default="runs/study")
    ap.add_argument("--perturb", default="random_removal", choices=("random_removal", "word_swap"),
                    help="c -> c- for every method's records (give each its own --work and --out)")
    ap.add_argument("--model", default="", help="the world model folder (default: configs/world.py's, the shipped one)")
    ap.add_argument("--strategies", default="random_removal,word_swap", help="ceiling: c- strategies")
    ap.add_argument("--lams", default="0,0.05,0.1,0.2,0.5,1,2,4", help="ceiling: push sizes")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--dev-pairs", type=int, default=64, help="dev pairs for the held-out loss / accuracy")
    ap.add_argument("--dev-ipp", type=int, default=1, help="images per dev prompt")
    ap.add_argument("--ipp", type=int, default=4, help="images per held-out prompt in the final table")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default="", help="comma-separated subset of the methods (default: all)")
    ap.add_argument("--lrs", default=LRS, help="the sweep's lr grid")
    ap.add_argument("--beta-factors", default="0.5,2", help="beta multiples tried at each method's best lr")
    ap.add_argument("--dev-limit", type=int, default=0, help="score only the first N dev prompts (0: all)")
    ap.add_argument("--eval-limit", type=int, default=0, help="score only the first N held-out prompts (0: all)")
    args = ap.parse_args(argv)
    if args.cmd == "report":  # tables and figure from the CSVs only
        print(cmd_report(Path(args.out), args.seeds))
        return 0
    st = Study(args)
    print(f"prepare: {args.steps * args.batch} pairs in {st.prepare_s:.0f}s", flush=True)
    {"diag": cmd_diag, "sweep": cmd_sweep, "final": cmd_final, "cfg": cmd_cfg,
     "direction": cmd_direction, "ceiling": cmd_ceiling}[args.cmd](st, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
