"""Flax port of diffusers' `UNet2DConditionModel` as SD-1.x, SD-2 and SDXL configure it (NHWC).

Built from the diffusers `config.json` dict itself (`UNet2DConditionModel.from_config(cfg)`), so one
file configures both implementations and export writes the same dict back. Module names mirror
diffusers' (`down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_q`) so the key table in
`ddspo_jax.convert.unet` is a list of module-list names and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from ddspo_jax.errors import ModelError
from ddspo_jax.models.layers import (  # noqa: F401  (apply_sharded, in_unit: re-exported)
    ATTENTION_IMPLS, Downsample2D, GroupNorm, LayerNorm, ResnetBlock2D, TimestepEmbedding, Upsample2D, apply_sharded,
    in_unit,
    attention, check_remat_policy, conv, gelu, sequential, timestep_embedding, unit,
)

Dtype = Any


class UnsupportedConfigError(ModelError):
    """A diffusers config value this port does not implement (the message names the field)."""


# Fields whose value must equal diffusers' default for the port to be exact.
_MUST_EQUAL = {
    "class_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "dual_cross_attention": False, "time_embedding_type": "positional",
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "attention_type": "default", "class_embeddings_concat": False, "cross_attention_norm": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
}
# Fields that only affect pieces this port never builds (simple-attention blocks, sizes) or are metadata.
_IGNORED = {"sample_size", "resnet_out_scale_factor", "mid_block_only_cross_attention",
            "addition_embed_type_num_heads"}
_KNOWN = set(_MUST_EQUAL) | _IGNORED | {
    "in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
    "down_block_types", "mid_block_type", "up_block_types", "only_cross_attention", "block_out_channels",
    "layers_per_block", "downsample_padding", "mid_block_scale_factor", "dropout", "act_fn",
    "norm_num_groups", "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
    "reverse_transformer_layers_per_block", "attention_head_dim", "num_attention_heads",
    "use_linear_projection", "addition_embed_type", "addition_time_embed_dim", "upcast_attention",
    "time_embedding_dim", "conv_in_kernel", "conv_out_kernel", "projection_class_embeddings_input_dim",
}
# diffusers' defaults for fields a config may omit (older config files are shorter).
_DEFAULTS = {
    "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "layers_per_block": 2, "downsample_padding": 1, "mid_block_scale_factor": 1.0, "dropout": 0.0,
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1, "reverse_transformer_layers_per_block": None,
    "attention_head_dim": 8, "num_attention_heads": None, "use_linear_projection": False,
    "addition_embed_type": None, "addition_time_embed_dim": None, "upcast_attention": False,
    "time_embedding_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
}
_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
_MID_TYPES = ("UNetMidBlock2DCrossAttn", None)


def _per_block(value, n: int, field: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UnsupportedConfigError(f"UNet config field {field!r} has {len(value)} entries, expected {n}")
        return tuple(value)
    return (value,) * n


def _per_layer(value, n_layers: int, field: str) -> tuple[int, ...]:
    """transformer_layers_per_block entry: int (same for every resnet of the block) or per-layer list."""
    if isinstance(value, (list, tuple)):
        if len(value) != n_layers:
            raise UnsupportedConfigError(f"UNet config field {field!r}: {list(value)} has {len(value)} "
                                         f"entries, the block has {n_layers} layers")
        return tuple(int(v) for v in value)
    return (int(value),) * n_layers


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The diffusers config, validated and normalised to per-block tuples (hashable: a module field)."""

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    mid_block_type: Optional[str]
    layers_per_block: tuple[int, ...]
    down_transformer_layers: tuple[tuple[int, ...], ...]  # [block][resnet layer]
    up_transformer_layers: tuple[tuple[int, ...], ...]
    mid_transformer_layers: int
    num_heads: tuple[int, ...]
    cross_attention_dim: tuple[int, ...]
    only_cross_attention: tuple[bool, ...]
    use_linear_projection: bool
    upcast_attention: bool
    flip_sin_to_cos: bool
    freq_shift: float
    center_input_sample: bool
    norm_num_groups: int
    norm_eps: float
    downsample_padding: int
    mid_block_scale_factor: float
    conv_in_kernel: int
    conv_out_kernel: int
    time_embed_dim: int
    addition_embed_type: Optional[str]
    addition_time_embed_dim: Optional[int]
    projection_class_embeddings_input_dim: Optional[int]
    diffusers_json: str  # the original dict, written back verbatim on export

    @property
    def diffusers_config(self) -> dict:
        return json.loads(self.diffusers_json)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConfig":
        cls_name = config.get("_class_name", "UNet2DConditionModel")
        if cls_name != "UNet2DConditionModel":
            raise UnsupportedConfigError(f"UNet config field '_class_name' is {cls_name!r}, "
                                         "only UNet2DConditionModel is supported")
        unknown = sorted(k for k in config if not k.startswith("_") and k not in _KNOWN)
        if unknown:
            raise UnsupportedConfigError(f"UNet config has fields this port does not know: {unknown}")
        for field, default in _MUST_EQUAL.items():
            if field in config and config[field] != default:
                raise UnsupportedConfigError(
                    f"UNet config field {field!r}={config[field]!r} is not supported (only {default!r})")
        c = {**_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}

        def bad(field, why):
            raise UnsupportedConfigError(f"UNet config field {field!r}={c[field]!r} is not supported: {why}")

        if c["act_fn"] not in ("silu", "swish"):
            bad("act_fn", "only silu/swish")
        if c["dropout"] not in (0, 0.0):
            bad("dropout", "dropout is not implemented (use 0.0)")
        if c["norm_num_groups"] is None:
            bad("norm_num_groups", "a group norm before conv_out is required")
        if c["mid_block_type"] not in _MID_TYPES:
            bad("mid_block_type", f"supported: {_MID_TYPES}")
        if c["addition_embed_type"] not in (None, "text_time"):
            bad("addition_embed_type", "supported: None, 'text_time'")
        if c["addition_embed_type"] == "text_time" and (
                not c["addition_time_embed_dim"] or not c["projection_class_embeddings_input_dim"]):
            bad("addition_embed_type", "text_time needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim")
        down, up = tuple(c["down_block_types"]), tuple(c["up_block_types"])
        n = len(down)
        for field, types, ok in (("down_block_types", down, _DOWN_TYPES), ("up_block_types", up, _UP_TYPES)):
            for t in types:
                if t not in ok:
                    raise UnsupportedConfigError(f"UNet config field {field!r} contains {t!r}; supported: {ok}")
        if len(up) != n or len(c["block_out_channels"]) != n:
            bad("up_block_types", "down_block_types, up_block_types and block_out_channels need equal lengths")
        heads = _per_block(c["num_attention_heads"] or c["attention_head_dim"], n,
                           "num_attention_heads" if c["num_attention_heads"] else "attention_head_dim")
        layers = tuple(int(x) for x in _per_block(c["layers_per_block"], n, "layers_per_block"))
        tlpb = _per_block(c["transformer_layers_per_block"], n, "transformer_layers_per_block")
        down_t = tuple(_per_layer(v, layers[i], "transformer_layers_per_block") for i, v in enumerate(tlpb))
        rev = c["reverse_transformer_layers_per_block"]
        if rev is None:
            if any(isinstance(v, (list, tuple)) for v in tlpb):
                bad("transformer_layers_per_block", "per-layer lists need reverse_transformer_layers_per_block")
            rev = tuple(reversed(tlpb))
        rev = _per_block(rev, n, "reverse_transformer_layers_per_block")
        up_layers = tuple(reversed(layers))
        up_t = tuple(_per_layer(v, up_layers[i] + 1, "reverse_transformer_layers_per_block")
                     for i, v in enumerate(rev))
        mid_t = tlpb[-1]
        if isinstance(mid_t, (list, tuple)):
            mid_t = mid_t[0]
        only_cross = _per_block(c["only_cross_attention"], n, "only_cross_attention")
        cross = tuple(int(x) for x in _per_block(c["cross_attention_dim"], n, "cross_attention_dim"))
        for i, ch in enumerate(c["block_out_channels"]):
            if ch % heads[i]:
                bad("attention_head_dim", f"block {i}: {ch} channels not divisible by {heads[i]} heads")
        return cls(
            in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]),
            block_out_channels=tuple(int(x) for x in c["block_out_channels"]),
            down_block_types=down, up_block_types=up, mid_block_type=c["mid_block_type"],
            layers_per_block=layers, down_transformer_layers=down_t, up_transformer_layers=up_t,
            mid_transformer_layers=int(mid_t), num_heads=tuple(int(h) for h in heads),
            cross_attention_dim=cross, only_cross_attention=tuple(bool(x) for x in only_cross),
            use_linear_projection=bool(c["use_linear_projection"]),
            upcast_attention=bool(c["upcast_attention"]), flip_sin_to_cos=bool(c["flip_sin_to_cos"]),
            freq_shift=float(c["freq_shift"]), center_input_sample=bool(c["center_input_sample"]),
            norm_num_groups=int(c["norm_num_groups"]), norm_eps=float(c["norm_eps"]),
            downsample_padding=int(c["downsample_padding"]),
            mid_block_scale_factor=float(c["mid_block_scale_factor"]),
            conv_in_kernel=int(c["conv_in_kernel"]), conv_out_kernel=int(c["conv_out_kernel"]),
            time_embed_dim=int(c["time_embedding_dim"] or c["block_out_channels"][0] * 4),
            addition_embed_type=c["addition_embed_type"],
            addition_time_embed_dim=c["addition_time_embed_dim"],
            projection_class_embeddings_input_dim=c["projection_class_embeddings_input_dim"],
            diffusers_json=json.dumps(dict(config), sort_keys=True),
        )


