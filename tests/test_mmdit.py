"""SD3's MMDiT against diffusers' `SD3Transformer2DModel`, float32, on tiny random configs saved with
save_pretrained (SD3-style blocks; SD3.5-style QK RMSNorm; SD3.5 Medium's dual-attention blocks; a latent
smaller than the position table, so the crop is off-centre-sensitive; two input sizes, one not square);
export round trip through diffusers; the LoRA file in `StableDiffusion3Pipeline`; the real SD3-Medium,
SD3.5-Medium and SD3.5-Large parameter counts via jax.eval_shape against diffusers' on the meta device."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddspo_jax.convert.common import ConversionError
from ddspo_jax.convert.mmdit import LORA_TARGETS, export_mmdit, export_mmdit_lora, load_mmdit
from ddspo_jax.models.mmdit import MMDiTConfig, SD3Transformer2DModel

BASE = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
            pos_embed_max_size=7)
CONFIGS = {
    "sd3": BASE,
    "sd35": dict(BASE, qk_norm="rms_norm", num_attention_heads=3, caption_projection_dim=24, out_channels=6),
    "dual": dict(BASE, qk_norm="rms_norm", dual_attention_layers=(0, 1), pos_embed_max_size=9),
}


def torch_mmdit(tmp_path, name):
    import torch
    from diffusers import SD3Transformer2DModel as Ref

    torch.manual_seed(len(name))
    ref = Ref(**CONFIGS[name]).eval()
    with torch.no_grad():  # zero-initialised layers (adaLN-Zero) would hide layout mistakes
        for n, p in ref.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in n and "linear" not in n else 0.1))
    ref.save_pretrained(tmp_path / name, safe_serialization=True)
    return ref


def inputs(c, hw, tokens=5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, hw[0], hw[1], c["in_channels"])).astype(np.float32)
    ctx = rng.standard_normal((2, tokens, c["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((2, c["pooled_projection_dim"])).astype(np.float32)
    t = np.array([3.0, 870.5], np.float32)
    return x, t, ctx, pooled


def run_torch(ref, x, t, ctx, pooled):
    import torch

    with torch.no_grad():
        return ref(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(ctx), torch.from_numpy(pooled),
                   torch.from_numpy(t)).sample.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_mmdit_matches_diffusers(tmp_path, name):
    ref = torch_mmdit(tmp_path, name)
    model, params = load_mmdit(tmp_path / name)
    c = CONFIGS[name]
    for hw in ((8, 8), (12, 6)):
        x, t, ctx, pooled = inputs(c, hw)
        want = run_torch(ref, x, t, ctx, pooled)
        for m in (model, model.clone(scan_blocks=True)):  # model.scan_blocks: runs of equal blocks as one scan
            got = np.asarray(m.apply({"params": params}, *map(jnp.asarray, (x, t, ctx, pooled))))
            assert got.shape == want.shape
            scale = np.abs(want).max()
            assert np.abs(got - want).max() <= 1e-4 * scale, (hw, m.scan_blocks, np.abs(got - want).max(), scale)


def test_export_loads_in_diffusers_and_gives_our_output(tmp_path):
    from diffusers import SD3Transformer2DModel as Ref

    torch_mmdit(tmp_path, "dual")
    model, params = load_mmdit(tmp_path / "dual")
    params = jax.tree.map(lambda p: p * 1.5, params)  # not the file we read
    out = export_mmdit(model, params, tmp_path / "exported")
    back = Ref.from_pretrained(out).eval()
    x, t, ctx, pooled = inputs(CONFIGS["dual"], (10, 8), seed=3)
    want = run_torch(back, x, t, ctx, pooled)
    got = np.asarray(model.apply({"params": params}, *map(jnp.asarray, (x, t, ctx, pooled))))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("name", ["sd3_medium", "sd35_medium", "sd35_large"])
def test_real_configs_parameter_counts(name):
    import torch
    from diffusers import SD3Transformer2DModel as Ref

    from ddspo_jax.models.mmdit import CONFIG_DIR

    config = {k: v for k, v in json.loads((CONFIG_DIR / f"{name}.json").read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):  # diffusers' own count, no memory
        want = sum(p.numel() for p in Ref(**config).parameters())
    model = SD3Transformer2DModel(MMDiTConfig.named(name))
    assert sum(x.size for x in jax.tree.leaves(model.init_shapes())) == want
    assert want in (2_028_328_000, 2_243_171_520, 8_056_627_520)  # 2.0B / 2.2B / 8.1B: the published sizes


def test_bad_mmdit_inputs(tmp_path):
    torch_mmdit(tmp_path, "sd3")
    folder = tmp_path / "sd3"
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, num_layers=4)))
    with pytest.raises(ConversionError, match="missing keys"):
        load_mmdit(folder)
    (folder / "config.json").write_text(json.dumps(dict(cfg, qk_norm="layer_norm")))
    with pytest.raises(ConversionError, match="qk_norm"):
        load_mmdit(folder)
    (folder / "config.json").write_text(json.dumps(cfg))
    model, params = load_mmdit(folder)
    x, t, ctx, pooled = inputs(CONFIGS["sd3"], (16, 8))  # 8 patches > the 7-patch position table
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        model.apply({"params": params}, *map(jnp.asarray, (x, t, ctx, pooled)))


def test_lora_forward_and_lora_file_in_the_diffusers_pipeline(tmp_path):
    """LoRA as the release's SD3 adapter (the joint attention's eight projections): our forward equals the
    merged weights, and the exported file, loaded by StableDiffusion3Pipeline.load_lora_weights, gives our
    output."""
    import torch
    from diffusers import StableDiffusion3Pipeline

    from ddspo_jax import lora

    ref = torch_mmdit(tmp_path, "sd35")
    model, params = load_mmdit(tmp_path / "sd35")
    r, layers = 2, CONFIGS["sd35"]["num_layers"]
    factors = lora.init(params, r, jax.random.key(0), targets=LORA_TARGETS, a_std="rank")
    assert len(factors) == 8 * layers - 1  # the last block has no to_add_out (context pre-only)
    factors = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.key(1), x.shape), factors)
    x, t, ctx, pooled = map(jnp.asarray, inputs(CONFIGS["sd35"], (8, 8), seed=2))
    with lora.forward(factors, float(r)):
        ours = np.asarray(model.apply({"params": params}, x, t, ctx, pooled))
    merged = np.asarray(model.apply({"params": lora.merge(params, factors, float(r))}, x, t, ctx, pooled))
    assert np.abs(ours - merged).max() <= 1e-5 * np.abs(merged).max()
    assert np.abs(ours - np.asarray(model.apply({"params": params}, x, t, ctx, pooled))).max() > 1e-3

    file = export_mmdit_lora(factors, float(r), tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    pipe = StableDiffusion3Pipeline(transformer=ref, scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                                    text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(str(file.parent))
    want = run_torch(pipe.transformer, *(np.asarray(a) for a in (x, t, ctx, pooled)))
    assert np.abs(ours - want).max() <= 1e-4 * np.abs(want).max()
