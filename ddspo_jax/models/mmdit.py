"""SD3's MMDiT in Flax linen: diffusers' `SD3Transformer2DModel` (SD3-Medium, SD3.5 Medium / Large), NHWC.

The parameter tree mirrors diffusers' module tree (`pos_embed/proj`, `time_text_embed/{timestep_embedder,
text_embedder}`, `context_embedder`, `transformer_blocks_<i>/{norm1, norm1_context, attn, attn2, ff,
ff_context}`, `norm_out`, `proj_out`) so `ddspo_jax.convert.mmdit` maps names with a plain key table. Each
joint block is a unit of remat and of the per-block fsdp gather (models/layers.unit), as SANA's are.
What a block computes, as diffusers does:
  * two token streams, image x and text context, each with its own adaLN-Zero modulation from one
    conditioning vector (timestep embedding + projected pooled text embedding);
  * one *joint* softmax attention over the concatenated [image; text] tokens, each stream with its own
    q/k/v and output projections (SD3.5: RMS-normalised q and k per head);
  * the last block is "context pre-only": the text stream only feeds that block's keys and values;
  * SD3.5 Medium's "dual attention" blocks add a second, image-only self-attention with its own modulation.
Positions: a fixed 2-D sin-cos table for a `pos_embed_max_size` grid, the centre crop of the latent's size.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddspo_jax.models.layers import (LayerNorm, RMSNorm, TimestepEmbedding, attention, check_remat_policy,
                                     sequential, sincos_pos_embed, timestep_embedding)

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """The fields of diffusers' `SD3Transformer2DModel` config that change the forward pass (hashable)."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: Optional[int] = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: Optional[str] = None

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "MMDiTConfig":
        if config.get("_class_name") not in (None, "SD3Transformer2DModel"):
            raise ValueError(f"_class_name {config.get('_class_name')!r} is not SD3Transformer2DModel")
        if config.get("qk_norm") not in (None, "rms_norm"):
            raise ValueError(f"qk_norm {config['qk_norm']!r} is not supported (SD3: null, SD3.5: rms_norm)")
        if not config.get("pos_embed_max_size"):
            raise ValueError("pos_embed_max_size null (no cropped position table) is not an SD3 config")
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: config[k] for k in fields if k in config}
        kwargs["dual_attention_layers"] = tuple(int(i) for i in kwargs.get("dual_attention_layers") or ())
        out = cls(**kwargs)
        if out.caption_projection_dim != out.inner_dim:
            raise ValueError(f"caption_projection_dim {out.caption_projection_dim} != heads x head dim "
                             f"{out.inner_dim} (the joint attention needs one width)")
        return out

    @classmethod
    def named(cls, name: str) -> "MMDiTConfig":
        """A shipped real config: "sd3_medium" or "sd35_large"."""
        return cls.from_dict(json.loads((CONFIG_DIR / f"{name}.json").read_text()))


def _dense(m: nn.Module, n: int, name: str):
    return nn.Dense(n, dtype=m.dtype, param_dtype=m.param_dtype, name=name)


