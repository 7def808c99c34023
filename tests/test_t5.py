"""T5 encoder against transformers' `T5EncoderModel`, float32, tiny random configs saved with save_pretrained:
v1.1's gated-GELU and the original ReLU feed-forward, sequences longer than the exact-bucket range and than
max_distance (so the log-spaced and the clamped buckets are both exercised), right padding with and without
the attention mask; the bucket function by hand; T5-XXL's parameter count against transformers' on the meta
device."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from ddspo_jax.convert.common import ConversionError
from ddspo_jax.convert.t5 import load_t5
from ddspo_jax.models.t5 import T5Config, T5EncoderModel, relative_position_bucket

CONFIGS = {
    "gated": dict(vocab_size=50, d_model=16, d_kv=4, d_ff=24, num_layers=3, num_heads=3, num_decoder_layers=1,
                  relative_attention_num_buckets=8, relative_attention_max_distance=12,
                  feed_forward_proj="gated-gelu"),
    "relu": dict(vocab_size=40, d_model=12, d_kv=6, d_ff=20, num_layers=2, num_heads=2, num_decoder_layers=1,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="relu"),
}


def torch_t5(tmp_path, name):
    import torch
    from transformers import T5Config as Cfg, T5EncoderModel as Ref

    torch.manual_seed(len(name))
    ref = Ref(Cfg(**CONFIGS[name])).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path / name)
    return ref


@pytest.mark.parametrize("name", list(CONFIGS))
def test_t5_matches_transformers(tmp_path, name):
    import torch

    ref = torch_t5(tmp_path, name)
    model, params = load_t5(tmp_path / name, jnp.float32, jnp.float32)
    rng = np.random.default_rng(0)
    for t in (5, 40):  # 40 tokens: relative distances past max_distance 12 (the "gated" config) reach the clamp
        ids = rng.integers(1, CONFIGS[name]["vocab_size"], (2, t))
        mask = np.ones((2, t), np.int64)
        mask[1, t - 2:] = 0
        ids[1, t - 2:] = 0  # pad id 0, right padding as the tokenizer pads
        for m in (None, mask):
            with torch.no_grad():
                want = ref(torch.from_numpy(ids), attention_mask=None if m is None else torch.from_numpy(m)
                           ).last_hidden_state.numpy()
            got = np.asarray(model.apply({"params": params}, jnp.asarray(ids), None if m is None else jnp.asarray(m)))
            keep = np.ones((2, t), bool) if m is None else m.astype(bool)
            assert np.abs(got - want)[keep].max() <= 1e-5 * np.abs(want).max(), (t, m is None)


def test_relative_position_buckets_by_hand():
    """8 buckets, max distance 12: 4 per direction (key after query: +4); exact below 2; log-spaced to 12."""
    b = relative_position_bucket(1, 20, 8, 12)[0]  # query 0, keys 0..19: distances 0..19, all "after"
    assert list(b[:3]) == [0, 4 + 1, 4 + 2]  # 0 is its own bucket; 1 is exact; 2 starts the log range
    # distance n >= 2: 2 + floor(log(n / 2) / log(6) * 2), clamped to 3
    for n in range(2, 20):
        assert b[n] == 4 + min(2 + int(np.log(n / 2) / np.log(6) * 2), 3)
    back = relative_position_bucket(20, 1, 8, 12)[:, 0]  # keys before the query: the lower half
    assert back[1] == 1 and back[19] == 3


def test_t5_xxl_parameter_count():
    import torch
    from transformers import T5Config as Cfg, T5EncoderModel as Ref

    xxl = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
               feed_forward_proj="gated-gelu")  # google/t5-v1_1-xxl, SD3's text_encoder_3
    with torch.device("meta"):
        ref = Ref(Cfg(**xxl))
    want = sum(p.numel() for p in ref.parameters())
    model = T5EncoderModel(T5Config.from_dict(xxl))
    import jax

    assert sum(x.size for x in jax.tree.leaves(model.init_shapes())) == want
    assert 4.7e9 < want < 4.8e9


def test_bad_t5_inputs(tmp_path):
    torch_t5(tmp_path, "gated")
    folder = tmp_path / "gated"
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, num_layers=4)))
    with pytest.raises(ConversionError, match="missing keys"):
        load_t5(folder)
    (folder / "config.json").write_text(json.dumps(dict(cfg, feed_forward_proj="gated-silu")))
    with pytest.raises(ConversionError, match="feed_forward_proj"):
        load_t5(folder)