# ------------------------------------------------------------------------------------------ blocks

@dataclasses.dataclass(frozen=True)
class _Opts:
    """Options every block needs, passed as one hashable field."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: Optional[str] = None
    upcast_attention: bool = False
    remat_policy: str = "none"
    gather: Any = None  # parallel.Gather inside the train step's shard_map (per-block fsdp gather)
    scan_blocks: bool = False  # each Transformer2D's identical blocks as one lax.scan (layers.sequential)


class Attention(nn.Module):
    """diffusers `Attention` as the transformer blocks use it (no bias on q/k/v, bias on to_out.0)."""

    heads: int
    opts: _Opts

    @nn.compact
    def __call__(self, x, context=None):
        o = self.opts
        dim = x.shape[-1]
        ctx = x if context is None else context
        dense = lambda f, name, bias=False: nn.Dense(f, use_bias=bias, dtype=o.dtype, param_dtype=o.param_dtype,
                                                      name=name)
        q, k, v = dense(dim, "to_q")(x), dense(dim, "to_k")(ctx), dense(dim, "to_v")(ctx)
        h = attention(q, k, v, self.heads, o.attention_impl, o.upcast_attention)
        return dense(dim, "to_out_0", bias=True)(h)


class FeedForward(nn.Module):
    """GEGLU feed-forward: net.0.proj (dim -> 2*4*dim), h * gelu(gate), net.2 (4*dim -> dim)."""

    opts: _Opts
    mult: int = 4

    @nn.compact
    def __call__(self, x):
        o = self.opts
        dim = x.shape[-1]
        h = _GEGLU(dim * self.mult, o, name="net_0")(x)
        return nn.Dense(dim, dtype=o.dtype, param_dtype=o.param_dtype, name="net_2")(h)


class _GEGLU(nn.Module):
    inner: int
    opts: _Opts

    @nn.compact
    def __call__(self, x):
        return _GEGLUProj(self.inner, self.opts, name="proj")(x)


class _GEGLUProj(nn.Module):
    """diffusers' GEGLU `proj` Linear (dim -> 2*inner, kernel and bias as one tensor each, as stored), applied
    as two products with the kernel's halves: slicing the [dim, 2*inner] weight instead of splitting the
    [tokens, 2*inner] output saves two activation-sized copies forward and a concatenation backward
    (the CPU train step 1.5 % faster, measured side by side)."""

    inner: int
    opts: _Opts

    @nn.compact
    def __call__(self, x):
        o, n = self.opts, self.inner
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 2 * n), o.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (2 * n,), o.param_dtype)
        x, kernel, bias = x.astype(o.dtype), kernel.astype(o.dtype), bias.astype(o.dtype)
        h = x @ kernel[:, :n] + bias[:n]
        gate = x @ kernel[:, n:] + bias[n:]
        return h * gelu(gate)


class BasicTransformerBlock(nn.Module):
    heads: int
    only_cross_attention: bool
    opts: _Opts

    @nn.compact
    def __call__(self, x, context):
        pd = self.opts.param_dtype
        h = LayerNorm(1e-5, pd, name="norm1")(x)
        x = x + Attention(self.heads, self.opts, name="attn1")(h, context if self.only_cross_attention else None)
        h = LayerNorm(1e-5, pd, name="norm2")(x)
        x = x + Attention(self.heads, self.opts, name="attn2")(h, context)
        h = LayerNorm(1e-5, pd, name="norm3")(x)
        return x + FeedForward(self.opts, name="ff")(h)


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in (1x1 conv or linear) -> transformer blocks -> proj_out -> + residual."""

    heads: int
    num_layers: int
    groups: int
    use_linear_projection: bool
    only_cross_attention: bool
    opts: _Opts

    @nn.compact
    def __call__(self, x, context):
        o = self.opts
        b, hgt, wid, ch = x.shape
        h = GroupNorm(self.groups, 1e-6, o.param_dtype, name="norm")(x)
        if self.use_linear_projection:
            h = nn.Dense(ch, dtype=o.dtype, param_dtype=o.param_dtype, name="proj_in")(h.reshape(b, -1, ch))
        else:
            h = conv(ch, 1, o.dtype, o.param_dtype, "proj_in")(h).reshape(b, -1, ch)
        kw = dict(heads=self.heads, only_cross_attention=self.only_cross_attention, opts=o)
        h = sequential(self, BasicTransformerBlock, [(f"transformer_blocks_{i}", kw) for i in range(self.num_layers)],
                       o.remat_policy, o.gather, o.scan_blocks, h, context)
        if self.use_linear_projection:
            h = nn.Dense(ch, dtype=o.dtype, param_dtype=o.param_dtype, name="proj_out")(h)
            h = h.reshape(b, hgt, wid, ch)
        else:
            h = conv(ch, 1, o.dtype, o.param_dtype, "proj_out")(h.reshape(b, hgt, wid, ch))
        return h + x