def _heads_norm(m: nn.Module, x, heads: int, name: str):
    """RMSNorm over each head's features (diffusers' qk_norm="rms_norm", eps 1e-6)."""
    b, t, c = x.shape
    return RMSNorm(1e-6, m.param_dtype, name=name)(x.reshape(b, t, heads, c // heads)).reshape(b, t, c)


def _qkv(m: nn.Module, x, prefix: str, names: tuple[str, str, str], norms: tuple[str, str] | None):
    c = m.config
    q, k, v = (_dense(m, c.inner_dim, f"{prefix}_{n}")(x) for n in names)
    if norms is not None:
        q = _heads_norm(m, q, c.num_attention_heads, f"{prefix}_{norms[0]}")
        k = _heads_norm(m, k, c.num_attention_heads, f"{prefix}_{norms[1]}")
    return q, k, v


def _ff(m: nn.Module, x, prefix: str):
    """diffusers' FeedForward(activation_fn="gelu-approximate"): Linear 4x, tanh-GELU, Linear."""
    h = _dense(m, 4 * m.config.inner_dim, f"{prefix}_net_0_proj")(x)
    return _dense(m, m.config.inner_dim, f"{prefix}_net_2")(jax.nn.gelu(h, approximate=True))


class JointTransformerBlock(nn.Module):
    config: MMDiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None
    context_pre_only: bool = False
    dual_attention: bool = False

    @nn.compact
    def __call__(self, x, ctx, temb):
        c, dim = self.config, self.config.inner_dim
        heads, n_img = c.num_attention_heads, x.shape[1]
        norm = lambda h: LayerNorm(1e-6, affine=False)(h)  # noqa: E731
        qk = ("norm_q", "norm_k") if c.qk_norm else None
        e = jax.nn.silu(temb)

        mods = _dense(self, (9 if self.dual_attention else 6) * dim, "norm1_linear")(e)
        mods = [mods[:, i * dim:(i + 1) * dim][:, None] for i in range(mods.shape[-1] // dim)]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        nx = norm(x)
        h = (nx * (1 + scale_msa) + shift_msa).astype(x.dtype)
        if self.context_pre_only:  # AdaLayerNormContinuous: (scale, shift), no gates
            cm = _dense(self, 2 * dim, "norm1_context_linear")(e)
            hc = (norm(ctx) * (1 + cm[:, None, :dim]) + cm[:, None, dim:]).astype(ctx.dtype)
        else:
            cm = _dense(self, 6 * dim, "norm1_context_linear")(e)
            c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = (
                cm[:, i * dim:(i + 1) * dim][:, None] for i in range(6))
            hc = (norm(ctx) * (1 + c_scale_msa) + c_shift_msa).astype(ctx.dtype)

        q, k, v = _qkv(self, h, "attn", ("to_q", "to_k", "to_v"), qk)
        qc, kc, vc = _qkv(self, hc, "attn", ("add_q_proj", "add_k_proj", "add_v_proj"),
                          ("norm_added_q", "norm_added_k") if c.qk_norm else None)
        a = attention(jnp.concatenate([q, qc], 1), jnp.concatenate([k, kc], 1), jnp.concatenate([v, vc], 1),
                      heads, self.attention_impl)
        x = x + gate_msa * _dense(self, dim, "attn_to_out_0")(a[:, :n_img])
        if self.dual_attention:  # SD3.5: an image-only self-attention on the same normalised input
            shift2, scale2, gate2 = mods[6:]
            q2, k2, v2 = _qkv(self, (nx * (1 + scale2) + shift2).astype(x.dtype), "attn2", ("to_q", "to_k", "to_v"), qk)
            x = x + gate2 * _dense(self, dim, "attn2_to_out_0")(attention(q2, k2, v2, heads, self.attention_impl))
        x = x + gate_mlp * _ff(self, (norm(x) * (1 + scale_mlp) + shift_mlp).astype(x.dtype), "ff")
        if self.context_pre_only:  # diffusers returns None; the unchanged stream keeps the block's outputs uniform
            return x, ctx
        ctx = ctx + c_gate_msa * _dense(self, dim, "attn_to_add_out")(a[:, n_img:])
        ctx = ctx + c_gate_mlp * _ff(self, (norm(ctx) * (1 + c_scale_mlp) + c_shift_mlp).astype(ctx.dtype),
                                     "ff_context")
        return x, ctx


class SD3Transformer2DModel(nn.Module):
    """`apply({"params": p}, sample [B, H, W, C], timestep [B] (float sigma x 1000), encoder_hidden_states
    [B, L, joint_attention_dim], pooled_projections [B, pooled_projection_dim])` -> velocity [B, H, W, out]."""

    config: MMDiTConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None
    remat_policy: str = "none"
    gather: Any = None  # parallel.Gather inside the train step's shard_map (per-block fsdp gather)
    scan_blocks: bool = False  # the identical transformer blocks as one lax.scan (layers.sequential)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | MMDiTConfig, dtype=jnp.float32, param_dtype=jnp.float32,
                    attention_impl: Optional[str] = None, remat_policy: str = "none",
                    scan_blocks: bool = False) -> "SD3Transformer2DModel":
        check_remat_policy(remat_policy)
        cfg = config if isinstance(config, MMDiTConfig) else MMDiTConfig.from_dict(config)
        return cls(cfg, dtype, param_dtype, attention_impl, remat_policy, scan_blocks=scan_blocks)

    def init_shapes(self, tokens: int = 4) -> Any:
        c, s = self.config, self.config.patch_size * 2
        args = (jax.ShapeDtypeStruct((1, s, s, c.in_channels), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32),
                jax.ShapeDtypeStruct((1, tokens, c.joint_attention_dim), jnp.float32),
                jax.ShapeDtypeStruct((1, c.pooled_projection_dim), jnp.float32))
        return jax.eval_shape(lambda *a: self.init(jax.random.key(0), *a), *args)["params"]

    @nn.compact
    def __call__(self, sample, timestep, encoder_hidden_states, pooled_projections):
        c, d, pd = self.config, self.dtype, self.param_dtype
        b, height, width, ch = sample.shape
        if ch != c.in_channels:
            raise ValueError(f"sample must be NHWC with {c.in_channels} channels, got shape {sample.shape}")
        p, dim, grid = c.patch_size, c.inner_dim, c.pos_embed_max_size
        hw = (height // p, width // p)
        if max(hw) > grid:
            raise ValueError(f"a {height}x{width} latent is {hw[0]}x{hw[1]} patches, more than the position "
                             f"table's {grid}x{grid} (pos_embed_max_size)")
        x = nn.Conv(dim, (p, p), strides=(p, p), padding="VALID", dtype=d, param_dtype=pd,
                    name="pos_embed_proj")(sample.astype(d))
        top, left = (grid - hw[0]) // 2, (grid - hw[1]) // 2
        pos = sincos_pos_embed(dim, grid, grid, c.sample_size // p, 1.0).reshape(grid, grid, dim)
        x = (x.astype(jnp.float32) + pos[None, top:top + hw[0], left:left + hw[1]]).astype(d).reshape(b, -1, dim)

        t = jnp.broadcast_to(jnp.asarray(timestep), (b,))
        temb = TimestepEmbedding(dim, d, pd, name="time_text_embed_timestep_embedder")(
            timestep_embedding(t, 256, True, 0).astype(d))
        pooled = nn.Dense(dim, dtype=d, param_dtype=pd, name="time_text_embed_text_embedder_linear_1")(
            pooled_projections.astype(d))
        temb = temb + nn.Dense(dim, dtype=d, param_dtype=pd, name="time_text_embed_text_embedder_linear_2")(
            jax.nn.silu(pooled))
        ctx = nn.Dense(c.caption_projection_dim, dtype=d, param_dtype=pd, name="context_embedder")(
            encoder_hidden_states.astype(d))

        blocks = [(f"transformer_blocks_{i}", dict(config=c, dtype=d, param_dtype=pd, attention_impl=self.attention_impl,
                                                   context_pre_only=i == c.num_layers - 1,
                                                   dual_attention=i in c.dual_attention_layers))
                  for i in range(c.num_layers)]
        x, ctx = sequential(self, JointTransformerBlock, blocks, self.remat_policy, self.gather, self.scan_blocks,
                            (x, ctx), temb)

        mods = nn.Dense(2 * dim, dtype=d, param_dtype=pd, name="norm_out_linear")(jax.nn.silu(temb))
        x = LayerNorm(1e-6, affine=False)(x) * (1 + mods[:, None, :dim]) + mods[:, None, dim:]
        x = nn.Dense(p * p * c.out, dtype=d, param_dtype=pd, name="proj_out")(x.astype(d))
        x = x.reshape(b, *hw, p, p, c.out).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, hw[0] * p, hw[1] * p, c.out)
