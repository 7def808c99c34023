"""The optimizers the authors ran, with their exact semantics: AdamW (torch) and Adafactor (transformers).

The release (KU-MIIL/DDSPO `ddspo/train.py`, after Diffusion-DPO's trainer) builds
  * `torch.optim.AdamW(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)` with
    `clip_grad_norm_(max_grad_norm=1.0)` before each step, or, with `--use_adafactor`,
  * `transformers.Adafactor(lr, scale_parameter=False, relative_step=False, warmup_init=False,
    clip_threshold=1.0, weight_decay=1e-2)` and *no* global-norm clipping (Adafactor clips each update's
    RMS itself),
both under diffusers' `constant_with_warmup` schedule (the first update has lr 0, as torch's LambdaLR).

optax's own `adafactor` differs (it multiplies by the parameter scale, has no weight decay and factors only
dims >= 128), so `hf_adafactor` below is transformers' algorithm written as an optax transformation.
transformers factors a >= 2-D tensor over its *last two PyTorch dims* (for a conv OIHW: H and W); our
parameters are in Flax layout (convert/common.to_flax_layout: linear (out, in) -> (in, out), conv OIHW ->
HWIO), so `torch_factor_axes` maps those two dims to our axes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def lr_schedule(peak: float, warmup_steps: int) -> optax.Schedule:
    """diffusers' constant_with_warmup: linear from 0 over `warmup_steps` updates, then constant."""
    if warmup_steps <= 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)],
                                [warmup_steps])


def torch_factor_axes(x) -> tuple[int, int] | None:
    """(our axis of PyTorch's dim -1, our axis of PyTorch's dim -2) for a Flax-layout parameter; None for
    1-D tensors (not factored). 2-D: (in, out) is PyTorch's (out, in) transposed; 4-D: HWIO from OIHW."""
    if x.ndim < 2:
        return None
    if x.ndim == 2:
        return (0, 1)
    if x.ndim == 4:
        return (1, 0)
    return (x.ndim - 1, x.ndim - 2)  # no other layout exists in the ports; same order as PyTorch


class AdafactorState(NamedTuple):
    count: jax.Array
    row: Any  # per leaf: running mean of g^2 over PyTorch's last dim (keepdims), or a () placeholder
    col: Any  # ... over PyTorch's second-to-last dim
    full: Any  # unfactored second moment (1-D leaves), or a () placeholder


def hf_adafactor(learning_rate: optax.ScalarOrSchedule, *, weight_decay: float = 0.0, clip_threshold: float = 1.0,
                 decay_rate: float = -0.8, eps: float = 1e-30) -> optax.GradientTransformation:
    """transformers.Adafactor(scale_parameter=False, relative_step=False, warmup_init=False, beta1=None)."""
    sched = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
    empty = lambda: jnp.zeros((), jnp.float32)  # noqa: E731

    def init(params):
        def row(p):
            a = torch_factor_axes(p)
            return empty() if a is None else jnp.zeros(_keep(p.shape, a[0]), jnp.float32)

        def col(p):
            a = torch_factor_axes(p)
            return empty() if a is None else jnp.zeros(_keep(p.shape, a[1]), jnp.float32)

        def full(p):
            return jnp.zeros(p.shape, jnp.float32) if torch_factor_axes(p) is None else empty()

        return AdafactorState(jnp.zeros((), jnp.int32), jax.tree.map(row, params), jax.tree.map(col, params),
                              jax.tree.map(full, params))

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("hf_adafactor needs params (weight decay and the parameter's layout)")
        step = state.count + 1
        beta2t = 1.0 - step.astype(jnp.float32) ** decay_rate
        lr = sched(state.count)

        def one(g, p, row, col, full):
            g = g.astype(jnp.float32)
            sq = g * g + eps
            a = torch_factor_axes(p)
            if a is None:
                full = beta2t * full + (1 - beta2t) * sq
                u = g * jax.lax.rsqrt(full)
            else:
                ar, ac = a
                row = beta2t * row + (1 - beta2t) * jnp.mean(sq, axis=ar, keepdims=True)
                col = beta2t * col + (1 - beta2t) * jnp.mean(sq, axis=ac, keepdims=True)
                r = jax.lax.rsqrt(row / jnp.mean(row, axis=ac, keepdims=True))
                u = g * r * jax.lax.rsqrt(col)
            rms = jnp.sqrt(jnp.mean(u * u))
            u = u / jnp.maximum(1.0, rms / clip_threshold)
            upd = -lr * u - (weight_decay * lr) * p.astype(jnp.float32)
            return upd.astype(p.dtype), row, col, full

        out = jax.tree.map(one, grads, params, state.row, state.col, state.full)
        leaves = lambda i: jax.tree.map(lambda o: o[i], out, is_leaf=lambda o: isinstance(o, tuple))  # noqa: E731
        return leaves(0), AdafactorState(step, leaves(1), leaves(2), leaves(3))

    return optax.GradientTransformation(init, update)


def _keep(shape, axis):
    return tuple(1 if i == axis else d for i, d in enumerate(shape))


def make_optimizer(cfg, lr: float) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, lr schedule) as the release builds them (module docstring). `train.grad_clip` is the
    global-norm clip for AdamW and Adafactor's per-update clip_threshold."""
    t = cfg.train
    sched = lr_schedule(lr, t.warmup_steps)
    if t.optimizer == "adamw":
        opt = optax.adamw(sched, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps, weight_decay=t.weight_decay)
        return (optax.chain(optax.clip_by_global_norm(t.grad_clip), opt) if t.grad_clip > 0 else opt), sched
    return hf_adafactor(sched, weight_decay=t.weight_decay, clip_threshold=t.grad_clip if t.grad_clip > 0 else float("inf")), sched
