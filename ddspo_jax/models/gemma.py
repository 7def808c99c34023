"""Gemma-2 decoder stack in Flax linen: transformers' `Gemma2Model`, SANA's text encoder.

SANA conditions on the last hidden state (after the final norm) of Gemma-2-2B. The parameter tree mirrors the
PyTorch module tree (`embed_tokens`, `layers_<i>/{self_attn,mlp,*_layernorm}`, `norm`) so that
`ddspo_jax.convert.gemma` maps names with a plain key table. What differs from a textbook decoder, each as
transformers computes it:
  * the embedding is multiplied by sqrt(hidden_size), in the weights' dtype;
  * RMSNorm in float32 with (1 + w), cast back after the multiply;
  * grouped-query attention scaled by query_pre_attn_scalar^-1/2 (not head_dim), rotary embeddings
    (rotate-half layout), logits soft-capped as cap * tanh(logits / cap);
  * `layer_types`: "sliding_attention" layers see only keys with q - k < sliding_window (default: even layers);
  * four norms per layer (pre/post attention, pre/post feed-forward), a GELU(tanh)-gated MLP.
Masked logits take the dtype's minimum before the softmax, as transformers' additive mask does, so a query
with no visible key (left padding) averages uniformly in both.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddspo_jax.models.layers import gelu

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    """The fields of a transformers `Gemma2Config` that change `Gemma2Model`'s forward pass (hashable)."""

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    query_pre_attn_scalar: float = 256.0
    sliding_window: int | None = 4096
    attn_logit_softcapping: float | None = 50.0
    attention_bias: bool = False
    layer_types: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "Gemma2Config":
        """From a transformers config.json dict (transformers 4: top-level `rope_theta`; 5: `rope_parameters`)."""
        if config.get("model_type") not in (None, "gemma2"):
            raise ValueError(f"model_type {config.get('model_type')!r} is not a Gemma-2 config")
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "layer_types"}
        kwargs = {k: config[k] for k in fields if config.get(k) is not None}
        for k in ("sliding_window", "attn_logit_softcapping"):  # null in the file means "off"
            if k in config and config[k] is None:
                kwargs[k] = None
        rope = config.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"Gemma-2 rope_type {rope['rope_type']!r} is not supported (only 'default')")
        kwargs["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        n = int(kwargs.get("num_hidden_layers", cls.num_hidden_layers))
        types = config.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                              for i in range(n)]
        if len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
            raise ValueError(f"layer_types {types} do not name {n} sliding/full attention layers")
        act = kwargs.get("hidden_activation", cls.hidden_activation)
        if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu"):
            raise ValueError(f"unsupported Gemma-2 hidden_activation {act!r}")
        return cls(**kwargs, layer_types=tuple(types))

    @classmethod
    def named(cls, name: str) -> "Gemma2Config":
        """A shipped real config, e.g. "gemma2_2b" (SANA's text encoder)."""
        return cls.from_dict(json.loads((CONFIG_DIR / f"{name}.json").read_text()))


class RMSNorm(nn.Module):
    eps: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return (h * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def rotary(x, positions, theta: float):
    """Rotate-half rotary embedding of x [B, L, H, D] at integer positions [L]; cos/sin in x's dtype."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = positions.astype(jnp.float32)[:, None] * inv[None]
    emb = jnp.concatenate([freqs, freqs], -1)
    cos, sin = jnp.cos(emb).astype(x.dtype)[None, :, None], jnp.sin(emb).astype(x.dtype)[None, :, None]
    half = jnp.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + half * sin


class Gemma2Attention(nn.Module):
    config: Gemma2Config
    sliding: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        dense = lambda n, name: nn.Dense(n, use_bias=c.attention_bias, dtype=self.dtype,  # noqa: E731
                                         param_dtype=self.param_dtype, name=name)
        b, n, _ = x.shape
        q = dense(c.num_attention_heads * c.head_dim, "q_proj")(x).reshape(b, n, c.num_attention_heads, c.head_dim)
        k = dense(c.num_key_value_heads * c.head_dim, "k_proj")(x).reshape(b, n, c.num_key_value_heads, c.head_dim)
        v = dense(c.num_key_value_heads * c.head_dim, "v_proj")(x).reshape(b, n, c.num_key_value_heads, c.head_dim)
        pos = jnp.arange(n)
        q, k = rotary(q, pos, c.rope_theta), rotary(k, pos, c.rope_theta)
        rep = c.num_attention_heads // c.num_key_value_heads
        k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (c.query_pre_attn_scalar ** -0.5)
        if c.attn_logit_softcapping is not None:
            cap = c.attn_logit_softcapping
            logits = jnp.tanh(logits / cap) * cap
        visible = mask[:, None]  # [B, 1, Q, K]
        if self.sliding and c.sliding_window is not None:
            qi, ki = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
            visible = visible & (ki > qi - c.sliding_window)[None, None]
        logits = jnp.where(visible, logits, jnp.finfo(logits.dtype).min)
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, c.num_attention_heads * c.head_dim)
        return dense(c.hidden_size, "o_proj")(out)


class Gemma2MLP(nn.Module):
    config: Gemma2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                         name=name)
        act = gelu if c.hidden_activation == "gelu" else \
            (lambda y: jax.nn.gelu(y, approximate=True))
        return dense(c.hidden_size, "down_proj")(act(dense(c.intermediate_size, "gate_proj")(x))
                                                 * dense(c.intermediate_size, "up_proj")(x))


class Gemma2DecoderLayer(nn.Module):
    config: Gemma2Config
    sliding: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = lambda name: RMSNorm(c.rms_norm_eps, self.param_dtype, name=name)  # noqa: E731
        h = Gemma2Attention(c, self.sliding, **kw, name="self_attn")(norm("input_layernorm")(x), mask)
        x = x + norm("post_attention_layernorm")(h)
        h = Gemma2MLP(c, **kw, name="mlp")(norm("pre_feedforward_layernorm")(x))
        return x + norm("post_feedforward_layernorm")(h)


class Gemma2Model(nn.Module):
    """`apply({"params": p}, input_ids [B, L], attention_mask [B, L] of 0/1 or None)` -> last hidden state
    [B, L, hidden] after the final norm (transformers' `Gemma2Model(...).last_hidden_state`)."""

    config: Gemma2Config
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        c = self.config
        emb = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.param_dtype, param_dtype=self.param_dtype,
                       name="embed_tokens")(input_ids)
        x = (emb * jnp.asarray(c.hidden_size ** 0.5, self.param_dtype)).astype(self.dtype)
        n = input_ids.shape[1]
        keys = jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
        mask = keys[:, None, :] & jnp.tril(jnp.ones((n, n), bool))[None]  # [B, Q, K]: causal and not padding
        for i, kind in enumerate(c.layer_types):
            x = Gemma2DecoderLayer(c, kind == "sliding_attention", self.dtype, self.param_dtype,
                                   name=f"layers_{i}")(x, mask)
        return RMSNorm(c.rms_norm_eps, self.param_dtype, name="norm")(x)

    def init_shapes(self, seq_len: int = 8) -> Any:
        """The parameter tree as ShapeDtypeStructs (no memory): what the converter fills in."""
        ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
        return jax.eval_shape(lambda i: self.init(jax.random.key(0), i), ids)["params"]
