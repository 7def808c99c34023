"""LoRA's forward x W + (x A) B (a Flax interceptor) against the merged weights W + A B, alone, per batch group,
and inside the fsdp train step with per-block gathers and remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddspo_jax import lora, parallel
from ddspo_jax import step as step_lib
from ddspo_jax.backbones import load_backbone
from ddspo_jax.config import base_config


@pytest.fixture(scope="module")
def tiny():
    cfg = base_config()
    cfg.model.path, cfg.model.dtype, cfg.model.remat_policy = "tiny", "float32", "block"
    bb = load_backbone(cfg.model, cfg.schedule, text=False, vae=False, log=None)
    f = lora.init(bb.params, 2, jax.random.key(1))
    f = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), f)  # B != 0
    return cfg, bb, f


def _inputs(n, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal((n, 8, 8, 4)), jnp.float32), jnp.asarray(rng.integers(0, 1000, n)),
            {"prompt_embeds": jnp.asarray(rng.standard_normal((n, 77, 32)), jnp.float32)})


def test_forward_and_groups_equal_merged_weights(tiny):
    _, bb, f = tiny
    p = bb.params
    x, t, c = _inputs(4)
    f2 = jax.tree.map(lambda v: -0.5 * v, f)

    @jax.jit
    def grouped(p, factors):
        with lora.forward(factors, 3.0):
            return bb.denoise(p, x, t, c)

    merged = jax.jit(lambda p: bb.denoise(p, x, t, c))
    got = grouped(p, lora.stack(f, None, f2, f))
    parts = [merged(lora.merge(p, g, 3.0) if g is not None else p)[i] for i, g in enumerate((f, None, f2, f))]
    np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.stack(parts)), atol=2e-5)
    assert float(jnp.abs(parts[0] - parts[1]).max()) > 1e-2  # the adapter changes the output


@pytest.mark.slow  # ~90 s on 2 cores; test_ddcpp trains LoRA through train.py in the default suite
def test_fsdp_step_with_the_lora_forward_equals_a_merged_single_shard_step(tiny):
    cfg, bb, f = tiny
    cfg = cfg.copy_and_resolve_references()
    cfg.train.batch_size, cfg.train.micro_batch_per_device, cfg.train.warmup_steps = 2, 1, 0
    p = bb.params
    x0w, _, c = _inputs(2, 1)
    x0l, _, cl = _inputs(2, 2)
    batch = {"x0_w": np.asarray(x0w), "x0_l": np.asarray(x0l), "cond_w": jax.tree.map(np.asarray, c),
             "cond_l": jax.tree.map(np.asarray, cl)}
    out = {}
    for fsdp, how in ((1, "merge"), (2, "forward")):
        mesh = parallel.make_mesh(2 // fsdp, fsdp, devices=jax.devices()[:2])

        def ref_fn(r, x, t, cc, gr):
            return bb.denoise(r["unet"], x, t, cc, gather=gr.at("unet"))

        if how == "forward":  # per-block gathers of the sharded base, the low-rank term added in each Dense
            def apply(pp, r, x, t, cc, gp, gr):
                with lora.forward(gp(pp), 2.0):
                    return bb.denoise(r["unet"], x, t, cc, gather=gr.at("unet"))
        else:
            def apply(pp, r, x, t, cc, gp, gr):
                return bb.denoise(lora.merge(gr(r["unet"], ("unet",)), gp(pp), 2.0), x, t, cc)
        opt, _ = step_lib.make_optimizer(cfg, 1e-3)
        ref = {"unet": parallel.shard_tree(p, mesh)}
        ts = step_lib.make_train_step(ref_fn, bb.schedule, cfg, mesh, opt, jax.eval_shape(lambda: f),
                                      ref_shape=jax.eval_shape(lambda: ref), model_apply=apply)
        state, m = ts(step_lib.create_state(parallel.shard_tree(f, mesh), opt, mesh), ref, batch, jax.random.key(0))
        out[how] = (float(m["loss"]), jax.tree.map(np.asarray, state["params"]))
    np.testing.assert_allclose(out["forward"][0], out["merge"][0], rtol=1e-3)
    for a, b in zip(jax.tree.leaves(out["forward"][1]), jax.tree.leaves(out["merge"][1])):
        np.testing.assert_allclose(a, b, atol=1e-5)  # 1 % of the first Adam update (lr 1e-3)
