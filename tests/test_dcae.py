"""DC-AE (SANA's autoencoder) against diffusers' `AutoencoderDC`, float32, encoder and decoder, on tiny random
configs saved with save_pretrained: ResBlock and EfficientViT blocks, pixel-(un)shuffle and conv/interpolate
resamplers, batch-norm and RMS-norm decoder blocks, a first level with no layers, multiscale attention in its
linear (H*W > head dim) and quadratic forms; SANA's f32c32 config's parameter count via jax.eval_shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddspo_jax.convert import load_dcae
from ddspo_jax.convert.common import ConversionError
from ddspo_jax.models.dcae import AutoencoderDC, DCAEConfig

VIT = "EfficientViTBlock"
CONFIGS = {
    # SANA-like: Conv down, interpolate up, ViT blocks deep (quadratic attention at the 2x2 level)
    "sana_like": dict(latent_channels=4, attention_head_dim=8, encoder_block_types=["ResBlock", VIT, VIT],
                      decoder_block_types=["ResBlock", VIT, VIT], encoder_block_out_channels=[8, 16, 16],
                      decoder_block_out_channels=[8, 16, 16], encoder_layers_per_block=[1, 1, 2],
                      decoder_layers_per_block=[1, 2, 1], encoder_qkv_multiscales=[[], [3], [5]],
                      decoder_qkv_multiscales=[[], [3], [3, 5]], downsample_block_type="Conv",
                      upsample_block_type="interpolate", scaling_factor=0.41407),
    # pixel-(un)shuffle resamplers, batch-norm + relu decoder blocks, first level without layers
    "shuffle_bn": dict(latent_channels=8, attention_head_dim=4, encoder_block_types="ResBlock",
                       decoder_block_types=["ResBlock", "ResBlock", VIT], encoder_block_out_channels=[8, 16, 32],
                       decoder_block_out_channels=[8, 16, 32], encoder_layers_per_block=[0, 1, 1],
                       decoder_layers_per_block=[0, 2, 1], encoder_qkv_multiscales=[[], [], []],
                       decoder_qkv_multiscales=[[], [], [5]], decoder_norm_types=["batch_norm", "batch_norm",
                                                                                   "rms_norm"],
                       decoder_act_fns=["relu", "relu", "silu"]),
    # no in/out shortcuts, gelu-free silu everywhere, four levels
    "deep": dict(latent_channels=2, attention_head_dim=4, encoder_block_types=["ResBlock", "ResBlock", VIT, VIT],
                 decoder_block_types=["ResBlock", "ResBlock", VIT, VIT], encoder_block_out_channels=[4, 8, 8, 8],
                 decoder_block_out_channels=[4, 8, 8, 8], encoder_layers_per_block=[1, 1, 1, 1],
                 decoder_layers_per_block=[1, 1, 1, 1], encoder_qkv_multiscales=[[], [], [3], [3]],
                 decoder_qkv_multiscales=[[], [], [3], [3]], encoder_out_shortcut=False, decoder_in_shortcut=False),
}


def torch_dcae(tmp_path, name):
    import torch
    from diffusers import AutoencoderDC as Ref

    torch.manual_seed(len(name))
    ref = Ref(**CONFIGS[name]).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for n, b in ref.named_buffers():  # batch-norm statistics that are not the identity
            if n.endswith("running_mean"):
                b.normal_(0.0, 0.2)
            elif n.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    ref.save_pretrained(tmp_path / name, safe_serialization=True)
    return ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dcae_encoder_and_decoder_match_diffusers(tmp_path, name):
    import torch

    ref = torch_dcae(tmp_path, name)
    model, params = load_dcae(tmp_path / name)
    f = model.downscale
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 4 * f, 2 * f, 3)).astype(np.float32)
    z = rng.standard_normal((2, 3, 2, CONFIGS[name]["latent_channels"])).astype(np.float32)
    with torch.no_grad():
        want_z = ref.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent.numpy().transpose(0, 2, 3, 1)
        want_x = ref.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)
    got_z = np.asarray(model.apply({"params": params}, jnp.asarray(x), method="encode"))
    got_x = np.asarray(model.apply({"params": params}, jnp.asarray(z), method="decode"))
    for got, want in ((got_z, want_z), (got_x, want_x)):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), (np.abs(got - want).max(), np.abs(want).max())
    assert model.config.scaling_factor == CONFIGS[name].get("scaling_factor", 1.0)


def test_sana_dcae_parameter_count():
    model = AutoencoderDC(DCAEConfig.named("dcae_f32c32_sana"))
    assert sum(x.size for x in jax.tree.leaves(model.init_shapes())) == 312_250_275  # diffusers, meta device
    assert model.config.scaling_factor == 0.41407 and model.downscale == 32


def test_bad_dcae_folder(tmp_path):
    import json

    torch_dcae(tmp_path, "deep")
    cfg = json.loads((tmp_path / "deep" / "config.json").read_text())
    (tmp_path / "deep" / "config.json").write_text(json.dumps(dict(cfg, latent_channels=3)))
    with pytest.raises(ConversionError, match="shape mismatches"):
        load_dcae(tmp_path / "deep")
    (tmp_path / "deep" / "config.json").write_text(json.dumps(dict(cfg, decoder_act_fns="tanh")))
    with pytest.raises(ConversionError, match="activation"):
        load_dcae(tmp_path / "deep")
