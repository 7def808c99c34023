"""Gemma-2 (SANA's text encoder) against transformers' `Gemma2Model`, float32, on tiny random configs saved
with save_pretrained: GQA / MHA / MQA head layouts, odd layer counts, padding, sequences longer than the
sliding window, soft-capping on and off; the real Gemma-2-2B config's parameter count via jax.eval_shape."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddspo_jax.convert import load_gemma2
from ddspo_jax.convert.common import ConversionError
from ddspo_jax.models.gemma import Gemma2Config, Gemma2Model

CONFIGS = {
    # GQA (2 query heads per kv head), 3 layers (sliding, full, sliding), window 5 < sequence 11
    "gqa": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12, sliding_window=5),
    # MHA, head_dim * heads != hidden, no soft-capping, an explicit layer pattern
    "mha": dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=3,
                attn_logit_softcapping=None, layer_types=["full_attention", "sliding_attention"]),
    # MQA, 5 layers, strong soft-capping, rope_theta changed
    "mqa": dict(hidden_size=40, intermediate_size=24, num_hidden_layers=5, num_attention_heads=5,
                num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                attn_logit_softcapping=2.0, rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
}


def torch_gemma(tmp_path, name, kw):
    import torch
    import transformers

    torch.manual_seed(hash(name) % 1000)
    cfg = transformers.Gemma2Config(vocab_size=97, pad_token_id=0, **kw)
    model = transformers.Gemma2Model(cfg).eval()
    with torch.no_grad():  # norms start at zero (1 + w = 1): give them values so their layout is tested
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(0.0, 0.3)
    model.config._attn_implementation = "eager"
    folder = tmp_path / name
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gemma2_matches_transformers_with_padding_and_sliding_window(tmp_path, name):
    import torch

    ref, folder = torch_gemma(tmp_path, name, CONFIGS[name])
    model, params = load_gemma2(folder, dtype=jnp.float32, param_dtype=jnp.float32)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 97, (3, 11)).astype(np.int64)
    mask = np.ones((3, 11), np.int64)
    mask[1, 7:] = 0  # right padding (what SANA's tokenizer does)
    mask[2, :3] = 0  # left padding: the first queries see no key at all
    with torch.no_grad():
        want = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    got = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale, (np.abs(got - want).max(), scale)
    # without a mask = all ones
    with torch.no_grad():
        want0 = ref(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    got0 = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    assert np.abs(got0 - want0).max() <= 1e-4 * np.abs(want0).max()


def test_causal_lm_checkpoint_loads_too(tmp_path):
    import torch
    import transformers

    cfg = transformers.Gemma2Config(vocab_size=97, pad_token_id=0, **CONFIGS["gqa"])
    lm = transformers.Gemma2ForCausalLM(cfg).eval()
    lm.save_pretrained(tmp_path / "lm", safe_serialization=True)
    model, params = load_gemma2(tmp_path / "lm", dtype=jnp.float32, param_dtype=jnp.float32)
    ids = np.arange(1, 10)[None].astype(np.int64)
    with torch.no_grad():
        want = lm.model(input_ids=torch.from_numpy(ids)).last_hidden_state.numpy()
    got = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_gemma2_2b_parameter_count():
    model = Gemma2Model(Gemma2Config.named("gemma2_2b"))
    n = sum(x.size for x in jax.tree.leaves(model.init_shapes()))
    assert n == 2_614_341_888  # transformers' Gemma2Model(gemma-2-2b config) on the meta device


def test_bad_gemma_folders(tmp_path):
    ref, folder = torch_gemma(tmp_path, "gqa", CONFIGS["gqa"])
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 4
    cfg.pop("layer_types")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="missing keys"):
        load_gemma2(folder)
    cfg["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="not a Gemma-2 config"):
        load_gemma2(folder)
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "model.bin").write_bytes(b"x")
    with pytest.raises(ConversionError, match="pickle"):
        load_gemma2(tmp_path / "pickle" / "model.bin")
