"""Building blocks shared by the UNet and the VAE (NHWC, diffusers module names).

Module and parameter names mirror diffusers' (`conv1`, `norm1`, `time_emb_proj`, `to_q`, `to_out_0`,
...) so the converters' key tables stay tiny. Dtype policy everywhere: parameters in `param_dtype`,
matmuls/convs in `dtype`, normalisation and softmax in float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

Dtype = Any

ATTENTION_IMPLS = (None, "auto", "xla", "cudnn", "chunked", "pallas")

# `model.remat_policy` -> what a block (a ResNet or transformer block, the unit of remat and of the fsdp
# gather) keeps for the backward pass. "full" also checkpoints the whole denoiser call (backbones).
REMAT_POLICIES: dict[str, Optional[Callable]] = {
    "none": None,                                              # keep everything (no recompute)
    "dots_saveable": jax.checkpoint_policies.dots_saveable,    # keep matmul/conv outputs, recompute the rest
    "block": jax.checkpoint_policies.nothing_saveable,         # keep only each block's inputs
    "full": jax.checkpoint_policies.nothing_saveable,          # block + the whole forward recomputed
}


def check_remat_policy(policy: str) -> str:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={policy!r} is not one of {list(REMAT_POLICIES)}")
    return policy


def unit(module_cls, policy: str, gather=None, path: tuple[str, ...] = ()):
    """A block as the unit of rematerialisation and of the fsdp gather.

    With `gather` (a `parallel.Gather`, set only inside the train step's shard_map) the block's parameter
    shards are all-gathered in the compute dtype when it runs, so the whole weights live only while the
    block runs, and the backward pass gathers them again (`tied_remat`). With policy "none" only the
    gathered weights are recomputed (saved: everything else). Param names are unaffected."""
    check_remat_policy(policy)
    if gather is None:
        return module_cls if policy == "none" else nn.remat(module_cls, policy=REMAT_POLICIES[policy])
    keep = REMAT_POLICIES[policy] or jax.checkpoint_policies.save_anything_except_these_names("fsdp_gathered")
    init_fields = [f.name for f in dataclasses.fields(module_cls) if f.init and f.name not in ("parent", "name")]

    class Gathered(module_cls):
        def __call__(self, *args):
            inner = module_cls(**{k: getattr(self, k) for k in init_fields}, parent=None)
            extras = [e for e in (p(tuple(self.path)) for p in _BLOCK_INPUTS) if e is not None]

            def run(tree, *a):
                shards, values = tree
                with contextlib.ExitStack() as stack:
                    for (_, enter), v in zip(extras, values):
                        stack.enter_context(enter(v))
                    return inner.apply({"params": gather(shards, path)}, *a)

            return tied_remat(run, keep, (self.variables["params"], tuple(v for v, _ in extras)), *args)

    Gathered.__name__ = Gathered.__qualname__ = module_cls.__name__
    return Gathered


_BLOCK_INPUTS: list = []


@contextlib.contextmanager
def block_inputs(provider):
    """Inside: each gathered unit at module path P asks `provider(P)` for None or (values, enter).

    For code that makes blocks read differentiated values that are not their inputs (LoRA's forward
    interceptor adds (x A) B with the trainable factors inside each Dense): a custom VJP differentiates only
    its arguments, and `tied_remat` applies the block outside its Flax scope. So `values` (a pytree, e.g. the
    factors of the Dense layers under P) is passed to the unit explicitly, and the block's body runs inside
    `enter(values)`, where module paths are relative to P."""
    _BLOCK_INPUTS.append(provider)
    try:
        yield
    finally:
        _BLOCK_INPUTS.remove(provider)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def tied_remat(run, keep, shards, *args):
    """run(shards, *args) as `jax.checkpoint(run, policy=keep)`, with each gather tied to when it is needed.

    Why: a block's all-gather depends on its parameter shards only, so a scheduler may start it (and keep
    its result) long before the block runs, and the backward pass's recomputation depends only on saved
    inputs, so it may be hoisted too, or merged with the forward's identical computation once XLA:CPU has
    dropped the optimisation barriers (it does, before CSE: at SD-1.5 fsdp 8 the forward's gathered weights
    stayed alive into the backward pass). Here the forward pass's shards depend on the block's input and the
    backward pass's residuals on the incoming cotangent (`_after`), so neither can run before its turn."""
    return run(_after(shards, args), *args)


