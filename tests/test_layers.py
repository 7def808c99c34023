"""models/layers: attention (XLA path with a custom VJP, query-chunked) against a float64 derivation; the
gathered, tied remat units (memory held and gradients)."""

import os

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import flax.linen as nn

from ddspo_jax.models import layers


def naive64(q, k, v, heads, mask=None, causal=False):
    """softmax(q k^T / sqrt(d)) v per head in float64 numpy: [B, T, H*D] -> [B, T, H*Dv]."""
    b, t, c = q.shape
    s = k.shape[1]
    d = c // heads
    q4 = q.reshape(b, t, heads, d).transpose(0, 2, 1, 3).astype(np.float64)
    k4 = k.reshape(b, s, heads, d).transpose(0, 2, 1, 3).astype(np.float64)
    v4 = v.reshape(b, s, heads, -1).transpose(0, 2, 1, 3).astype(np.float64)
    logits = q4 @ k4.transpose(0, 1, 3, 2) / np.sqrt(d)
    keep = np.ones((b, 1, t, s), bool) if mask is None else np.broadcast_to(mask, (b, 1, t, s))
    if causal:
        keep = keep & np.tril(np.ones((t, s), bool))
    logits = np.where(keep, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return (p @ v4).transpose(0, 2, 1, 3).reshape(b, t, -1)


def _grad64(fn, args, wrt, eps=1e-6):
    """Central differences in float64 of sum(fn(...) * w) for a fixed random w (an independent gradient)."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal(fn(*args).shape)
    x = args[wrt].astype(np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        hi, lo = x.copy(), x.copy()
        hi[idx] += eps
        lo[idx] -= eps
        a_hi, a_lo = list(args), list(args)
        a_hi[wrt], a_lo[wrt] = hi, lo
        g[idx] = (np.sum(fn(*a_hi) * w) - np.sum(fn(*a_lo) * w)) / (2 * eps)
    return w, g


@pytest.mark.parametrize("case", ["self", "cross_mask", "causal"])
def test_xla_attention_values_and_gradients_match_float64(case):
    rng = np.random.default_rng(0)
    b, t, s, heads, d = 2, 6, {"self": 6, "cross_mask": 5, "causal": 6}[case], 2, 4
    q = rng.standard_normal((b, t, heads * d))
    k = rng.standard_normal((b, s, heads * d))
    v = rng.standard_normal((b, s, heads * 3))
    mask = None
    if case == "cross_mask":  # per-sample key padding, one sample fully unmasked
        mask = np.ones((b, 1, 1, s), bool)
        mask[0, ..., 3:] = False
    causal = case == "causal"

    def ours(q, k, v):
        return layers.attention(q, k, v, heads, "xla", mask=None if mask is None else jnp.asarray(mask),
                                is_causal=causal)

    f32 = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    np.testing.assert_allclose(np.asarray(ours(*f32)), naive64(q, k, v, heads, mask, causal), atol=2e-6)
    for wrt in range(3):
        w, g64 = _grad64(lambda *a: naive64(*a, heads, mask, causal), [q, k, v], wrt)
        g = jax.grad(lambda *a: jnp.sum(ours(*a) * jnp.asarray(w, jnp.float32)), argnums=wrt)(*f32)
        np.testing.assert_allclose(np.asarray(g), g64, atol=2e-5, rtol=1e-4)


def test_chunked_attention_equals_xla_and_jax_nn():
    rng = np.random.default_rng(1)
    t = 2 * layers.QUERY_CHUNK
    q, k, v = (jnp.asarray(rng.standard_normal((1, t, 8)), jnp.float32) for _ in range(3))
    w = jnp.asarray(rng.standard_normal((1, t, 8)), jnp.float32)
    loss = lambda impl: lambda q, k, v: jnp.sum(layers.attention(q, k, v, 2, impl) * w)  # noqa: E731
    ref = jax.grad(lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(
        q.reshape(1, t, 2, 4), k.reshape(1, t, 2, 4), v.reshape(1, t, 2, 4)).reshape(1, t, 8) * w),
        argnums=(0, 1, 2))(q, k, v)
    for impl in ("auto", "xla"):  # auto on CPU at 2 chunks: the chunked path
        for a, b in zip(jax.grad(loss(impl), argnums=(0, 1, 2))(q, k, v), ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=1e-4)


def test_bf16_inputs_keep_their_dtype():
    q = jnp.ones((1, 4, 8), jnp.bfloat16)
    out, g = jax.value_and_grad(lambda q: layers.attention(q, q, q, 2, "xla").astype(jnp.float32).sum())(q)
    assert g.dtype == jnp.bfloat16 and np.isfinite(float(out))


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(nn.Dense(x.shape[-1], use_bias=False, name="lin")(x))


class _Stack(nn.Module):
    """N blocks, each a unit of remat and of the fsdp gather (as the UNet's ResNets are)."""
    n: int = 8
    gather: object = None

    @nn.compact
    def __call__(self, x):
        for i in range(self.n):
            cls = _Block if self.gather is None else layers.unit(_Block, "block", self.gather, (f"resnets_{i}",))
            x = cls(name=f"resnets_{i}")(x)
        return x


def test_gathered_units_hold_about_one_blocks_weights_and_keep_gradients():
    """tied_remat: under fsdp 4 the gradient program's temporaries hold about one block's gathered weights
    (untied, XLA:CPU kept all 8 alive: 8.0 block-weights of temporaries vs 1.03 tied), and the gradients equal
    plain autodiff of the unsharded model."""
    from ddspo_jax import parallel

    d, b = 512, 8
    x = jax.random.normal(jax.random.key(1), (b, d))
    params = _Stack().init(jax.random.key(0), x)["params"]
    mesh = parallel.make_mesh(1, 4, jax.devices()[:4])
    gather = parallel.Gather(parallel.fsdp_axes(params, 4), jnp.float32)
    specs = parallel.tree_specs(params, mesh)
    loss = lambda m: lambda p, x: jnp.sum(m.apply({"params": p}, x) ** 2)  # noqa: E731
    sharded = jax.jit(jax.shard_map(lambda p, x: jax.grad(loss(_Stack(gather=gather)))(p, x), mesh=mesh,
                                    in_specs=(specs, parallel.BATCH), out_specs=specs, check_vma=False))
    placed = parallel.shard_tree(params, mesh)
    temp = sharded.lower(placed, x).compile().memory_analysis().temp_size_in_bytes
    assert temp < 2 * d * d * 4, f"temporaries {temp / (d * d * 4):.2f} blocks' weights"
    want = jax.grad(loss(_Stack()))(params, x)  # each device's loss is its batch rows': the sum is the total
    for a, w in zip(jax.tree.leaves(sharded(placed, x)), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=1e-4, atol=2e-5)


def test_lora_factors_reach_tied_units_as_block_inputs():
    """LoRA's interceptor inside gathered units (lora.forward -> layers.block_inputs): the factors are passed
    to each tied unit explicitly, so their gradients equal plain autodiff of x W + (alpha/r)(x A) B on the
    unsharded model (before, a custom VJP silently dropped closed-over factors), and the gathers stay tied
    (temporaries about one block's weights, as without LoRA)."""
    from ddspo_jax import lora, parallel

    d, b, r = 512, 8, 4
    x = jax.random.normal(jax.random.key(1), (b, d))
    params = _Stack().init(jax.random.key(0), x)["params"]
    # the Dense layers are named "lin"; B random (not PEFT's zero) so that every factor gets a gradient
    factors = {f"resnets_{i}{lora.SEP}lin": {"a": jax.random.normal(jax.random.key(10 + i), (d, r)) / d ** 0.5,
                                             "b": jax.random.normal(jax.random.key(20 + i), (r, d)) * 0.1}
               for i in range(8)}
    alpha = 8.0
    mesh = parallel.make_mesh(1, 4, jax.devices()[:4])
    gather = parallel.Gather(parallel.fsdp_axes(params, 4), jnp.float32)
    specs = parallel.tree_specs(params, mesh)

    def loss(model, p, f, x):
        with lora.forward(f, alpha):
            return jnp.sum(model.apply({"params": p}, x) ** 2)

    rep = jax.tree.map(lambda _: parallel.P(), factors)
    sharded = jax.jit(jax.shard_map(
        lambda p, f, x: jax.lax.psum(jax.grad(loss, argnums=2)(_Stack(gather=gather), p, f, x), parallel.AXES),
        mesh=mesh, in_specs=(specs, rep, parallel.BATCH), out_specs=rep, check_vma=False))
    placed = parallel.shard_tree(params, mesh)
    temp = sharded.lower(placed, factors, x).compile().memory_analysis().temp_size_in_bytes
    assert temp < 2 * d * d * 4, f"temporaries {temp / (d * d * 4):.2f} blocks' weights"

    def plain(f, x):  # the definition, written out: y_i = tanh(y_{i-1} (W_i + (alpha / r) A_i B_i))
        y = x
        for i in range(8):
            fi = f[f"resnets_{i}{lora.SEP}lin"]
            y = jnp.tanh(y @ params[f"resnets_{i}"]["lin"]["kernel"] + (alpha / r) * (y @ fi["a"]) @ fi["b"])
        return jnp.sum(y ** 2)

    want = jax.grad(plain)(factors, x)
    got = sharded(placed, factors, x)
    for k in factors:
        for n in ("a", "b"):
            assert float(jnp.abs(want[k][n]).max()) > 0
            np.testing.assert_allclose(np.asarray(got[k][n]), np.asarray(want[k][n]), rtol=1e-4, atol=2e-5)



class _Scanned(nn.Module):
    """The 8 blocks of _Stack through layers.sequential with scan: one lax.scan over stacked weights."""
    gather: object = None
    policy: str = "block"

    @nn.compact
    def __call__(self, x):
        blocks = [(f"transformer_blocks_{i}", {}) for i in range(8)]
        return layers.sequential(self, _Block, blocks, self.policy, self.gather, True, x)


@pytest.mark.parametrize("fsdp", [1, 4])
def test_scanned_blocks_give_the_definitions_gradients_with_lora_under_fsdp(fsdp):
    """layers.sequential(scan=True) on fsdp shards with LoRA factors below every block: one scan in the
    program, and the gradients of weights and factors equal plain autodiff of the definition
    y_i = tanh(y_{i-1} (W_i + (alpha/r) A_i B_i)) written out unsharded; the temporaries stay a few blocks'
    weights (one gathered block plus the stacked shards and their cotangent)."""
    from ddspo_jax import lora, parallel

    d, b, r, alpha = 256, 8, 4, 8.0
    x = jax.random.normal(jax.random.key(1), (b, d))
    params = _Scanned().init(jax.random.key(0), x)["params"]
    factors = {f"transformer_blocks_{i}{lora.SEP}lin": {"a": jax.random.normal(jax.random.key(10 + i), (d, r)) / d ** 0.5,
                                                        "b": jax.random.normal(jax.random.key(20 + i), (r, d)) * 0.1}
               for i in range(8)}
    mesh = parallel.make_mesh(1, fsdp, jax.devices()[:fsdp])
    gather = parallel.Gather(parallel.fsdp_axes(params, fsdp), jnp.float32)
    specs = parallel.tree_specs(params, mesh)
    rep = jax.tree.map(lambda _: parallel.P(), factors)

    def loss(p, f, x):
        with lora.forward(f, alpha):
            return jnp.sum(_Scanned(gather=gather).apply({"params": p}, x) ** 2)

    def both(p, f, x):  # weight gradients come back reduce-scattered (the gather's transpose); factors: psum
        gp, gf = jax.grad(loss, argnums=(0, 1))(p, f, x)
        return gp, jax.lax.psum(gf, parallel.AXES)

    grads = jax.shard_map(both, mesh=mesh, in_specs=(specs, rep, parallel.BATCH), out_specs=(specs, rep),
                          check_vma=False)
    placed = parallel.shard_tree(params, mesh)
    assert "scan[" in str(jax.make_jaxpr(grads)(placed, factors, x))
    temp = jax.jit(grads).lower(placed, factors, x).compile().memory_analysis().temp_size_in_bytes
    # one gathered block, plus 8 / fsdp blocks' weights per stacked copy (the shards, their cotangent)
    assert temp < (2 + 3 * 8 / fsdp) * d * d * 4, f"temporaries {temp / (d * d * 4):.2f} blocks' weights"

    def plain(p, f, x):
        y = x
        for i in range(8):
            fi = f[f"transformer_blocks_{i}{lora.SEP}lin"]
            y = jnp.tanh(y @ p[f"transformer_blocks_{i}"]["lin"]["kernel"] + (alpha / r) * (y @ fi["a"]) @ fi["b"])
        return jnp.sum(y ** 2)

    want = jax.grad(plain, argnums=(0, 1))(params, factors, x)
    got = jax.jit(grads)(placed, factors, x)
    for (k, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert float(jnp.abs(w).max()) > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=2e-5, err_msg=jax.tree_util.keystr(k))


def test_scanned_blocks_apply_one_lora_adapter_per_batch_group():
    """lora.stack's groups (DD-CPP's winning and losing adapters on one batch) through scanned blocks: each
    half of the batch equals the blocks run with that adapter merged into the weights, W + (alpha/r) A B."""
    from ddspo_jax import lora

    d, r, alpha = 32, 2, 4.0
    x = jax.random.normal(jax.random.key(1), (4, d))
    params = _Scanned().init(jax.random.key(0), x)["params"]
    one = lambda s: {f"transformer_blocks_{i}{lora.SEP}lin": {  # noqa: E731
        "a": jax.random.normal(jax.random.key(s + i), (d, r)), "b": jax.random.normal(jax.random.key(s + 50 + i), (r, d)) * 0.1}
        for i in range(8)}
    f1, f2 = one(100), one(200)
    model = _Scanned(policy="none")
    with lora.forward(lora.stack(f1, f2), alpha):
        assert "scan[" in str(jax.make_jaxpr(lambda p: model.apply({"params": p}, x))(params))
        got = model.apply({"params": params}, x)

    def merged(f, x):
        y = x
        for i in range(8):
            fi = f[f"transformer_blocks_{i}{lora.SEP}lin"]
            y = jnp.tanh(y @ (params[f"transformer_blocks_{i}"]["lin"]["kernel"] + (alpha / r) * fi["a"] @ fi["b"]))
        return y

    np.testing.assert_allclose(np.asarray(got[:2]), np.asarray(merged(f1, x[:2])), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[2:]), np.asarray(merged(f2, x[2:])), rtol=1e-5, atol=1e-5)


def test_scan_falls_back_to_unrolled_blocks_where_they_differ():
    """Blocks built differently (kwargs) are not scanned together: only runs of equal ones are."""
    class Wide(nn.Module):
        width: int = 16

        @nn.compact
        def __call__(self, x):
            return x + nn.Dense(x.shape[-1], name="lin")(jnp.tanh(nn.Dense(self.width, name="up")(x)))

    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            blocks = [("b0", dict(width=16)), ("b1", dict(width=16)), ("b2", dict(width=32)), ("b3", dict(width=16))]
            return layers.sequential(self, Wide, blocks, "none", None, True, x)

    x = jax.random.normal(jax.random.key(1), (4, 8))
    p = Mixed().init(jax.random.key(0), x)["params"]
    jaxpr = str(jax.make_jaxpr(lambda p: Mixed().apply({"params": p}, x))(p))
    assert jaxpr.count("scan[") == 1  # b0 + b1; b2 and b3 unrolled

    def plain(p, x):
        for n in ("b0", "b1", "b2", "b3"):
            q = p[n]
            x = x + jnp.tanh(x @ q["up"]["kernel"] + q["up"]["bias"]) @ q["lin"]["kernel"] + q["lin"]["bias"]
        return x

    np.testing.assert_allclose(np.asarray(Mixed().apply({"params": p}, x)), np.asarray(plain(p, x)), rtol=1e-5, atol=1e-6)


_DEFERRED_DW = r"""
import sys
import jax, jax.numpy as jnp, flax.linen as nn
from ddspo_jax import parallel
from ddspo_jax.models import layers

class Blk(nn.Module):  # a wide hidden layer: its weight gradient reads the recomputed [b, 16 d] activation
    @nn.compact
    def __call__(self, x):
        h = jax.nn.gelu(nn.Dense(16 * x.shape[-1], use_bias=False, name="up")(x))
        return x + nn.Dense(x.shape[-1], use_bias=False, name="down")(h)

class Stack(nn.Module):
    gather: object = None
    @nn.compact
    def __call__(self, x):
        for i in range(12):
            cls = Blk if self.gather is None else layers.unit(Blk, "block", self.gather, (f"resnets_{i}",))
            x = cls(name=f"resnets_{i}")(x)
        return x

if sys.argv[1] == "untied":  # the backward rule before: input cotangents not tied to the weight gradients
    def bwd(run, keep, vjp_fn, g):
        leaves, tree = jax.tree.flatten(vjp_fn)
        return tuple(jax.tree.unflatten(tree, layers._after(leaves, g))(g))
    layers.tied_remat.defvjp(layers._tied_remat_fwd, bwd)
d, b = 32, 2048
x = jax.random.normal(jax.random.key(1), (b, d))
params = Stack().init(jax.random.key(0), x)["params"]
mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
gather = parallel.Gather(parallel.fsdp_axes(params, 1), jnp.float32)
specs = parallel.tree_specs(params, mesh)
loss = lambda m: lambda p, x: jnp.sum(m.apply({"params": p}, x) ** 2)
f = jax.jit(jax.shard_map(lambda p, x: jax.grad(loss(Stack(gather=gather)))(p, x), mesh=mesh,
                          in_specs=(specs, parallel.BATCH), out_specs=specs, check_vma=False))
temp = f.lower(params, x).compile().memory_analysis().temp_size_in_bytes
want = jax.grad(loss(Stack()))(params, x)
err = max(float(jnp.max(jnp.abs(a - w)) / jnp.max(jnp.abs(w))) for a, w in zip(jax.tree.leaves(f(params, x)),
                                                                                jax.tree.leaves(want)))
print("RESULT", temp / (b * 16 * d * 4), err)
"""


def test_backward_finishes_each_blocks_weight_gradients_before_the_next_block():
    """tied_remat's backward rule: a unit's input cotangent waits for its parameter cotangents. Without that
    (XLA's memory-minimising scheduler, the stand-in benchmarks/memory.py uses for an accelerator's), the
    input-cotangent chain ran ahead through all blocks and each block's weight gradient, with the recomputed
    activation it reads, waited for the end: SDXL's buffer assignment showed every transformer layer's
    recomputed activations alive at once. Here: 12 blocks with a [b, 16 d] hidden layer; temporaries in
    units of one such activation, tied vs the old rule, and gradients equal to plain autodiff."""
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")
    got = {}
    for mode in ("tied", "untied"):
        out = subprocess.run([sys.executable, "-c", _DEFERRED_DW, mode], capture_output=True, text=True, env=env,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        temp, err = (float(v) for v in out.stdout.split("RESULT")[1].split())
        got[mode] = temp
        assert err < 1e-5, (mode, err)
    assert got["tied"] < 5 and got["untied"] > 2 * got["tied"], got  # measured: 3.9 vs 11.9


@pytest.mark.parametrize("d", [40, 64])
def test_pallas_flash_attention_equals_xla_attention_forward_and_backward(d, monkeypatch):
    """'pallas' (Pallas' TPU flash attention, run here by Pallas' TPU interpreter) against the XLA path:
    outputs and all three input gradients (float32); and 'auto' on a TPU backend takes it for a long
    self-attention but not for keys that are not a multiple of its block (SANA's 300 text tokens)."""
    from jax.experimental.pallas import tpu as pltpu

    b, t, h = 1, 256, 2
    rng = np.random.default_rng(d)
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, h * d)), jnp.float32) for _ in range(3))

    def run(impl):
        f = lambda *a: layers.attention(*a, h, impl=impl)  # noqa: E731
        return f(q, k, v), jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(q, k, v)

    want, want_g = run("xla")
    with pltpu.force_tpu_interpret_mode():
        got, got_g = run("pallas")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))))

    called = []
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(layers, "pallas_attention", lambda *a: called.append(a[0].shape) or layers.xla_attention(*a))
    long_q, text = jnp.zeros((2, 1024, h * d)), jnp.zeros((2, 300, h * d))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))

    def per_device(kv):  # as the train step and the sampler run: inside a shard_map over the batch
        spec = jax.sharding.PartitionSpec("data")
        return jax.jit(jax.shard_map(lambda q, k: layers.attention(q, k, k, h, impl="auto"), mesh=mesh,
                                     in_specs=(spec, spec), out_specs=spec))(long_q, kv)

    per_device(long_q)
    assert called == [(1, 1024, h, d)], called  # each device's own row
    per_device(text)  # 300 keys: not a multiple of the kernel's block
    layers.attention(q, k, v, h, impl="auto")  # 256 tokens: short
    jax.jit(lambda a: layers.attention(a, a, a, h, impl="auto"))(long_q)  # 8 devices under GSPMD: refused by Mosaic
    assert len(called) == 1, called
