"""Flax AutoencoderKL vs diffusers: encoder and decoder parity, scaling, export, legacy keys, param count."""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ddspo_jax.convert import export_vae, load_vae  # noqa: E402
from ddspo_jax.convert.common import ConversionError, read_safetensors, write_safetensors  # noqa: E402
from ddspo_jax.models.unet import UnsupportedConfigError  # noqa: E402
from ddspo_jax.models.vae import AutoencoderKL  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "ddspo_jax" / "models" / "configs"
SCALE = 0.13025
TINY = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            scaling_factor=SCALE, sample_size=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, torch vae, images NHWC, posterior mean NHWC, logvar NHWC, decoded NHWC), built once."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**TINY).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(folder)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        post = vae.encode(torch.tensor(images.transpose(0, 3, 1, 2))).latent_dist
        decoded = vae.decode(post.mean).sample
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
    return folder, vae, images, nhwc(post.mean), nhwc(post.logvar), nhwc(decoded)


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_vae(tiny[0])


def _check(out, ref, name):
    err, scale = np.abs(np.asarray(out) - ref).max(), np.abs(ref).max()
    print(f"{name}: max abs diff {err:.3g}, scale {scale:.3g}")
    assert err <= 1e-4 * scale


def test_encoder_parity(tiny, loaded):
    _, _, images, mean, logvar, _ = tiny
    model, params = loaded
    m, lv = jax.jit(lambda p, x: model.apply({"params": p}, x, method="moments"))(params, images)
    _check(m, mean, "encoder mean")
    _check(lv, logvar, "encoder logvar")
    latents = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))(params, images)
    _check(latents, mean * SCALE, "scaled latents")  # scaling_factor comes from the config
    sampled = model.apply({"params": params}, images, jax.random.PRNGKey(0), method="encode")
    assert sampled.shape == mean.shape and not np.allclose(sampled, latents)


def test_decoder_parity(tiny, loaded):
    _, _, _, mean, _, decoded = tiny
    model, params = loaded
    out = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))(params, mean * SCALE)
    assert out.dtype == jnp.float32
    _check(out, decoded, "decoder")


def test_bf16_encoder_decodes_in_float32(tiny):
    folder, _, images, mean, _, _ = tiny
    model, params = load_vae(folder, dtype=jnp.bfloat16)
    assert model.decode_dtype == jnp.float32
    lat = model.apply({"params": params}, images, method="encode")
    assert np.abs(np.asarray(lat) / SCALE - mean).max() <= 0.1 * np.abs(mean).max()


def test_export_round_trip(tiny, loaded, tmp_path):
    folder, vae, images, mean, _, decoded = tiny
    model, params = loaded
    export_vae(model, params, tmp_path / "out")
    src = read_safetensors(folder / "diffusion_pytorch_model.safetensors")
    out = read_safetensors(tmp_path / "out" / "diffusion_pytorch_model.safetensors")
    assert set(src) == set(out) and all(np.array_equal(src[k], out[k]) for k in src)
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out").eval()
    assert back.config.scaling_factor == SCALE
    with torch.no_grad():
        dec = back.decode(torch.tensor(mean.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(dec, decoded)
    export_vae(model, params, tmp_path / "fp16", dtype="fp16")
    diffusers.AutoencoderKL.from_pretrained(tmp_path / "fp16")


def test_legacy_attention_names_and_bad_weights(tiny, loaded, tmp_path):
    folder = tiny[0]
    sd = read_safetensors(folder / "diffusion_pytorch_model.safetensors")
    legacy = {}
    for k, v in sd.items():
        for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                         (".to_out.0.", ".proj_attn.")):
            k = k.replace(new, old)
        legacy[k] = v[:, :, None, None] if ".query.weight" in k else v  # old 1x1-conv form too
    (tmp_path / "legacy").mkdir()
    shutil.copy(folder / "config.json", tmp_path / "legacy" / "config.json")
    write_safetensors(legacy, tmp_path / "legacy" / "diffusion_pytorch_model.safetensors")
    _, params = load_vae(tmp_path / "legacy")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), loaded[1], params))

    del sd["decoder.conv_out.bias"]
    sd["decoder.conv_in.weight"] = sd["decoder.conv_in.weight"][:1]
    write_safetensors(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ConversionError) as e:
        load_vae(tmp_path / "bad.safetensors", config=folder / "config.json")
    assert "decoder.conv_out.bias" in str(e.value) and "decoder.conv_in.weight: file has" in str(e.value)


def test_unsupported_config(tiny):
    cfg = json.loads((tiny[0] / "config.json").read_text())
    with pytest.raises(UnsupportedConfigError, match="down_block_types"):
        AutoencoderKL.from_config({**cfg, "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]})
    with pytest.raises(UnsupportedConfigError, match="new_field"):
        AutoencoderKL.from_config({**cfg, "new_field": 3})


def test_sd_vae_param_count():
    cfg = json.loads((CONFIGS / "sd_vae.json").read_text())
    model = AutoencoderKL.from_config(cfg)
    assert model.config.scaling_factor == 0.18215
    assert sum(x.size for x in jax.tree.leaves(model.init_shapes())) == 83_653_863


def test_sd3_style_vae_shift_and_no_quant_convs(tmp_path):
    """SD3's VAE: 16 latent channels, no quant / post-quant convs, latents (mean - shift_factor) x
    scaling_factor as StableDiffusion3Pipeline computes them, and decoded from z / scaling + shift."""
    torch.manual_seed(1)
    cfg = dict(TINY, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305,
               shift_factor=0.0609)
    vae = diffusers.AutoencoderKL(**cfg).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vae.save_pretrained(tmp_path / "vae")
    assert vae.quant_conv is None and vae.post_quant_conv is None
    images = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        mean = vae.encode(torch.tensor(images.transpose(0, 3, 1, 2))).latent_dist.mean
        latents = (mean - 0.0609) * 1.5305  # the pipeline's formula, written out
        decoded = vae.decode(latents / 1.5305 + 0.0609).sample.numpy().transpose(0, 2, 3, 1)
    model, params = load_vae(tmp_path / "vae")
    ours = model.apply({"params": params}, images, method="encode")
    _check(ours, latents.numpy().transpose(0, 2, 3, 1), "sd3 latents")
    _check(model.apply({"params": params}, ours, method="decode"), decoded, "sd3 decode")


def test_sd3_vae_param_count():
    """SD3-Medium's vae/config.json (16 latent channels, no quant convs) against diffusers' own count."""
    cfg = dict(json.loads((CONFIGS / "sd_vae.json").read_text()), latent_channels=16, use_quant_conv=False,
               use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
    with torch.device("meta"):
        want = sum(p.numel() for p in diffusers.AutoencoderKL(**{k: v for k, v in cfg.items()
                                                                 if not k.startswith("_")}).parameters())
    model = AutoencoderKL.from_config(cfg)
    assert sum(x.size for x in jax.tree.leaves(model.init_shapes())) == want == 83_819_683
