"""The paper's 2D toy experiment (Sec. 4.1, Fig. 1 and Fig. A): `python -m ddspo_jax.toy`.

K Gaussian modes on a circle, class = mode. A reference denoiser is trained on a *noisy* version
(a fraction of samples carry a neighbouring class's label). Preference pairs per class take x_0^w from
the true class c and x_0^l from a neighbouring class c-. Copies of the reference are fine-tuned with
D-DPO, DSPO and DDSPO through `ddspo_jax.losses.preference_loss` and `ddspo_jax.schedules` (no second
copy of either here); the fine-tunes for all seeds and betas of one (method, N) cell run as one
`jax.vmap`-ed, jitted `lax.scan`.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np

from absl import app, flags

from ddspo_jax.config import define_config_flag, load_config_flag
from ddspo_jax.errors import user_exits

from ddspo_jax.configs import path as _config_path  # noqa: E402

# The package's JAX-importing modules are imported inside the functions that use them: `--help` and a
# mistyped argument answer in ~0.4 s instead of ~4 s (JAX, Flax, Orbax start-up, measured on 2 cores);
# tests/test_structure.py checks that every function-local import is one of those.

_CONFIG = define_config_flag(str(_config_path("toy")))
_QUICK = flags.DEFINE_bool("quick", False, "Tiny settings for the test suite (seconds, not minutes).")


def toy_schedule(cfg):
    from ddspo_jax.schedules import DDPMSchedule
    # Linear betas reaching acp_T ~ e^-10 over the toy's T steps.
    return DDPMSchedule(cfg.num_train_timesteps, "linear", 1e-4, 20.0 / cfg.num_train_timesteps)


def mode_centers(cfg) -> np.ndarray:
    a = 2 * np.pi * np.arange(cfg.n_modes) / cfg.n_modes
    return (cfg.radius * np.stack([np.cos(a), np.sin(a)], -1)).astype(np.float32)


def sample_class(rng: np.random.Generator, cfg, labels: np.ndarray) -> np.ndarray:
    """Ground-truth samples of the given classes."""
    return (mode_centers(cfg)[labels] + cfg.mode_std * rng.standard_normal((len(labels), 2))).astype(np.float32)


def noisy_dataset(rng, cfg, n):
    """Samples with a fraction of labels moved to a neighbouring class (imperfect supervision, Fig. 1b)."""
    true = rng.integers(0, cfg.n_modes, n)
    x = sample_class(rng, cfg, true)
    flip = rng.random(n) < cfg.label_noise
    shift = rng.choice([-1, 1], n)
    labels = np.where(flip, (true + shift) % cfg.n_modes, true)
    return x, labels


def neighbour(rng, cfg, labels):
    return (labels + rng.choice([-1, 1], len(labels))) % cfg.n_modes


def make_denoiser(cfg):
    import flax.linen as nn
    import jax.numpy as jnp

    class Denoiser(nn.Module):
        """eps_theta(x_t, t, class): a small MLP with sinusoidal timestep and learned class embeddings."""
        hidden: int
        n_classes: int

        @nn.compact
        def __call__(self, x, t, c):
            half = 16
            freqs = jnp.exp(-jnp.log(1000.0) * jnp.arange(half) / half)
            arg = t.astype(jnp.float32)[:, None] * freqs[None]
            temb = nn.Dense(self.hidden)(jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], -1))
            cemb = nn.Embed(self.n_classes, self.hidden)(c)
            h = nn.Dense(self.hidden)(x) + temb + cemb
            for _ in range(3):
                h = h + nn.Dense(self.hidden)(nn.silu(nn.Dense(self.hidden)(nn.silu(h))))
            return nn.Dense(2)(nn.silu(h))

    return Denoiser(cfg.hidden, cfg.n_modes)


def train_reference(cfg, model, schedule, x, labels, key):
    import jax
    import jax.numpy as jnp
    import optax

    params = model.init(key, x[:2], jnp.zeros(2, jnp.int32), labels[:2])["params"]
    tx = optax.adam(optax.cosine_decay_schedule(cfg.ref_lr, cfg.ref_steps))
    x, labels = jnp.asarray(x), jnp.asarray(labels)

    def step(carry, k):
        params, opt = carry
        k1, k2, k3 = jax.random.split(k, 3)
        idx = jax.random.randint(k1, (cfg.ref_batch,), 0, len(x))
        t = schedule.sample_timesteps(k2, (cfg.ref_batch,))
        noise = jax.random.normal(k3, (cfg.ref_batch, 2))

        def loss_fn(p):
            pred = model.apply({"params": p}, schedule.add_noise(x[idx], noise, t), t, labels[idx])
            return jnp.mean((pred - noise) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return (optax.apply_updates(params, upd), opt), loss

    (params, _), losses = jax.jit(lambda c, ks: jax.lax.scan(step, c, ks))(
        (params, tx.init(params)), jax.random.split(key, cfg.ref_steps))
    return params, float(losses[-100:].mean())


def finetune_fn(cfg, model, schedule, objective):
    """(params0, key, beta, pairs) -> fine-tuned params; vmapped over seeds x betas by the caller."""
    import jax
    import optax

    from ddspo_jax.losses import NEEDS_REF_NEG, preference_loss

    tx = optax.adam(cfg.ft_lr)
    apply = lambda p, x, t, c: model.apply({"params": p}, x, t, c)

    def run(params0, key, beta, pairs):
        x0_w, x0_l, c, c_neg = pairs
        n = x0_w.shape[0]

        def step(carry, k):
            params, opt = carry
            k1, k2, k3 = jax.random.split(k, 3)
            idx = jax.random.randint(k1, (cfg.ft_batch,), 0, n)
            t = schedule.sample_timesteps(k2, (cfg.ft_batch,))
            noise = jax.random.normal(k3, (cfg.ft_batch, 2))  # shared by both members of a pair
            xw = schedule.add_noise(x0_w[idx], noise, t)
            xl = schedule.add_noise(x0_l[idx], noise, t)
            ci, cni = c[idx], c_neg[idx]
            ref_w, ref_l = apply(params0, xw, t, ci), apply(params0, xl, t, ci)
            ref_neg_l = apply(params0, xl, t, cni) if objective in NEEDS_REF_NEG else None
            target = schedule.training_target(x0_w[idx], noise, t)

            def loss_fn(p):
                return preference_loss(objective, model_w=apply(p, xw, t, ci), model_l=apply(p, xl, t, ci),
                                       ref_w=ref_w, ref_l=ref_l, target_w=target, target_l=target,
                                       ref_neg_l=ref_neg_l, beta=beta)

            (loss, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
            upd, opt = tx.update(g, opt, params)
            return (optax.apply_updates(params, upd), opt), m["implicit_acc"]

        (params, _), acc = jax.lax.scan(step, (params0, tx.init(params0)), jax.random.split(key, cfg.ft_steps))
        return params, acc[-20:].mean()

    return jax.jit(jax.vmap(run, in_axes=(None, 0, 0, 0)))


def sampler_fn(cfg, model, schedule):
    """Deterministic DDIM sampling with the schedule's own step (x_T ~ N(0, I))."""
    import jax
    import jax.numpy as jnp

    ts = schedule.ddim_timesteps(cfg.sample_steps, steps_offset=0)
    prev = np.append(ts[1:], -1)

    def sample(params, key, labels):
        x = jax.random.normal(key, (labels.shape[0], 2))

        def body(x, tt):
            t, tp = tt
            tb, tpb = jnp.full(labels.shape, t), jnp.full(labels.shape, tp)
            eps = model.apply({"params": params}, x, tb, labels)
            return schedule.ddim_step(eps, tb, tpb, x, set_alpha_to_one=True), None

        x, _ = jax.lax.scan(body, x, (jnp.asarray(ts), jnp.asarray(prev)))
        return x

    return jax.jit(jax.vmap(sample, in_axes=(0, 0, None))), jax.jit(sample)


