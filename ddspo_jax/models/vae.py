"""Flax port of diffusers' `AutoencoderKL` (SD-1.x / SD-2 / SDXL VAE), NHWC.

`encode` returns *scaled* latents and `decode` takes scaled latents: `scaling_factor` (and SD3-style
`shift_factor`) are applied here and nowhere else. The decoder runs in `decode_dtype` (float32 by default:
SDXL's VAE overflows in fp16) whatever the encoder's compute dtype.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from ddspo_jax.models.layers import (
    attention, ATTENTION_IMPLS, conv, Downsample2D, GroupNorm, maybe_remat, ResnetBlock2D, Upsample2D
)
from ddspo_jax.models.unet import UnsupportedConfigError

Dtype = Any

_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",),
    "up_block_types": ("UpDecoderBlock2D",), "block_out_channels": (64,), "layers_per_block": 1,
    "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215,
    "shift_factor": None, "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}
_IGNORED = {"sample_size", "force_upcast", "latents_mean", "latents_std"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int
    scaling_factor: float
    shift_factor: float
    use_quant_conv: bool
    use_post_quant_conv: bool
    mid_block_add_attention: bool
    diffusers_json: str

    @property
    def diffusers_config(self) -> dict:
        return json.loads(self.diffusers_json)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
        name = config.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise UnsupportedConfigError(f"VAE config field '_class_name' is {name!r}, only AutoencoderKL is supported")
        unknown = sorted(k for k in config if not k.startswith("_") and k not in _DEFAULTS and k not in _IGNORED)
        if unknown:
            raise UnsupportedConfigError(f"VAE config has fields this port does not know: {unknown}")
        c = {**_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
        n = len(c["block_out_channels"])
        for field, ok in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(c[field])
            if any(t != ok for t in types) or len(types) != n:
                raise UnsupportedConfigError(f"VAE config field {field!r}={types} is not supported: "
                                             f"only {n} x {ok!r} (one per block_out_channels entry)")
        if c["act_fn"] not in ("silu", "swish"):
            raise UnsupportedConfigError(f"VAE config field 'act_fn'={c['act_fn']!r} is not supported (silu only)")
        return cls(
            in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]),
            block_out_channels=tuple(int(x) for x in c["block_out_channels"]),
            layers_per_block=int(c["layers_per_block"]), latent_channels=int(c["latent_channels"]),
            norm_num_groups=int(c["norm_num_groups"]), scaling_factor=float(c["scaling_factor"]),
            shift_factor=float(c["shift_factor"] or 0.0), use_quant_conv=bool(c["use_quant_conv"]),
            use_post_quant_conv=bool(c["use_post_quant_conv"]),
            mid_block_add_attention=bool(c["mid_block_add_attention"]),
            diffusers_json=json.dumps(dict(config), sort_keys=True),
        )


class VAEAttention(nn.Module):
    """diffusers' single-head spatial self-attention of the VAE mid block (GroupNorm, biases, residual)."""

    groups: int
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = GroupNorm(self.groups, 1e-6, self.param_dtype, name="group_norm")(x).reshape(b, h * w, c)
        dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        y = attention(dense("to_q")(y), dense("to_k")(y), dense("to_v")(y), 1, self.attention_impl)
        return dense("to_out_0")(y).reshape(b, h, w, c) + x


class VAEMidBlock(nn.Module):
    """UNetMidBlock2D without time embedding: resnet, [attention], resnet."""

    channels: int
    groups: int
    add_attention: bool
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: Optional[str] = None
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, x):
        resnet = maybe_remat(ResnetBlock2D, self.remat_policy)
        args = (self.channels, self.groups, 1e-6, 1.0, self.dtype, self.param_dtype)
        x = resnet(*args, name="resnets_0")(x)
        if self.add_attention:
            x = VAEAttention(self.groups, self.dtype, self.param_dtype, self.attention_impl, name="attentions_0")(x)
        return resnet(*args, name="resnets_1")(x)


