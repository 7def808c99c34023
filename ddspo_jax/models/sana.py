"""SANA's linear-attention DiT in Flax linen: diffusers' `SanaTransformer2DModel`, NHWC.

The parameter tree mirrors diffusers' module tree (`patch_embed/proj`, `time_embed/{emb/timestep_embedder,
linear}`, `caption_projection`, `caption_norm`, `transformer_blocks_<i>/{attn1,attn2,ff,scale_shift_table}`,
`scale_shift_table`, `proj_out`) so `ddspo_jax.convert.sana` maps names with a plain key table. Each
transformer block is a unit of remat and of the per-block fsdp gather (models/layers.unit), as the UNet's are.
What a block computes, as diffusers does:
  * AdaLN-single: one timestep embedding -> 6 x dim, added to each block's learned scale_shift_table;
  * self-attention is ReLU linear attention in float32: out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n +
    1e-15) (the "padded ones" row of the value matrix is the normaliser), no softmax;
  * cross-attention (softmax, through models/layers.attention) on the *un-normalised* hidden states, keys
    masked where the caption's attention mask is 0;
  * Mix-FFN (GLUMBConv): 1x1 conv to 2h, SiLU, 3x3 depthwise conv, h * SiLU(gate), 1x1 conv.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddspo_jax.models.layers import (GLUMBConv, LayerNorm, RMSNorm, TimestepEmbedding, attention,
                                     check_remat_policy, sequential, sincos_pos_embed, timestep_embedding)

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclasses.dataclass(frozen=True)
class SanaConfig:
    """The fields of diffusers' `SanaTransformer2DModel` config that change the forward pass (hashable)."""

    in_channels: int = 32
    out_channels: Optional[int] = 32
    num_attention_heads: int = 70
    attention_head_dim: int = 32
    num_layers: int = 20
    num_cross_attention_heads: int = 20
    cross_attention_head_dim: int = 112
    cross_attention_dim: int = 2240
    caption_channels: int = 2304
    mlp_ratio: float = 2.5
    attention_bias: bool = False
    sample_size: int = 32
    patch_size: int = 1
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: Optional[float] = None

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "SanaConfig":
        if config.get("_class_name") not in (None, "SanaTransformer2DModel"):
            raise ValueError(f"_class_name {config.get('_class_name')!r} is not SanaTransformer2DModel")
        for key, off in (("guidance_embeds", False), ("qk_norm", None)):
            if config.get(key, off) != off:
                raise ValueError(f"SANA config {key}={config[key]!r} (SANA-Sprint / SANA-1.5 variants) is not "
                                 "supported; SANA 600M/1600M have guidance_embeds false and qk_norm null")
        if "cross_attention_dim" in config and config["cross_attention_dim"] is None:
            raise ValueError("SANA config cross_attention_dim=null (no cross-attention) is not supported")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: config[k] for k in fields if k in config and config[k] is not None}
        if config.get("interpolation_scale", None) is None:
            kwargs.pop("interpolation_scale", None)
        out = cls(**kwargs)
        if out.cross_attention_dim != out.inner_dim:
            raise ValueError(f"cross_attention_dim {out.cross_attention_dim} != heads x head dim {out.inner_dim}")
        return out

    @classmethod
    def named(cls, name: str) -> "SanaConfig":
        """A shipped real config: "sana_600m_1024" or "sana_1600m_1024"."""
        return cls.from_dict(json.loads((CONFIG_DIR / f"{name}.json").read_text()))


def linear_attention(q, k, v, heads: int):
    """SANA's ReLU linear attention in float32; q, k, v [B, N, heads*D] (q, k already ReLU'd) -> [B, N, C]."""
    b, n, c = q.shape
    q, k, v = (a.astype(jnp.float32).reshape(b, n, heads, -1) for a in (q, k, v))
    kv = jnp.einsum("bmhd,bmhe->bhde", v, k)
    num = jnp.einsum("bhde,bnhe->bnhd", kv, q)
    den = jnp.einsum("bhe,bnhe->bnh", k.sum(1), q)
    return (num / (den[..., None] + 1e-15)).reshape(b, n, -1)


class SanaTransformerBlock(nn.Module):
    config: SanaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None
    hw: tuple[int, int] = (0, 0)  # the token grid (a static fact, so remat never traces it)

    @nn.compact
    def __call__(self, x, context, context_mask, temb):
        c, d, pd, hw = self.config, self.dtype, self.param_dtype, self.hw
        b, dim = x.shape[0], c.inner_dim
        table = self.param("scale_shift_table", nn.initializers.normal(dim ** -0.5), (6, dim), pd)
        mods = table[None].astype(temb.dtype) + temb.reshape(b, 6, dim)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (mods[:, i:i + 1] for i in range(6))

        h = (LayerNorm(c.norm_eps, affine=False)(x) * (1 + scale_msa) + shift_msa).astype(x.dtype)
        q = jax.nn.relu(_proj(self, "attn1", "to_q", dim, h, c.attention_bias))
        k = jax.nn.relu(_proj(self, "attn1", "to_k", dim, h, c.attention_bias))
        v = _proj(self, "attn1", "to_v", dim, h, c.attention_bias)
        a = linear_attention(q, k, v, c.num_attention_heads).astype(x.dtype)
        x = x + gate_msa * _out(self, "attn1", a)

        cd = c.num_cross_attention_heads * c.cross_attention_head_dim
        q = _proj(self, "attn2", "to_q", cd, x)
        k = _proj(self, "attn2", "to_k", cd, context)
        v = _proj(self, "attn2", "to_v", cd, context)
        mask = None if context_mask is None else context_mask.astype(bool)[:, None, None, :]
        a = attention(q, k, v, c.num_cross_attention_heads, self.attention_impl, mask=mask)
        x = x + _out(self, "attn2", a)

        h = LayerNorm(c.norm_eps, pd, c.norm_elementwise_affine, name="norm2")(x) * (1 + scale_mlp) + shift_mlp
        h = GLUMBConv(dim, c.mlp_ratio, norm=False, residual=False, dtype=d, param_dtype=pd, name="ff")(
            h.astype(x.dtype).reshape(b, *hw, dim))
        return x + gate_mlp * h.reshape(b, -1, dim)