def class_metrics(cfg, x: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(fraction of samples nearest to their own mode, mean distance to the own mode)."""
    centers = mode_centers(cfg)
    d = np.linalg.norm(x[:, None, :] - centers[None], axis=-1)
    return float(np.mean(d.argmin(1) == labels)), float(np.mean(d[np.arange(len(x)), labels]))


def quick(cfg):
    with cfg.unlocked():
        cfg.toy.ref_steps, cfg.toy.ref_samples, cfg.toy.ft_steps = 400, 4000, 40
        cfg.toy.n_pairs, cfg.toy.betas, cfg.toy.seeds = (12, 120), (200.0, 800.0), 2
        cfg.toy.eval_samples, cfg.toy.sample_steps, cfg.toy.ft_batch = 240, 20, 64
    return cfg


def run(cfg, out_dir: Path, log=print) -> list[dict]:
    """The whole sweep; returns the table rows (also written to out_dir/toy_results.csv, toy_figure.png)."""
    import jax
    import jax.numpy as jnp

    tc = cfg.toy
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    key = jax.random.key(cfg.seed)
    schedule, model = toy_schedule(tc), make_denoiser(tc)

    t0 = time.time()
    x_noisy, y_noisy = noisy_dataset(rng, tc, tc.ref_samples)
    ref_params, ref_loss = train_reference(tc, model, schedule, x_noisy, y_noisy, jax.random.fold_in(key, 0))
    log(f"reference trained: {tc.ref_steps} steps, final loss {ref_loss:.4f} ({time.time() - t0:.1f}s)")

    eval_labels = np.arange(tc.eval_samples) % tc.n_modes
    sample_many, sample_one = sampler_fn(tc, model, schedule)
    eval_key = jax.random.fold_in(key, 1)
    ref_x = np.asarray(sample_one(ref_params, eval_key, jnp.asarray(eval_labels)))
    acc, dist = class_metrics(tc, ref_x, eval_labels)
    rows = [dict(method="reference", n_pairs=0, beta=0.0, acc_mean=acc, acc_std=0.0, dist_mean=dist,
                 dist_std=0.0, train_implicit_acc=float("nan"), seeds=1)]
    samples = {"reference": ref_x}

    S, B = tc.seeds, len(tc.betas)
    for method in tc.methods:
        ft = finetune_fn(tc, model, schedule, method)
        for n in tc.n_pairs:
            t1 = time.time()
            # Pairs per seed: c uniform over classes, x_0^w from c, x_0^l from a neighbour c-.
            pairs = []
            for s in range(S):
                prng = np.random.default_rng([cfg.seed, n, s])
                c = np.arange(n) % tc.n_modes
                c_neg = neighbour(prng, tc, c)
                pairs.append((sample_class(prng, tc, c), sample_class(prng, tc, c_neg), c, c_neg))
            stacked = tuple(np.repeat(np.stack([p[i] for p in pairs]), B, axis=0) for i in range(4))
            betas = np.tile(np.asarray(tc.betas, np.float32), S)
            keys = jax.random.split(jax.random.fold_in(key, 1000 + n), S * B)
            params, train_acc = ft(ref_params, keys, jnp.asarray(betas), tuple(map(jnp.asarray, stacked)))
            xs = np.asarray(sample_many(params, jax.random.split(eval_key, S * B), jnp.asarray(eval_labels)))
            train_acc = np.asarray(train_acc)
            for bi, beta in enumerate(tc.betas):
                idx = [s * B + bi for s in range(S)]
                m = np.array([class_metrics(tc, xs[i], eval_labels) for i in idx])
                rows.append(dict(method=method, n_pairs=n, beta=float(beta), acc_mean=m[:, 0].mean(),
                                 acc_std=m[:, 0].std(), dist_mean=m[:, 1].mean(), dist_std=m[:, 1].std(),
                                 train_implicit_acc=float(train_acc[idx].mean()), seeds=S))
                samples[(method, n, float(beta))] = xs[idx[0]]
            log(f"{method:>6} N={n:<5} {S} seeds x {B} betas fine-tuned and sampled ({time.time() - t1:.1f}s)")

    _write_csv(rows, out_dir / "toy_results.csv")
    _figure(tc, x_noisy, y_noisy, samples, eval_labels, out_dir / "toy_figure.png")
    log(format_table(rows))
    log(f"wrote {out_dir / 'toy_results.csv'} and {out_dir / 'toy_figure.png'} ({time.time() - t0:.0f}s in all)")
    return rows


def format_table(rows) -> str:
    head = f"{'method':>9} {'N':>5} {'beta':>6} | {'class acc':>15} | {'dist to own mode':>17} | train acc"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:>9} {r['n_pairs']:>5} {r['beta']:>6.0f} | {r['acc_mean']:.3f} ± {r['acc_std']:.3f}"
                     f"   | {r['dist_mean']:.3f} ± {r['dist_std']:.3f}     | {r['train_implicit_acc']:.2f}")
    return "\n".join(lines)


def _write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _figure(tc, x_noisy, y_noisy, samples, labels, path):
    """Laid out like Fig. A: one row per (method, N), one column per beta; the top row shows the
    ground truth, the noisy training data and the reference model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(m, n) for m in tc.methods for n in tc.n_pairs]
    ncol = max(3, len(tc.betas))
    fig, axes = plt.subplots(len(rows) + 1, ncol, figsize=(2.2 * ncol, 2.2 * (len(rows) + 1)), squeeze=False)
    lim = tc.radius + 4 * tc.mode_std + 0.5
    rng = np.random.default_rng(0)
    gt = sample_class(rng, tc, labels)
    top = [("ground truth", gt, labels), ("noisy training data", x_noisy[:len(labels)], y_noisy[:len(labels)]),
           ("reference", samples["reference"], labels)]
    panels = [(0, j, *top[j]) for j in range(3)]
    for i, (m, n) in enumerate(rows, start=1):
        for j, beta in enumerate(tc.betas):
            panels.append((i, j, f"{m} N={n} β={beta:g}", samples[(m, n, float(beta))], labels))
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([]), ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim), ax.set_aspect("equal")
    for i, j, title, x, y in panels:
        axes[i, j].scatter(x[:, 0], x[:, 1], c=y, cmap="tab10", s=2, vmin=0, vmax=9)
        axes[i, j].set_title(title, fontsize=7)
    for ax in axes[0, 3:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

    with user_exits():
        cfg = load_config_flag(_CONFIG.value)
        if _QUICK.value:
            cfg = quick(cfg)
        run(cfg, Path(cfg.output_dir))


if __name__ == "__main__":
    app.run(main)