def _after(tree, token, every_leaf: bool = False):
    """`tree` with every floating leaf plus 0 * (a scalar of `token`): the same values, data-dependent on
    `token` (through an optimisation barrier as well, for the backends that keep them) — on its first
    floating leaf, or with `every_leaf` on all of them (one element of each). A non-finite token makes them
    non-finite, which only happens when the block's output or cotangent is already non-finite (and the step
    is then skipped)."""
    tok = [x for x in jax.tree.leaves(token) if jnp.issubdtype(x.dtype, jnp.floating)]
    if not tok:
        return tree
    tok = tok if every_leaf else tok[:1]
    tree, _ = jax.lax.optimization_barrier((tree, tok))
    zero = sum(jnp.ravel(x)[0].astype(jnp.float32) for x in tok) * 0.0
    return jax.tree.map(lambda x: x + zero.astype(x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _tied_remat_fwd(run, keep, shards, *args):
    return jax.vjp(jax.checkpoint(run, policy=keep), _after(shards, args), *args)


def _tied_remat_bwd(run, keep, vjp_fn, g):
    leaves, tree = jax.tree.flatten(vjp_fn)
    d_shards, *d_args = jax.tree.unflatten(tree, _after(leaves, g))(g)
    # The block's input cotangents wait for its parameter cotangents: otherwise the chain of input cotangents
    # runs ahead through the earlier blocks and every block's weight gradients (and the recomputed
    # activations they read) wait until the end, all alive at once (read off SDXL's buffer assignment).
    return (d_shards, *_after(tuple(d_args), d_shards, every_leaf=True))


tied_remat.defvjp(_tied_remat_fwd, _tied_remat_bwd)


def sequential(parent: nn.Module, module_cls, blocks, policy: str, gather, scan: bool, carry, *consts):
    """Applies `blocks` ([(name, constructor kwargs)], children of `parent`) in order:
    carry = block(*carry, *consts) (`carry` one array, or a tuple the block returns whole), each block a
    `unit` (the unit of remat and of the fsdp gather).

    With `scan`, each run of two or more consecutive blocks built alike (equal kwargs, equal fsdp layouts)
    is one `lax.scan` over their parameters stacked at call time (maxdiffusion's `scan_layers`, without
    changing the parameter tree, the key tables or checkpoints): the compiler sees one block body instead of
    one per block, so compile time and compile memory fall with depth (SDXL's 70 transformer blocks become
    11 bodies). The price is a stacked copy of the run's parameters (fsdp shards, in the compute dtype under
    fsdp) and, backward, of their gradients (tests/test_layers.py: one gathered block plus two stacked shard
    copies). XLA's cost analysis counts a loop body once (benchmarks/tpu_aot.py). Init always unrolls, so the
    parameters are created per block, as stored."""
    single = not isinstance(carry, tuple)
    carry = (carry,) if single else tuple(carry)
    runs: list[list] = []
    for name, kw in blocks:
        if scan and runs and runs[-1][0][1] == kw and not parent.is_initializing():
            runs[-1].append((name, kw))
        else:
            runs.append([(name, kw)])
    for run in runs:
        out = _scan_run(parent, module_cls, run, policy, gather, carry, consts) if len(run) > 1 else None
        if out is None:  # one block, or blocks that cannot share a body: unrolled, as stored
            for name, kw in run:
                y = unit(module_cls, policy, gather, parent.path + (name,))(**kw, name=name)(*carry, *consts)
                carry = tuple(y) if isinstance(y, tuple) else (y,)
        else:
            carry = out
    return carry[0] if single else carry


def _scan_run(parent, module_cls, run, policy, gather, carry, consts):
    """One lax.scan over the blocks of `run` (see `sequential`); None where they cannot share a body."""
    paths = [parent.path + (name,) for name, _ in run]
    params = [parent.variables["params"][name] for name, _ in run]
    if len({jax.tree.structure(p) for p in params}) > 1:
        return None
    if gather is not None and any(gather.layout(p, q) != gather.layout(params[0], paths[0])
                                  for p, q in zip(params[1:], paths[1:])):
        return None
    enters, values = [], []
    for provider in _BLOCK_INPUTS:  # LoRA factors below each block: stacked like the weights
        got = [provider(tuple(q)) for q in paths]
        if all(g is None for g in got):
            continue
        if any(g is None for g in got) or len({jax.tree.structure(g[0]) for g in got}) > 1:
            return None
        enters.append(got[0][1])
        values.append(jax.tree.map(lambda *xs: jnp.stack(xs), *[g[0] for g in got]))
    if gather is not None:  # the gather casts to the compute dtype anyway: stack the smaller copy
        params = [jax.tree.map(lambda x: x.astype(gather.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                               p) for p in params]
    stacked = (jax.tree.map(lambda *xs: jnp.stack(xs), *params), tuple(values))
    inner = module_cls(**run[0][1], parent=None)

    def one(tree, *args):
        p, vals = tree
        with contextlib.ExitStack() as stack:
            for enter, v in zip(enters, vals):
                stack.enter_context(enter(v))
            return inner.apply({"params": gather(p, paths[0]) if gather is not None else p}, *args)

    if gather is not None:
        keep = REMAT_POLICIES[policy] or jax.checkpoint_policies.save_anything_except_these_names("fsdp_gathered")
        block = functools.partial(tied_remat, one, keep)
    elif REMAT_POLICIES[policy] is not None:
        block = jax.checkpoint(one, policy=REMAT_POLICIES[policy], prevent_cse=False)  # scan keeps CSE apart
    else:
        block = one

    def body(c, tree):
        y = block(tree, *c, *consts)
        return (tuple(y) if isinstance(y, tuple) else (y,)), None

    out, _ = jax.lax.scan(body, carry, stacked)
    return out


def maybe_remat(module_cls, policy: str):
    """`unit` without fsdp (the VAE and other modules that never train sharded)."""
    return unit(module_cls, policy)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x * Phi(x), as 0.5 x (1 + erf(x / sqrt 2)) (PyTorch's form). jax.nn.gelu(approximate=False)
    evaluates erfc(-x / sqrt 2), which XLA:CPU computes ~2x slower: the SD GEGLU feed-forward's forward at
    [8, 256, 64] 2.40 -> 1.30 ms (PyTorch 1.36). Differs from the erfc form by < 1e-6 absolute."""
    return 0.5 * x * (1 + jax.lax.erf(x * 0.7071067811865476))


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """diffusers' `get_timestep_embedding` (scale 1), computed in float32. timesteps: [B] -> [B, dim]."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GroupNorm(nn.Module):
    """GroupNorm over [B, ..., C] in float32 (two-pass variance), output cast back to the input dtype.

    Statistics are per-channel sums over the spatial axes (a reduction along contiguous channels), then summed
    within each group on the small [B, C] result: XLA:CPU reduces the [B, H, W, G, C/G] view over (H, W, C/G)
    3-4x slower (fwd+bwd at [12, 16, 16, 128]: 1.6 -> 0.5 ms; GroupNorm was 1/8 of the CPU train step)."""

    num_groups: int
    epsilon: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, g = x.shape[-1], self.num_groups
        if c % g:
            raise ValueError(f"GroupNorm {self.name}: {c} channels are not divisible by {g} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        xf = x.astype(jnp.float32).reshape(x.shape[0], -1, c)
        n = xf.shape[1] * (c // g)

        def group_mean(per_channel):  # [B, C] sums -> each channel's group mean, [B, 1, C]
            b = per_channel.shape[0]
            return jnp.repeat(per_channel.reshape(b, g, c // g).sum(-1) / n, c // g, axis=1)[:, None]

        d = xf - group_mean(xf.sum(1))
        a = jax.lax.rsqrt(group_mean(jnp.square(d).sum(1)) + self.epsilon) * scale.astype(jnp.float32)
        return (d * a + bias.astype(jnp.float32)).reshape(x.shape).astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis in float32, output cast back to the input dtype; `affine=False` is
    diffusers' elementwise_affine=False (no parameters)."""

    epsilon: float = 1e-5
    param_dtype: Dtype = jnp.float32
    affine: bool = True

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        if self.affine:
            scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
            bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
            y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(x.dtype)


def conv(features: int, kernel: int, dtype, param_dtype, name: str, stride: int = 1, padding=None, **kw):
    """nn.Conv with PyTorch-style symmetric padding `(kernel - 1) // 2` unless given; `kw` goes to nn.Conv
    (use_bias, feature_group_count). A stride-1 depthwise conv (groups == features) is a DepthwiseConv."""
    p = (kernel - 1) // 2 if padding is None else padding
    if kw.get("feature_group_count", 1) == features and stride == 1 and features > 1:
        return DepthwiseConv(features, kernel, p, kw.get("use_bias", True), dtype, param_dtype, name=name)
    if kernel == 1 and stride == 1 and p == 0 and kw.get("feature_group_count", 1) == 1:
        return PointwiseConv(features, kw.get("use_bias", True), dtype, param_dtype, name=name)
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                   dtype=dtype, param_dtype=param_dtype, name=name, **kw)


class PointwiseConv(nn.Module):
    """A 1 x 1 conv as a matmul over channels, with nn.Conv's parameters (`kernel` [1, 1, C, O], `bias` [O]).
    Why: XLA:CPU runs convolutions through Eigen but matmuls through its faster library dots, and the
    UNet's 1x1 convs (proj_in / proj_out, conv_shortcut) are matmuls; other backends lower both alike."""

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features), self.param_dtype)
        y = jnp.einsum("...c,co->...o", x.astype(self.dtype), w[0, 0].astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(self.dtype)
        return y


class DepthwiseConv(nn.Module):
    """A depthwise k x k conv as k*k shifted multiply-adds (float32 accumulation), with nn.Conv's parameters
    (`kernel` [k, k, 1, C], `bias` [C]). Why: XLA:CPU's grouped convolution is slow, its backward pass most of
    all (fwd+bwd at [2, 16, 16, 1280], 3x3: 145 ms as a conv, 5.7 ms as shifted adds); the sum fuses into one
    elementwise loop on every backend."""

    features: int
    kernel: int
    padding: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, p = self.kernel, self.padding
        w = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, self.features), self.param_dtype)
        xp = jnp.pad(x.astype(self.dtype), ((0, 0), (p, p), (p, p), (0, 0)))
        ho, wo = xp.shape[1] - k + 1, xp.shape[2] - k + 1
        w = w.astype(self.dtype).astype(jnp.float32)
        y = sum(xp[:, i:i + ho, j:j + wo, :].astype(jnp.float32) * w[i, j, 0] for i in range(k) for j in range(k))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype).astype(jnp.float32)
        return y.astype(self.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, impl: Optional[str] = None,
              upcast: bool = False, mask: Optional[jax.Array] = None, is_causal: bool = False) -> jax.Array:
    """Multi-head attention over [B, T, heads*D] inputs.

    `impl`: None / 'xla' is `xla_attention` below (einsums, float32 logits and softmax, a backward pass that
    recomputes the probabilities); 'cudnn' is `jax.nn.dot_product_attention`'s cuDNN flash attention;
    'auto' takes cuDNN where it applies (GPU, bf16/fp16, head dim a multiple of 8 and <= 128, so SD-1.5's
    160-wide heads stay on XLA), Pallas' TPU flash attention ('pallas') for long sequences on TPU, query-chunked
    XLA ('chunked', below) for long sequences elsewhere, XLA for the rest.
    `upcast` (diffusers' `upcast_attention`) additionally runs the products in float32 off the cuDNN path.
    `mask` ([B, 1, T, S] boolean, True = attend) and `is_causal` are supported on every path but cuDNN's
    mask (the CLIP text encoder and SANA's cross-attention use them).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {impl!r} is not one of {ATTENTION_IMPLS}")
    b, t, c = q.shape
    s = k.shape[1]
    dtype = q.dtype
    q = q.reshape(b, t, heads, c // heads)
    k = k.reshape(b, s, heads, c // heads)
    v = v.reshape(b, s, heads, v.shape[-1] // heads)
    if impl == "auto":
        d = c // heads
        backend = jax.default_backend()
        ok = (backend == "gpu" and dtype in (jnp.bfloat16, jnp.float16) and d % 8 == 0
              and d <= 128 and not upcast and mask is None)
        long_seq = mask is None and not is_causal and t % QUERY_CHUNK == 0 and t >= 2 * QUERY_CHUNK
        if backend == "tpu" and long_seq and s % PALLAS_BLOCK == 0 and not upcast and _per_device():
            impl = "pallas"
        else:
            impl = "cudnn" if ok else ("chunked" if long_seq else "xla")
    if upcast and impl != "cudnn":
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    if impl == "chunked":
        out = _query_chunked(q, k, v)
    elif impl == "pallas":
        out = pallas_attention(q, k, v)
    elif impl == "cudnn":
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="cudnn")
    else:
        out = xla_attention(q, k, v, mask, is_causal)
    return out.reshape(b, t, -1).astype(dtype)


# 'auto' on TPU: Pallas' flash attention for the long self-attention levels (SD's and SDXL's 4096- and
# 1024-token latents): compiled for a v5e chip (benchmarks/tpu_attention.py, docs/performance.md) it holds
# no [T, T] block, and its roofline time is that of its flops while XLA's is that of its bytes.
PALLAS_BLOCK = 128  # the kernel's default key block; other key lengths (SANA's 300 text tokens) stay on XLA


def _per_device() -> bool:
    """Inside a shard_map over every mesh axis (the train step, the sampler) or on one device: where a Pallas
    kernel sees its own shard. Under GSPMD partitioning Mosaic refuses it ("cannot be automatically
    partitioned"), so 'auto' keeps XLA there."""
    m = jax.sharding.get_abstract_mesh()
    return (not m.empty and set(m.manual_axes) == set(m.axis_names)) or len(jax.devices()) == 1


def pallas_attention(q, k, v):
    """Pallas' TPU flash attention on [B, T, H, D] inputs (its layout is [B, H, T, D]); on a CPU it runs only
    inside `pltpu.force_tpu_interpret_mode()` (the parity tests)."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa  # Pallas' import cost: only when used

    out = fa.flash_attention(*(a.swapaxes(1, 2) for a in (q, k, v)), sm_scale=q.shape[-1] ** -0.5)
    return out.swapaxes(1, 2)


def xla_attention(q, k, v, mask=None, is_causal: bool = False):
    """softmax(q k^T / sqrt(d)) v on [B, T, H, D] inputs, as `jax.nn.dot_product_attention(implementation=
    "xla")` computes it (float32 logits and softmax, masked logits at -0.7 * float32 max), with a custom VJP.

    Why not jax.nn's: on XLA:CPU its [B, T, groups, 1, S] layouts cost transposes of the whole probability
    matrix and its autodiff backward keeps that matrix; this one works heads-major and its backward
    recomputes the probabilities from (q, k) and uses the flash-attention identity
    dS = P * (dP - rowsum(dO * O)): fwd+bwd of SD-like self-attention at [8, 256, 4, 16] is 12 ms vs 34 ms
    (2 CPU cores), and only q, k, v and the output are saved for the backward pass."""
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # [B, H, T, D]
    t, s = q.shape[2], k.shape[2]
    keep = None if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), (q.shape[0], 1, t, s))
    if is_causal:
        causal = jnp.tril(jnp.ones((t, s), bool))[None, None]
        keep = causal if keep is None else keep & causal
    return jnp.swapaxes(_attention_hm(q, k, v, keep), 1, 2)


def _logits(q, k, keep):
    """q k^T for a q already scaled by 1/sqrt(d), in float32, masked. Scaling the [.., T, D] query, not the
    [.., T, S] logits, because XLA:CPU's library dot fusions take a scalar factor as a materialised
    [B, H, T, S] operand (19 ms of the CPU benchmark's step; PyTorch's SDPA math path scales q the same way)."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    if keep is not None:
        logits = jnp.where(keep, logits, -0.7 * float(jnp.finfo(jnp.float32).max))
    return logits


def _attention_probs(q, k, keep):
    """softmax(q k^T) for a scaled q (see _logits)."""
    return jax.nn.softmax(_logits(q, k, keep), axis=-1)


def _scaled(q):
    return (q.astype(jnp.float32) * (q.shape[-1] ** -0.5)).astype(q.dtype)


@jax.custom_vjp
def _attention_hm(q, k, v, keep):
    """softmax(q k^T / sqrt d) v, normalised after the second product: (exp(l - max l) v) / sum exp(l - max l).
    The same value as normalising the probabilities first, but the row sums divide the small [.., T, D]
    output instead of the [.., T, S] matrix, and XLA:CPU's YNNPACK then fuses dot -> max -> exp -> dot into
    one kernel that never writes the score matrix: self-attention forward at [20, 256, 4, 16] 6.2 -> 3.1 ms
    on 2 CPU cores (PyTorch's flash SDPA 4.0)."""
    logits = _logits(_scaled(q), k, keep)
    e = jnp.exp(logits - jnp.max(logits, -1, keepdims=True))
    out = jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (out / jnp.sum(e, -1, keepdims=True)).astype(v.dtype)


def _attention_hm_fwd(q, k, v, keep):
    out = _attention_hm(q, k, v, keep)
    return out, (q, k, v, keep, out)


def _attention_hm_bwd(res, d_out):
    q, k, v, keep, out = res
    qs = _scaled(q)
    p = _attention_probs(qs, k, keep)  # recomputed: the [B, H, T, S] matrix is never a residual
    # dV = P^T dO and dK = dS^T Q as (dO^T P)^T and (Q^T dS)^T: the transposes fall on the small [D, T]
    # operands, not on the [T, S] matrices (XLA:CPU's library dots take only untransposed left operands).
    t_ = lambda a: jnp.swapaxes(a, -1, -2)  # noqa: E731
    dv = t_(jnp.einsum("bhdq,bhqk->bhdk", t_(d_out.astype(v.dtype)), p.astype(v.dtype)))
    dp = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True)
    ds = (p * (dp - delta)).astype(q.dtype)  # d logits; the 1/sqrt(d) goes on the small dq below
    dq = _scaled(jnp.einsum("bhqk,bhkd->bhqd", ds, k, preferred_element_type=jnp.float32))
    dk = t_(jnp.einsum("bhdq,bhqk->bhdk", t_(qs), ds))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention_hm.defvjp(_attention_hm_fwd, _attention_hm_bwd)


# 'auto' off cuDNN: sequences of >= 2 chunks (SD's and SDXL's 64x64 and 32x32 latent levels) attend in query
# chunks, each rematerialised, so neither pass holds the whole [B, heads, T, T] score matrix: XLA's
# attention materialises it in float32 (1 GiB per 2 SD-1.5 samples at 4096 tokens, several alive in the
# backward pass; benchmarks/memory.py). Exact: each query's softmax runs over all keys. 512, not 1024: one
# 1024-query chunk's four f32 score blocks were 1.28 of the 3.38 GiB at an SDXL-proxy's peak (README).
QUERY_CHUNK = 512


def _query_chunked(q, k, v):
    b, t, h, d = q.shape
    chunks = q.reshape(b, t // QUERY_CHUNK, QUERY_CHUNK, h, d).swapaxes(0, 1)
    one = jax.checkpoint(lambda qc: xla_attention(qc, k, v))
    out = jax.lax.map(one, chunks)
    return out.swapaxes(0, 1).reshape(b, t, h, v.shape[-1])


class ResnetBlock2D(nn.Module):
    """diffusers ResnetBlock2D, resnet_time_scale_shift="default"; `temb` optional (VAE has none)."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        d, pd = self.dtype, self.param_dtype
        h = nn.silu(GroupNorm(self.groups, self.eps, pd, name="norm1")(x))
        h = conv(self.out_channels, 3, d, pd, "conv1")(h)
        if temb is not None:
            t = nn.Dense(self.out_channels, dtype=d, param_dtype=pd, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(GroupNorm(self.groups, self.eps, pd, name="norm2")(h))
        h = conv(self.out_channels, 3, d, pd, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, d, pd, "conv_shortcut")(x)
        out = x.astype(h.dtype) + h
        return out / self.output_scale_factor if self.output_scale_factor != 1 else out


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. padding=0 is diffusers' VAE variant: pad right/bottom by one first."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv", stride=2,
                    padding=self.padding)(x)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """PyTorch `F.interpolate(mode="nearest", size=...)` on NHWC: src = floor(dst * in / out)."""
    _, h, w, _ = x.shape
    if size == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    hi = jnp.minimum(jnp.floor(jnp.arange(size[0]) * (h / size[0])).astype(jnp.int32), h - 1)
    wi = jnp.minimum(jnp.floor(jnp.arange(size[1]) * (w / size[1])).astype(jnp.int32), w - 1)
    return x[:, hi][:, :, wi]


class Upsample2D(nn.Module):
    """Nearest x2 (or to `size`, as diffusers' UNet does for odd latent sizes), then a 3x3 conv."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, size: Optional[tuple[int, int]] = None):
        size = size or (2 * x.shape[1], 2 * x.shape[2])
        x = resize_nearest(x, tuple(size))
        return conv(self.out_channels, 3, self.dtype, self.param_dtype, "conv")(x)


def sincos_pos_embed(dim: int, h: int, w: int, base_size: int, interpolation_scale: float) -> np.ndarray:
    """diffusers' get_2d_sincos_pos_embed (float64, as it computes) -> [h*w, dim] (SANA's and SD3's)."""
    gh = np.arange(h, dtype=np.float32) / (h / base_size) / interpolation_scale
    gw = np.arange(w, dtype=np.float32) / (w / base_size) / interpolation_scale
    grid = np.stack(np.meshgrid(gw, gh, indexing="xy"), 0).reshape(2, 1, w, h)

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], 1)

    return np.concatenate([one(dim // 2, grid[0]), one(dim // 2, grid[1])], 1).astype(np.float32)


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding, no cond projection)."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_1")(x)
        return nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype, name="linear_2")(nn.silu(x))


class RMSNorm(nn.Module):
    """diffusers' RMSNorm with a weight (and, with use_bias, a bias) over the last axis: float32 statistics,
    output in the input dtype. DC-AE's channel norms have the bias, SANA's caption norm has not."""

    eps: float = 1e-5
    param_dtype: Any = jnp.float32
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + self.eps)
        y = y * self.param("scale", nn.initializers.ones, (c,), self.param_dtype).astype(jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (c,), self.param_dtype).astype(jnp.float32)
        return y.astype(x.dtype)


class GLUMBConv(nn.Module):
    """diffusers GLUMBConv with the optional channel RMSNorm and residual (SANA's Mix-FFN uses neither)."""

    out_channels: int
    expand_ratio: float = 4.0
    norm: bool = True
    residual: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        hidden = int(self.expand_ratio * x.shape[-1])
        d, pd = self.dtype, self.param_dtype
        h = nn.silu(conv(2 * hidden, 1, d, pd, "conv_inverted")(x))
        h = conv(2 * hidden, 3, d, pd, "conv_depth", feature_group_count=2 * hidden)(h)
        h = conv(self.out_channels, 1, d, pd, "conv_point", use_bias=False)(h[..., :hidden] * nn.silu(h[..., hidden:]))
        if self.norm:
            h = RMSNorm(1e-5, pd, use_bias=True, name="norm")(h)
        return h + x if self.residual else h


def in_unit(names: tuple[str, ...]) -> bool:
    """True for a parameter inside a block that gathers its own weights (a ResNet or transformer block)."""
    return any(_UNIT.fullmatch(n) for n in names)


_UNIT = re.compile(r"(resnets|transformer_blocks)_\d+")


def apply_sharded(model, gather, params, *args, **kwargs):
    """`model.apply` on fsdp *shards* inside a shard_map: each ResNet / transformer block gathers its own
    weights when it runs (`unit`); the few weights outside blocks (UNet: conv_in/out, embeddings, norms,
    proj_in/out, resamplers, 2.1 % of SDXL, 9.2 % of SD-1.5; SANA: patch/time/caption embeddings, proj_out)
    are gathered here for the whole call. `model` has a `gather` field (UNet, SANA transformer)."""
    return model.clone(gather=gather).apply({"params": gather(params, skip=in_unit)}, *args, **kwargs)
