"""trainable.build: what the step trains from, on the tiny model -- LoRA factors on the frozen base (no second
copy), or the full denoiser beside a frozen reference; the model's prediction before any update is the
reference's (zero-initialised LoRA B; identical weights), checked against the backbone's own forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddspo_jax import lora, parallel, trainable
from ddspo_jax.backbones import load_backbone
from ddspo_jax.config import base_config


@pytest.mark.parametrize("rank", [0, 4])
def test_build_trains_the_right_tree_and_starts_at_the_reference(rank):
    cfg = base_config()
    cfg.model.path, cfg.model.dtype, cfg.model.lora_rank = "tiny", "float32", rank
    bb = load_backbone(cfg.model, cfg.schedule, text=False, vae=False, log=None)
    base = jax.tree.map(np.asarray, bb.params)
    mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
    t = trainable.build(cfg, bb, mesh, manifest={}, log=lambda *_: None)
    assert bb.params is None and set(t.ref_params) == {"unet"}  # taken over; nothing else frozen here
    if rank:
        want = jax.tree.map(lambda x: x.shape, lora.init(base, rank, jax.random.key(0), bb.lora_targets))
        assert jax.tree.map(lambda x: x.shape, t.params) == want  # factors only
    else:
        assert jax.tree.map(lambda x: x.shape, t.params) == jax.tree.map(lambda x: x.shape, base)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    c = {"prompt_embeds": jnp.asarray(rng.standard_normal((2, 77, 32)), jnp.float32)}
    tt = jnp.asarray([100.0, 700.0])
    g = parallel.Gather(parallel.fsdp_axes(t.ref_params, 1), jnp.float32)
    gp = parallel.Gather(parallel.fsdp_axes(t.params, 1), jnp.float32)
    direct = np.asarray(bb.denoise(base, x, tt, c))  # the backbone's forward on the loaded weights
    ref = np.asarray(t.denoise_ref(t.ref_params, x, tt, c, g))
    model = np.asarray(t.model_apply(t.params, t.ref_params, x, tt, c, gp, g))
    np.testing.assert_allclose(ref, direct, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model, direct, rtol=1e-5, atol=1e-5)
    merged = t.to_unet_params(t.params, t.ref_params)
    np.testing.assert_allclose(np.asarray(bb.denoise(merged, x, tt, c)), direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rank", [0, 4])
def test_model_apply_of_moved_params_is_the_merged_denoiser(rank):
    """After an update: the model's prediction with moved params equals the backbone's forward on the params
    merged by hand (x W + x A B (alpha / rank) for LoRA), and the reference does not move."""
    cfg = base_config()
    cfg.model.path, cfg.model.dtype, cfg.model.lora_rank = "tiny", "float32", rank
    bb = load_backbone(cfg.model, cfg.schedule, text=False, vae=False, log=None)
    base = jax.tree.map(np.asarray, bb.params)
    t = trainable.build(cfg, bb, parallel.make_mesh(1, 1, jax.devices()[:1]), manifest={}, log=lambda *_: None)
    moved = jax.tree.map(lambda p: p + 0.02 * jnp.cos(jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)),
                         t.params)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
    c = {"prompt_embeds": jnp.asarray(rng.standard_normal((2, 77, 32)), jnp.float32)}
    tt = jnp.asarray([300.0, 900.0])
    g = parallel.Gather(parallel.fsdp_axes(t.ref_params, 1), jnp.float32)
    gp = parallel.Gather(parallel.fsdp_axes(moved, 1), jnp.float32)
    if rank:
        by_hand = jax.tree.map(lambda a: np.array(a, np.float64), base)  # W + (alpha / r) A B, alpha = r
        for name, f in jax.device_get(moved).items():  # factor names: the kernel's path joined by "__"
            node = by_hand
            for k in name.split("__"):
                node = node[k]
            node["kernel"] += np.asarray(f["a"], np.float64) @ np.asarray(f["b"], np.float64)
        by_hand = jax.tree.map(lambda a: np.asarray(a, np.float32), by_hand)
    else:
        by_hand = jax.device_get(moved)
    want = np.asarray(bb.denoise(by_hand, x, tt, c))
    got = np.asarray(t.model_apply(moved, t.ref_params, x, tt, c, gp, g))
    assert np.abs(want - np.asarray(bb.denoise(base, x, tt, c))).max() > 1e-3  # the move matters
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(t.denoise_ref(t.ref_params, x, tt, c, g)),
                               np.asarray(bb.denoise(base, x, tt, c)), rtol=1e-5, atol=1e-5)