def _proj(block, attn: str, name: str, n: int, x, bias: bool = True):
    """A projection of attention `attn` (flat Flax name `attn1_to_q`; the key table restores `attn1.to_q`)."""
    return nn.Dense(n, use_bias=bias, dtype=block.dtype, param_dtype=block.param_dtype, name=f"{attn}_{name}")(x)


def _out(block, attn: str, x):
    return nn.Dense(block.config.inner_dim, dtype=block.dtype, param_dtype=block.param_dtype,
                    name=f"{attn}_to_out_0")(x)


class SanaTransformer2DModel(nn.Module):
    """`apply({"params": p}, sample [B, H, W, C], timestep [B] (float, 0-1000), encoder_hidden_states
    [B, L, caption_channels], encoder_attention_mask [B, L] of 0/1 or None)` -> velocity [B, H, W, out]."""

    config: SanaConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None
    remat_policy: str = "none"
    gather: Any = None  # parallel.Gather inside the train step's shard_map (per-block fsdp gather)
    scan_blocks: bool = False  # the identical transformer blocks as one lax.scan (layers.sequential)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | SanaConfig, dtype=jnp.float32, param_dtype=jnp.float32,
                    attention_impl: Optional[str] = None, remat_policy: str = "none",
                    scan_blocks: bool = False) -> "SanaTransformer2DModel":
        check_remat_policy(remat_policy)
        cfg = config if isinstance(config, SanaConfig) else SanaConfig.from_dict(config)
        return cls(cfg, dtype, param_dtype, attention_impl, remat_policy, scan_blocks=scan_blocks)

    def init_shapes(self, tokens: int = 4) -> Any:
        c, s = self.config, self.config.patch_size * 2
        args = (jax.ShapeDtypeStruct((1, s, s, c.in_channels), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32),
                jax.ShapeDtypeStruct((1, tokens, c.caption_channels), jnp.float32))
        return jax.eval_shape(lambda *a: self.init(jax.random.key(0), *a), *args)["params"]

    @nn.compact
    def __call__(self, sample, timestep, encoder_hidden_states, encoder_attention_mask=None):
        c, d, pd = self.config, self.dtype, self.param_dtype
        b, height, width, ch = sample.shape
        if ch != c.in_channels:
            raise ValueError(f"sample must be NHWC with {c.in_channels} channels, got shape {sample.shape}")
        p, dim = c.patch_size, c.inner_dim
        hw = (height // p, width // p)
        x = nn.Conv(dim, (p, p), strides=(p, p), padding="VALID", dtype=d, param_dtype=pd,
                    name="patch_embed_proj")(sample.astype(d)).reshape(b, -1, dim)
        if c.interpolation_scale is not None:
            pos = sincos_pos_embed(dim, *hw, c.sample_size // p, c.interpolation_scale)
            x = (x.astype(jnp.float32) + pos[None]).astype(x.dtype)

        t = jnp.broadcast_to(jnp.asarray(timestep), (b,))
        t_emb = TimestepEmbedding(dim, d, pd, name="time_embed_emb_timestep_embedder")(
            timestep_embedding(t, 256, True, 0).astype(d))
        temb = nn.Dense(6 * dim, dtype=d, param_dtype=pd, name="time_embed_linear")(nn.silu(t_emb))

        ctx = nn.Dense(dim, dtype=d, param_dtype=pd, name="caption_projection_linear_1")(encoder_hidden_states.astype(d))
        ctx = nn.Dense(dim, dtype=d, param_dtype=pd, name="caption_projection_linear_2")(
            jax.nn.gelu(ctx, approximate=True))
        ctx = RMSNorm(1e-5, pd, name="caption_norm")(ctx)

        kw = dict(config=c, dtype=d, param_dtype=pd, attention_impl=self.attention_impl, hw=hw)
        x = sequential(self, SanaTransformerBlock, [(f"transformer_blocks_{i}", kw) for i in range(c.num_layers)],
                       self.remat_policy, self.gather, self.scan_blocks, x, ctx, encoder_attention_mask, temb)

        table = self.param("scale_shift_table", nn.initializers.normal(dim ** -0.5), (2, dim), pd)
        mods = table[None].astype(t_emb.dtype) + t_emb[:, None]
        x = LayerNorm(1e-6, affine=False)(x) * (1 + mods[:, 1:2]) + mods[:, 0:1]
        x = nn.Dense(p * p * c.out, dtype=d, param_dtype=pd, name="proj_out")(x.astype(d))
        x = x.reshape(b, *hw, p, p, c.out).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, hw[0] * p, hw[1] * p, c.out)