class _Block(nn.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: resnets then an optional down/upsampler."""

    kind: str
    out_channels: int
    num_layers: int
    add_sample: bool
    groups: int
    dtype: Dtype
    param_dtype: Dtype
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, x):
        resnet = maybe_remat(ResnetBlock2D, self.remat_policy)
        for j in range(self.num_layers):
            x = resnet(self.out_channels, self.groups, 1e-6, 1.0, self.dtype, self.param_dtype,
                       name=f"resnets_{j}")(x)
        if self.add_sample and self.kind == "down":
            x = Downsample2D(self.out_channels, 0, self.dtype, self.param_dtype, name="downsamplers_0")(x)
        if self.add_sample and self.kind == "up":
            x = Upsample2D(self.out_channels, self.dtype, self.param_dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    cfg: VAEConfig
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: Optional[str] = None
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, x):
        c, d, pd = self.cfg, self.dtype, self.param_dtype
        x = conv(c.block_out_channels[0], 3, d, pd, "conv_in")(x.astype(d))
        n = len(c.block_out_channels)
        for i, ch in enumerate(c.block_out_channels):
            x = _Block("down", ch, c.layers_per_block, i < n - 1, c.norm_num_groups, d, pd, self.remat_policy,
                       name=f"down_blocks_{i}")(x)
        x = VAEMidBlock(c.block_out_channels[-1], c.norm_num_groups, c.mid_block_add_attention, d, pd,
                        self.attention_impl, self.remat_policy, name="mid_block")(x)
        x = nn.silu(GroupNorm(c.norm_num_groups, 1e-6, pd, name="conv_norm_out")(x))
        return conv(2 * c.latent_channels, 3, d, pd, "conv_out")(x)


class Decoder(nn.Module):
    cfg: VAEConfig
    dtype: Dtype
    param_dtype: Dtype
    attention_impl: Optional[str] = None
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, z):
        c, d, pd = self.cfg, self.dtype, self.param_dtype
        rev = tuple(reversed(c.block_out_channels))
        x = conv(rev[0], 3, d, pd, "conv_in")(z.astype(d))
        x = VAEMidBlock(rev[0], c.norm_num_groups, c.mid_block_add_attention, d, pd, self.attention_impl,
                        self.remat_policy, name="mid_block")(x)
        for i, ch in enumerate(rev):
            x = _Block("up", ch, c.layers_per_block + 1, i < len(rev) - 1, c.norm_num_groups, d, pd,
                       self.remat_policy, name=f"up_blocks_{i}")(x)
        x = nn.silu(GroupNorm(c.norm_num_groups, 1e-6, pd, name="conv_norm_out")(x))
        return conv(c.out_channels, 3, d, pd, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """`apply(v, images, method="encode")` -> scaled latents; `apply(v, latents, method="decode")` -> images.

    Images are NHWC in [-1, 1]; latents NHWC, already multiplied by `scaling_factor`.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    decode_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None
    remat_policy: str = "none"

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | VAEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    decode_dtype=jnp.float32, attention_impl: Optional[str] = None,
                    remat_policy: str = "none") -> "AutoencoderKL":
        if not isinstance(config, VAEConfig):
            config = VAEConfig.from_diffusers(config)
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={attention_impl!r} is not one of {ATTENTION_IMPLS}")
        maybe_remat(nn.Module, remat_policy)
        return cls(config, dtype, param_dtype, decode_dtype, attention_impl, remat_policy)

    def setup(self):
        c, pd = self.config, self.param_dtype
        self.encoder = Encoder(c, self.dtype, pd, self.attention_impl, self.remat_policy)
        self.decoder = Decoder(c, self.decode_dtype, pd, self.attention_impl, self.remat_policy)
        self.quant_conv = conv(2 * c.latent_channels, 1, self.dtype, pd, None) if c.use_quant_conv else None
        self.post_quant_conv = (conv(c.latent_channels, 1, self.decode_dtype, pd, None)
                                if c.use_post_quant_conv else None)

    def moments(self, images):
        """(mean, logvar) of the posterior, unscaled, float32 (logvar clipped to [-30, 20] as diffusers)."""
        h = self.encoder(images)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def encode(self, images, rng: Optional[jax.Array] = None):
        """Scaled latents: the posterior mean, or a sample when `rng` is given."""
        mean, logvar = self.moments(images)
        z = mean if rng is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, latents):
        """Scaled latents -> images (decode_dtype compute, float32 output)."""
        z = latents.astype(jnp.float32) / self.config.scaling_factor + self.config.shift_factor
        z = z.astype(self.decode_dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images):
        return self.decode(self.encode(images))

    def init_shapes(self) -> dict:
        s = 2 ** len(self.config.block_out_channels)
        x = jnp.zeros((1, s, s, self.config.in_channels), self.dtype)
        return jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0), x))["params"]
