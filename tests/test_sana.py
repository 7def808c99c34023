"""SANA's DiT against diffusers' `SanaTransformer2DModel`, float32, on tiny random configs saved with
save_pretrained (patch sizes 1 and 2, self- and cross-attention head counts that differ, odd layer counts,
the caption attention mask, sincos positions on and off, affine norm2); export round trip through diffusers;
the real 600M / 1600M configs' parameter counts via jax.eval_shape."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddspo_jax.convert import export_sana, load_sana
from ddspo_jax.convert.common import ConversionError
from ddspo_jax.models.sana import SanaConfig, SanaTransformer2DModel

CONFIGS = {
    "p1": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=3,
               num_cross_attention_heads=4, cross_attention_head_dim=4, cross_attention_dim=16, caption_channels=12,
               mlp_ratio=2.5, sample_size=8, patch_size=1),
    "p2": dict(in_channels=8, out_channels=8, num_attention_heads=3, attention_head_dim=4, num_layers=1,
               num_cross_attention_heads=2, cross_attention_head_dim=6, cross_attention_dim=12, caption_channels=20,
               mlp_ratio=2.0, sample_size=8, patch_size=2, interpolation_scale=1.0),
    "affine": dict(in_channels=4, out_channels=6, num_attention_heads=4, attention_head_dim=4, num_layers=2,
                   num_cross_attention_heads=1, cross_attention_head_dim=16, cross_attention_dim=16,
                   caption_channels=8, mlp_ratio=1.5, sample_size=6, patch_size=2, norm_elementwise_affine=True,
                   attention_bias=True),
}


def torch_sana(tmp_path, name):
    import torch
    from diffusers import SanaTransformer2DModel as Ref

    torch.manual_seed(len(name))
    ref = Ref(**CONFIGS[name]).eval()
    with torch.no_grad():  # zero-initialised layers would hide layout mistakes
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path / name, safe_serialization=True)
    return ref


def run_both(ref, model, params, hw, tokens, caption, seed=0):
    import torch

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, hw[0], hw[1], model.config.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, tokens, caption)).astype(np.float32)
    t = np.array([3.0, 870.5], np.float32)
    mask = np.ones((2, tokens), np.int64)
    mask[1, tokens // 2:] = 0
    with torch.no_grad():
        want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(ctx), torch.from_numpy(t),
                   encoder_attention_mask=torch.from_numpy(mask)).sample.numpy().transpose(0, 2, 3, 1)
    got = np.asarray(model.apply({"params": params}, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx),
                                 jnp.asarray(mask)))
    return got, want


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sana_matches_diffusers(tmp_path, name):
    ref = torch_sana(tmp_path, name)
    model, params = load_sana(tmp_path / name)
    c = CONFIGS[name]
    scanned = model.clone(scan_blocks=True)  # model.scan_blocks: the blocks as one lax.scan, same values
    for hw in ((c["sample_size"], c["sample_size"]), (c["sample_size"] + 2 * c["patch_size"], c["sample_size"])):
        for m in (model, scanned):
            got, want = run_both(ref, m, params, hw, 7, c["caption_channels"])
            assert got.shape == want.shape
            scale = np.abs(want).max()
            assert np.abs(got - want).max() <= 1e-4 * scale, (hw, m.scan_blocks, np.abs(got - want).max(), scale)


def test_export_loads_in_diffusers_and_gives_our_output(tmp_path):
    from diffusers import SanaTransformer2DModel as Ref

    torch_sana(tmp_path, "p2")
    model, params = load_sana(tmp_path / "p2")
    params = jax.tree.map(lambda p: p * 1.5, params)  # not the file we read
    out = export_sana(model, params, tmp_path / "exported")
    back = Ref.from_pretrained(out).eval()
    got, want = run_both(back, model, params, (8, 8), 5, 20, seed=3)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("name,count", [("sana_600m_1024", 591_747_872), ("sana_1600m_1024", 1_604_462_752)])
def test_real_configs_parameter_counts(name, count):
    model = SanaTransformer2DModel(SanaConfig.named(name))
    assert sum(x.size for x in jax.tree.leaves(model.init_shapes())) == count  # diffusers, meta device


def test_bad_sana_inputs(tmp_path):
    torch_sana(tmp_path, "p1")
    folder = tmp_path / "p1"
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, num_layers=4)))
    with pytest.raises(ConversionError, match="missing keys"):
        load_sana(folder)
    (folder / "config.json").write_text(json.dumps(dict(cfg, guidance_embeds=True)))
    with pytest.raises(ConversionError, match="guidance_embeds"):
        load_sana(folder)
    with pytest.raises(ConversionError, match="neither a transformer folder"):
        load_sana(tmp_path)


def test_lora_forward_and_lora_file_in_the_diffusers_pipeline(tmp_path):
    """LoRA as the release (rank r, alpha r, A ~ N(0, 1/r^2), B = 0, to_q/k/v of both attentions): our
    x W + (x A) B forward equals the merged weights, and the exported LoRA file, loaded by diffusers'
    SanaPipeline.load_lora_weights, gives our output."""
    import torch
    from diffusers import SanaPipeline

    from ddspo_jax import lora
    from ddspo_jax.convert.sana import LORA_TARGETS, export_sana_lora

    ref = torch_sana(tmp_path, "p1")
    model, params = load_sana(tmp_path / "p1")
    r = 2
    factors = lora.init(params, r, jax.random.key(0), targets=LORA_TARGETS, a_std="rank")
    assert len(factors) == 6 * CONFIGS["p1"]["num_layers"]
    a0 = np.concatenate([np.asarray(f["a"]).ravel() for f in factors.values()])
    assert abs(a0.std() - 1.0 / r) < 0.1 / r  # PEFT "gaussian": std 1/r
    factors = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), factors)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([10.0, 500.0])
    ctx = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 12)), jnp.float32)
    with lora.forward(factors, float(r)):
        ours = np.asarray(model.apply({"params": params}, x, t, ctx))
    merged = np.asarray(model.apply({"params": lora.merge(params, factors, float(r))}, x, t, ctx))
    assert np.abs(ours - merged).max() <= 1e-5 * np.abs(merged).max()
    assert np.abs(ours - np.asarray(model.apply({"params": params}, x, t, ctx))).max() > 1e-3  # LoRA acts

    file = export_sana_lora(factors, float(r), tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=ref, scheduler=None)
    pipe.load_lora_weights(str(file.parent))
    with torch.no_grad():
        want = pipe.transformer(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2)), torch.from_numpy(np.asarray(ctx)),
                                torch.from_numpy(np.asarray(t))).sample.numpy().transpose(0, 2, 3, 1)
    assert np.abs(ours - want).max() <= 1e-4 * np.abs(want).max()