class UNetBlock(nn.Module):
    """One down or up block (with or without cross-attention), diffusers' Cross/AttnDown/UpBlock2D."""

    kind: str  # "down" | "up"
    out_channels: int
    num_layers: int
    transformer_layers: tuple[int, ...]  # empty: no attention
    heads: int
    only_cross_attention: bool
    add_sample: bool  # downsampler / upsampler at the end
    cfg: UNetConfig
    opts: _Opts

    @nn.compact
    def __call__(self, x, temb, context, res=(), upsample_size=None):
        c, o = self.cfg, self.opts
        resnet = lambda name: unit(ResnetBlock2D, o.remat_policy, o.gather, self.path + (name,))  # noqa: E731
        outputs = ()
        res = list(res)
        for j in range(self.num_layers):
            if self.kind == "up":
                x = jnp.concatenate([x, res.pop().astype(x.dtype)], axis=-1)
            x = resnet(f"resnets_{j}")(self.out_channels, c.norm_num_groups, c.norm_eps, 1.0, o.dtype,
                                       o.param_dtype, name=f"resnets_{j}")(x, temb)
            if self.transformer_layers:
                x = Transformer2DModel(self.heads, self.transformer_layers[j], c.norm_num_groups,
                                       c.use_linear_projection, self.only_cross_attention, o,
                                       name=f"attentions_{j}")(x, context)
            outputs += (x,)
        if self.add_sample and self.kind == "down":
            x = Downsample2D(self.out_channels, c.downsample_padding, o.dtype, o.param_dtype,
                             name="downsamplers_0")(x)
            outputs += (x,)
        if self.add_sample and self.kind == "up":
            x = Upsample2D(self.out_channels, o.dtype, o.param_dtype, name="upsamplers_0")(x, upsample_size)
        return x, outputs


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, then (attention, resnet) once."""

    cfg: UNetConfig
    opts: _Opts

    @nn.compact
    def __call__(self, x, temb, context):
        c, o = self.cfg, self.opts
        ch = c.block_out_channels[-1]
        resnet = lambda name: unit(ResnetBlock2D, o.remat_policy, o.gather, self.path + (name,))  # noqa: E731
        args = (ch, c.norm_num_groups, c.norm_eps, c.mid_block_scale_factor, o.dtype, o.param_dtype)
        x = resnet("resnets_0")(*args, name="resnets_0")(x, temb)
        x = Transformer2DModel(c.num_heads[-1], c.mid_transformer_layers, c.norm_num_groups,
                               c.use_linear_projection, False, o, name="attentions_0")(x, context)
        return resnet("resnets_1")(*args, name="resnets_1")(x, temb)


# ------------------------------------------------------------------------------------------- model

class UNet2DConditionModel(nn.Module):
    """`apply({"params": p}, sample[B,H,W,C], timesteps[B] or scalar, encoder_hidden_states[B,S,D],
    added_cond={"text_embeds": [B,P], "time_ids": [B,6]} for SDXL) -> [B,H,W,out_channels]`."""

    config: UNetConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    remat_policy: str = "none"
    gather: Any = None  # set by `apply_sharded` only
    scan_blocks: bool = False  # see layers.sequential

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | UNetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    attention_impl: Optional[str] = None, remat_policy: str = "none",
                    scan_blocks: bool = False) -> "UNet2DConditionModel":
        if not isinstance(config, UNetConfig):
            config = UNetConfig.from_diffusers(config)
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={attention_impl!r} is not one of {ATTENTION_IMPLS}")
        check_remat_policy(remat_policy)
        return cls(config, dtype, param_dtype, attention_impl, remat_policy, scan_blocks=scan_blocks)

    def dummy_inputs(self, batch: int = 1):
        """Abstract-friendly inputs of the right shapes (for init / eval_shape / benchmarks)."""
        c = self.config
        s = 2 ** len(c.block_out_channels)
        inputs = (jnp.zeros((batch, s, s, c.in_channels), self.dtype), jnp.zeros((batch,), jnp.int32),
                  jnp.zeros((batch, 1, c.cross_attention_dim[0]), self.dtype))
        if c.addition_embed_type == "text_time":
            n_ids = 6
            text = c.projection_class_embeddings_input_dim - n_ids * c.addition_time_embed_dim
            return inputs + ({"text_embeds": jnp.zeros((batch, text), self.dtype),
                              "time_ids": jnp.zeros((batch, n_ids), jnp.float32)},)
        return inputs

    def init_shapes(self) -> dict:
        """The parameter tree as ShapeDtypeStructs, without allocating anything."""
        return jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0), *self.dummy_inputs()))["params"]

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, added_cond=None):
        c = self.config
        o = _Opts(self.dtype, self.param_dtype, self.attention_impl, c.upcast_attention, self.remat_policy,
                  self.gather, self.scan_blocks)
        d, pd = self.dtype, self.param_dtype
        b = sample.shape[0]
        if sample.ndim != 4 or sample.shape[-1] != c.in_channels:
            raise ValueError(f"sample must be NHWC with {c.in_channels} channels, got shape {sample.shape}")

        # Time embedding (sinusoidal part in float32, as diffusers).
        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        t_emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).astype(d)
        emb = TimestepEmbedding(c.time_embed_dim, d, pd, name="time_embedding")(t_emb)
        if c.addition_embed_type == "text_time":
            if added_cond is None or "text_embeds" not in added_cond or "time_ids" not in added_cond:
                raise ValueError("this UNet has addition_embed_type='text_time': pass "
                                 "added_cond={'text_embeds': [B, P], 'time_ids': [B, 6]}")
            time_ids = jnp.asarray(added_cond["time_ids"])
            te = timestep_embedding(time_ids.reshape(-1), c.addition_time_embed_dim, c.flip_sin_to_cos,
                                    c.freq_shift).reshape(b, -1)
            add = jnp.concatenate([jnp.asarray(added_cond["text_embeds"]).astype(jnp.float32), te], axis=-1)
            emb = emb + TimestepEmbedding(c.time_embed_dim, d, pd, name="add_embedding")(add.astype(d))

        context = encoder_hidden_states.astype(d)
        x = sample.astype(d)
        if c.center_input_sample:
            x = 2 * x - 1.0
        x = conv(c.block_out_channels[0], c.conv_in_kernel, d, pd, "conv_in")(x)

        res = (x,)
        n = len(c.block_out_channels)
        for i, kind in enumerate(c.down_block_types):
            attn = kind == "CrossAttnDownBlock2D"
            x, r = UNetBlock("down", c.block_out_channels[i], c.layers_per_block[i],
                             c.down_transformer_layers[i] if attn else (), c.num_heads[i],
                             c.only_cross_attention[i], i < n - 1, c, o, name=f"down_blocks_{i}")(x, emb, context)
            res += r

        if c.mid_block_type is not None:
            x = MidBlock(c, o, name="mid_block")(x, emb, context)

        rev_ch = tuple(reversed(c.block_out_channels))
        rev_heads, rev_only = tuple(reversed(c.num_heads)), tuple(reversed(c.only_cross_attention))
        rev_layers = tuple(reversed(c.layers_per_block))
        for i, kind in enumerate(c.up_block_types):
            num = rev_layers[i] + 1
            block_res, res = res[-num:], res[:-num]
            final = i == n - 1
            size = None if final else res[-1].shape[1:3]
            attn = kind == "CrossAttnUpBlock2D"
            x, _ = UNetBlock("up", rev_ch[i], num, c.up_transformer_layers[i] if attn else (), rev_heads[i],
                             rev_only[i], not final, c, o, name=f"up_blocks_{i}")(x, emb, context, block_res, size)

        x = nn.silu(GroupNorm(c.norm_num_groups, c.norm_eps, pd, name="conv_norm_out")(x))
        return conv(c.out_channels, c.conv_out_kernel, d, pd, "conv_out")(x)


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
