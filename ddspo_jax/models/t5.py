"""T5 encoder stack in Flax linen: transformers' `T5EncoderModel`, SD3's third text encoder (T5-XXL v1.1).

The parameter tree mirrors the PyTorch module tree (`shared`, `block_<i>/layer_0_SelfAttention_{q,k,v,o}`,
`block_<i>/layer_1_DenseReluDense_{wi_0,wi_1,wo}`, `*_layer_norm`, `final_layer_norm`) so that
`ddspo_jax.convert.t5` maps names with a plain key table. What differs from a textbook encoder, each as
transformers computes it:
  * no position embeddings: a learned bias per head and *relative-position bucket* is added to the attention
    logits; only block 0 holds the table, and its bias serves every block;
  * buckets: half for each direction; exact below num_buckets / 4, log-spaced up to max_distance, the last
    bucket for everything farther;
  * logits are not scaled by 1/sqrt(d) (T5 folds it into the initialisation); softmax in float32;
  * pre-norm RMS layer norm without mean subtraction or bias (eps 1e-6);
  * v1.1's gated-GELU feed-forward, gelu_new(x wi_0) * (x wi_1) wo (the original T5's ReLU one too).
SD3's pipeline calls the encoder *without* an attention mask (padding tokens are attended to); a mask is
supported for other callers, additive at the dtype's minimum as transformers' is.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddspo_jax.models.layers import RMSNorm


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The fields of a transformers `T5Config` that change `T5EncoderModel`'s forward pass (hashable)."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "T5Config":
        if config.get("model_type") not in (None, "t5"):
            raise ValueError(f"model_type {config.get('model_type')!r} is not a T5 config")
        if config.get("feed_forward_proj", "relu") not in ("relu", "gated-gelu"):
            raise ValueError(f"feed_forward_proj {config['feed_forward_proj']!r} is not supported "
                             "(T5: relu, T5 v1.1 / T5-XXL: gated-gelu)")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: config[k] for k in fields if config.get(k) is not None})


def relative_position_bucket(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """transformers' bidirectional `_relative_position_bucket` of (key - query) -> int [q_len, k_len]."""
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    exact = half // 2
    safe = np.maximum(rel, 1).astype(np.float32)  # rel < exact is taken from the exact branch below
    large = exact + (np.log(safe / exact) / math.log(max_distance / exact) * (half - exact)).astype(np.int64)
    return buckets + np.where(rel < exact, rel, np.minimum(large, half - 1))


class T5Block(nn.Module):
    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, bias):
        c, d, pd = self.config, self.dtype, self.param_dtype
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=d, param_dtype=pd, name=name)  # noqa: E731
        b, t, _ = x.shape
        h = RMSNorm(c.layer_norm_epsilon, pd, name="layer_0_layer_norm")(x)
        q, k, v = (dense(c.num_heads * c.d_kv, f"layer_0_SelfAttention_{n}")(h).reshape(b, t, c.num_heads, c.d_kv)
                   for n in "qkv")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        a = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, -1)
        x = x + dense(c.d_model, "layer_0_SelfAttention_o")(a)

        h = RMSNorm(c.layer_norm_epsilon, pd, name="layer_1_layer_norm")(x)
        if c.gated:
            h = (jax.nn.gelu(dense(c.d_ff, "layer_1_DenseReluDense_wi_0")(h), approximate=True)
                 * dense(c.d_ff, "layer_1_DenseReluDense_wi_1")(h))
        else:
            h = jax.nn.relu(dense(c.d_ff, "layer_1_DenseReluDense_wi")(h))
        return x + dense(c.d_model, "layer_1_DenseReluDense_wo")(h)


class T5EncoderModel(nn.Module):
    """`apply({"params": p}, input_ids [B, T], attention_mask [B, T] of 0/1 or None)` -> last hidden state
    [B, T, d_model] (after the final layer norm, as transformers' `last_hidden_state`)."""

    config: T5Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def init_shapes(self, tokens: int = 4) -> Any:
        ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
        return jax.eval_shape(lambda i: self.init(jax.random.key(0), i), ids)["params"]

    @nn.compact
    def __call__(self, input_ids, attention_mask: Optional[jax.Array] = None):
        c, d, pd = self.config, self.dtype, self.param_dtype
        t = input_ids.shape[1]
        x = nn.Embed(c.vocab_size, c.d_model, dtype=d, param_dtype=pd, name="shared")(input_ids)
        table = nn.Embed(c.relative_attention_num_buckets, c.num_heads, param_dtype=pd,
                         name="block_0_layer_0_SelfAttention_relative_attention_bias")
        buckets = relative_position_bucket(t, t, c.relative_attention_num_buckets, c.relative_attention_max_distance)
        bias = table(jnp.asarray(buckets)).astype(jnp.float32).transpose(2, 0, 1)[None]  # [1, H, T, T]
        if attention_mask is not None:
            bias = bias + jnp.where(attention_mask[:, None, None, :].astype(bool), 0.0, jnp.finfo(jnp.float32).min)
        for i in range(c.num_layers):
            x = T5Block(c, d, pd, name=f"block_{i}")(x, bias)
        return RMSNorm(c.layer_norm_epsilon, pd, name="final_layer_norm")(x)
