"""LoRA on the attention projections: the forward computes x W + (alpha / r) (x A) B.

The trainable tree holds low-rank factors per targeted kernel (B starts at zero, as PEFT does, so a fine-tune
starts exactly at the reference). `forward(factors, alpha)` is a Flax method interceptor: inside it, every
targeted `nn.Dense` adds its low-rank term to the frozen base's output, so the base weights are the
reference's own (gathered per block under fsdp, in the compute dtype), no merged weight is formed and
gradients exist for the factors only. `merge` forms W + (alpha / r) A B for export.

Groups: with factors stacked on a leading axis [G, ...] (`stack`), the batch is split into G equal parts and
part g gets adapter g — one UNet call evaluates several adapters (DD-CPP's winning and losing policies, and
the reference as a zero adapter).
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddspo_jax.errors import ConfigError
from ddspo_jax.models.layers import block_inputs

TARGETS = ("to_q", "to_k", "to_v", "to_out_0")
SEP = "__"  # path separator inside the flat LoRA dict (Orbax-safe names)


def _paths(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _paths(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def target_paths(params, targets=TARGETS) -> list[tuple[str, ...]]:
    """Every 2-D `kernel` whose module name is one of `targets` (the attention projections)."""
    return [p for p, v in _paths(params) if p[-1] == "kernel" and len(p) > 1 and p[-2] in targets and v.ndim == 2]


def init(params, rank: int, key, targets=TARGETS, a_std: str = "fan_in") -> dict:
    """{"down_blocks_0__...__to_q": {"a": [in, r], "b": [r, out]}}; B = 0; A ~ N(0, 1/in) ("fan_in"), or
    N(0, (1/r)^2) ("rank": PEFT's init_lora_weights="gaussian", what the release's SANA LoRA uses)."""
    paths = target_paths(params, targets)
    if not paths:
        raise ConfigError(f"no LoRA targets ({', '.join(targets)}) found in the parameter tree")
    if a_std not in ("fan_in", "rank"):
        raise ValueError(f"a_std must be 'fan_in' or 'rank', got {a_std!r}")
    out = {}
    for i, p in enumerate(paths):
        kernel = _get(params, p)
        d_in, d_out = kernel.shape
        std = 1.0 / jnp.sqrt(d_in) if a_std == "fan_in" else 1.0 / rank
        a = jax.random.normal(jax.random.fold_in(key, i), (d_in, rank), jnp.float32) * std
        out[SEP.join(p[:-1])] = {"a": a, "b": jnp.zeros((rank, d_out), jnp.float32)}
    return out


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def merge(base, lora: dict, alpha: float) -> dict:
    """base with W + (alpha / r) A B on every LoRA target (pure; jit- and grad-friendly). For export."""
    out = jax.tree.map(lambda x: x, base)  # new containers, shared leaves
    for name, f in lora.items():
        path = tuple(name.split(SEP)) + ("kernel",)
        node = out
        for k in path[:-1]:
            node[k] = dict(node[k])
            node = node[k]
        w = node["kernel"]
        rank = f["a"].shape[-1]
        node["kernel"] = (w.astype(jnp.float32) + (alpha / rank) * (f["a"] @ f["b"])).astype(w.dtype)
    return out


def stack(*adapters) -> dict:
    """Adapters (None: a zero adapter, the base model itself) -> factors with a leading group axis."""
    ref = next(a for a in adapters if a is not None)
    zero = jax.tree.map(jnp.zeros_like, ref)
    return jax.tree.map(lambda *xs: jnp.stack(xs), *[zero if a is None else a for a in adapters])


def _delta(x, f, scale, groups: bool):
    a, b = f["a"].astype(x.dtype), f["b"].astype(x.dtype)
    if not groups:
        return scale * ((x @ a) @ b)
    g = a.shape[0]
    if x.shape[0] % g:
        raise ValueError(f"a batch of {x.shape[0]} cannot be split into {g} LoRA groups")
    xg = x.reshape((g, x.shape[0] // g) + x.shape[1:])
    flat = xg.reshape(g, -1, x.shape[-1])
    out = jnp.einsum("gnr,gro->gno", jnp.einsum("gni,gir->gnr", flat, a), b)
    return scale * out.reshape(x.shape[:-1] + (b.shape[-1],))


_ACTIVE: list = []  # the forward contexts entered, innermost last: only the innermost one intercepts


@contextlib.contextmanager
def forward(factors: dict | None, alpha: float):
    """Inside this context every Flax `nn.Dense` named in `factors` returns x W + b + (alpha / r)(x A) B.

    `factors` as `init` makes them, or stacked (`stack`) for one adapter per equal batch group. A gathered
    block (models.layers.unit under fsdp) receives the factors below its path as explicit inputs and runs
    inside a nested `forward` of them named relative to the block (layers.block_inputs), so the factors are
    differentiated through its custom VJP and its gathers stay tied."""
    if not factors:
        yield
        return
    groups = next(iter(factors.values()))["a"].ndim == 3
    token = object()

    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if _ACTIVE[-1] is not token or context.method_name != "__call__" or not isinstance(mod, nn.Dense):
            return next_fun(*args, **kwargs)
        f = factors.get(SEP.join(mod.path))
        y = next_fun(*args, **kwargs)
        if f is None:
            return y
        return y + _delta(args[0], f, alpha / f["a"].shape[-1], groups).astype(y.dtype)

    def below(path: tuple[str, ...]):
        if _ACTIVE[-1] is not token:
            return None
        n = len(path)
        sub = {SEP.join(k[n:]): f for k, f in ((tuple(name.split(SEP)), f) for name, f in factors.items())
               if k[:n] == path and len(k) > n}
        return (sub, lambda v: forward(v, alpha)) if sub else None

    _ACTIVE.append(token)
    try:
        with nn.intercept_methods(intercept), block_inputs(below):
            yield
    finally:
        _ACTIVE.remove(token)


def count(lora: dict) -> int:
    return sum(x.size for x in jax.tree.leaves(lora))


def peft_state_dict(lora: dict, alpha: float, module_name, prefix: str = "unet.") -> dict[str, np.ndarray]:
    """The factors as a diffusers LoRA file (`pytorch_lora_weights.safetensors`, PEFT key names):
    `<prefix><module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], with alpha / r folded into B
    (loaders take alpha = r for PEFT-format files without metadata). `module_name(flax_module_path)` is the
    family's key table naming (convert.export_lora)."""
    out = {}
    for name, f in lora.items():
        module = module_name(tuple(name.split(SEP)))
        a, b = np.asarray(f["a"], np.float32), np.asarray(f["b"], np.float32)
        out[f"{prefix}{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        out[f"{prefix}{module}.lora_B.weight"] = np.ascontiguousarray((alpha / a.shape[-1] * b).T)
    return out
