"""CLIP vision tower, CLIPModel and the CLIP image preprocessing: parity with transformers on tiny models.

Everything is built here with random weights and saved with save_pretrained; nothing is downloaded.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddspo_jax.convert.clip import load_clip_model, load_clip_vision
from ddspo_jax.convert.common import ConversionError
from ddspo_jax.models.clip_text import count_params
from ddspo_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionModel

transformers = pytest.importorskip("transformers")


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("logit_scale"):
                p.fill_(2.0)
            else:
                p.copy_(1.0 + 0.2 * noise if ("norm" in name and name.endswith("weight")) else
                        (0.1 if p.ndim == 1 else 0.2) * noise)
    return model.eval()


def vision_config(patch=4, act="quick_gelu", hidden=32, heads=4, layers=2, image=16, projection=12):
    return transformers.CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden + 5,
                                         num_hidden_layers=layers, num_attention_heads=heads, image_size=image,
                                         patch_size=patch, hidden_act=act, projection_dim=projection,
                                         layer_norm_eps=1e-5)


def clip_model_config(patch=4, act="gelu", vocab=64):
    text = transformers.CLIPTextConfig(vocab_size=vocab, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                                       num_attention_heads=2, max_position_embeddings=16, hidden_act=act,
                                       bos_token_id=vocab - 2, eos_token_id=2, pad_token_id=1, projection_dim=12)
    return transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision_config(patch, act).to_dict(),
                                   projection_dim=12)


def save_vision(tmp_path, seed=0, **kw):
    model = _randomize(transformers.CLIPVisionModelWithProjection(vision_config(**kw)), seed)
    folder = tmp_path / f"vision{seed}"
    model.save_pretrained(folder)
    return model, folder


def save_clip(tmp_path, seed=0, **kw):
    model = _randomize(transformers.CLIPModel(clip_model_config(**kw)), seed)
    folder = tmp_path / f"clip{seed}"
    model.save_pretrained(folder)
    return model, folder


def _pixels(n, size, seed):
    return np.random.default_rng(seed).normal(size=(n, 3, size, size)).astype(np.float32)


@pytest.mark.parametrize("kw", [dict(patch=4, act="quick_gelu"), dict(patch=8, act="gelu", heads=2, layers=3)])
def test_vision_tower_matches_transformers(tmp_path, kw):
    torch_model, folder = save_vision(tmp_path, **kw)
    model, params = load_clip_vision(folder)
    x = _pixels(3, 16, 1)
    with torch.no_grad():
        want = torch_model(pixel_values=torch.from_numpy(x))
    got = model.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(got["image_embeds"], want.image_embeds.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["last_hidden_state"], want.last_hidden_state.numpy(), rtol=1e-5, atol=1e-5)
    assert count_params(params) == sum(p.numel() for p in torch_model.parameters())


def test_clip_model_logits_match_transformers(tmp_path):
    torch_model, folder = save_clip(tmp_path)
    model, params = load_clip_model(folder)
    x = _pixels(2, 16, 2)
    ids = np.array([[62, 5, 9, 11, 2, 1, 1], [62, 7, 2, 1, 1, 1, 1], [62, 3, 4, 5, 6, 8, 2]])
    mask = (np.arange(7)[None] <= np.argmax(ids == 2, axis=1)[:, None]).astype(np.int64)
    with torch.no_grad():
        want = torch_model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(x),
                           attention_mask=torch.from_numpy(mask))
    got = model.apply({"params": params}, ids, jnp.asarray(x.transpose(0, 2, 3, 1)), mask)
    np.testing.assert_allclose(got["logits_per_image"], want.logits_per_image.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["image_embeds"], want.image_embeds.numpy(), rtol=1e-5, atol=1e-6)
    # the vision tower alone, from the same CLIPModel folder
    vmodel, vparams = load_clip_vision(folder)
    emb = vmodel.apply({"params": vparams}, jnp.asarray(x.transpose(0, 2, 3, 1)))["image_embeds"]
    with torch.no_grad():
        feats = torch_model.visual_projection(torch_model.vision_model(pixel_values=torch.from_numpy(x)).pooler_output)
    np.testing.assert_allclose(emb, feats.numpy(), rtol=1e-5, atol=1e-5)


def _meta_count(cfg) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in transformers.CLIPVisionModelWithProjection(cfg).parameters())


@pytest.mark.parametrize("name,kw", [
    ("ViT-L/14", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")),
    ("ViT-H/14", dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                      image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")),
])
def test_real_vision_configs_parameter_counts(name, kw):
    cfg = transformers.CLIPVisionConfig(**kw)
    ours = CLIPVisionModel(CLIPVisionConfig.from_dict(cfg.to_dict(), with_projection=True)).init_shapes()
    assert count_params(ours) == _meta_count(cfg), name


def test_bad_vision_folders(tmp_path):
    _, folder = save_vision(tmp_path)
    (folder / "config.json").rename(folder / "other.json")
    with pytest.raises(ConversionError, match="config.json"):
        load_clip_vision(folder)
    _, folder = save_vision(tmp_path, seed=1)
    from ddspo_jax.convert.common import read_state_dict, write_safetensors
    sd = read_state_dict(folder)
    sd["visual_projection.weight"] = sd["visual_projection.weight"][:, :-1]
    write_safetensors(sd, folder / "model.safetensors")
    with pytest.raises(ConversionError, match="visual_projection.weight: file has"):
        load_clip_vision(folder)
    _, folder = save_vision(tmp_path, seed=2)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "clip_vision_model"
    with pytest.raises(ConversionError, match="model_type"):
        load_clip_model(folder)
