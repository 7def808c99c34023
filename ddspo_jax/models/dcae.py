"""DC-AE, SANA's deep-compression autoencoder, in Flax linen: diffusers' `AutoencoderDC`, NHWC.

`apply({"params": p}, images, method="encode")` -> latents (unscaled, deterministic: DC-AE has no posterior);
`method="decode"` -> images. Scaling by `config.scaling_factor` (0.41407 for SANA's f32c32) is the caller's, as
in diffusers. Module names follow diffusers (`encoder.down_blocks.<i>.<j>`, `attn.to_qkv_multiscale.<k>`) up to
linen's flat naming, which the key table in `convert/dcae.py` maps back. What the blocks compute:
  * ResBlock: conv3x3, activation, conv3x3 (no bias), norm (channel RMSNorm with bias, or eval BatchNorm),
    plus the input;
  * EfficientViTBlock: multiscale ReLU linear attention (q, k, v projections, each scale a depthwise kxk conv
    and a grouped 1x1 conv over the concatenated q|k|v, heads of 3 x head_dim consecutive channels; float32
    linear attention, or the quadratic form when H*W <= head_dim, as diffusers switches), projection, RMSNorm,
    residual; then a GLUMBConv with RMSNorm and residual;
  * down/up blocks: stride-2 conv or conv + pixel-(un)shuffle, with the channel-averaging / repeating
    shortcuts; the encoder's averaging output shortcut and the decoder's repeating input shortcut.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddspo_jax.models.layers import GLUMBConv, RMSNorm, conv, gelu, resize_nearest

CONFIG_DIR = Path(__file__).parent / "configs"

_ACT = {"silu": nn.silu, "relu": nn.relu, "relu6": jax.nn.relu6, "gelu": gelu}


def _tuple(v, n):
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: tuple = ("ResBlock",) * 6
    decoder_block_types: tuple = ("ResBlock",) * 6
    encoder_block_out_channels: tuple = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple = (3, 3, 3, 3, 3, 3)
    encoder_qkv_multiscales: tuple = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple = ((), (), (), (5,), (5,), (5,))
    upsample_block_type: str = "pixel_shuffle"
    downsample_block_type: str = "pixel_unshuffle"
    decoder_norm_types: tuple = ("rms_norm",) * 6
    decoder_act_fns: tuple = ("silu",) * 6
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "DCAEConfig":
        if config.get("_class_name") not in (None, "AutoencoderDC"):
            raise ValueError(f"_class_name {config.get('_class_name')!r} is not AutoencoderDC")
        kw = {f.name: config[f.name] for f in dataclasses.fields(cls) if config.get(f.name) is not None}
        n_e = len(kw.get("encoder_block_out_channels", cls.encoder_block_out_channels))
        n_d = len(kw.get("decoder_block_out_channels", cls.decoder_block_out_channels))
        for k, n in (("encoder_block_types", n_e), ("decoder_block_types", n_d), ("decoder_norm_types", n_d),
                     ("decoder_act_fns", n_d)):
            if k in kw:
                kw[k] = _tuple(kw[k], n)
        for k in ("encoder_block_out_channels", "decoder_block_out_channels", "encoder_layers_per_block",
                  "decoder_layers_per_block"):
            if k in kw:
                kw[k] = tuple(kw[k])
        for k in ("encoder_qkv_multiscales", "decoder_qkv_multiscales"):
            if k in kw:
                kw[k] = tuple(tuple(s) for s in kw[k])
        out = cls(**kw)
        acts = set(out.decoder_act_fns) | {out.decoder_conv_act_fn}
        if not acts <= set(_ACT):
            raise ValueError(f"unsupported DC-AE activation(s) {sorted(acts - set(_ACT))}")
        if not set(out.decoder_norm_types) <= {"rms_norm", "batch_norm"}:
            raise ValueError(f"unsupported DC-AE norm type(s) {out.decoder_norm_types}")
        return out

    @classmethod
    def named(cls, name: str) -> "DCAEConfig":
        """A shipped real config: "dcae_f32c32_sana" (SANA's autoencoder)."""
        return cls.from_dict(json.loads((CONFIG_DIR / f"{name}.json").read_text()))


def pixel_unshuffle(x, r: int = 2):
    """torch F.pixel_unshuffle on NHWC: output channel c*r*r + i*r + j."""
    b, h, w, c = x.shape
    return x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h // r, w // r, c * r * r)


def pixel_shuffle(x, r: int = 2):
    """torch F.pixel_shuffle on NHWC (the inverse of pixel_unshuffle)."""
    b, h, w, c = x.shape
    return x.reshape(b, h, w, c // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3).reshape(b, h * r, w * r, c // (r * r))


def _conv(n, k, name, stride=1, bias=True, groups=1, dtype=jnp.float32, param_dtype=jnp.float32):
    return conv(n, k, dtype, param_dtype, name, stride, use_bias=bias, feature_group_count=groups)


class BatchNorm(nn.Module):
    """Eval-mode BatchNorm2d (running statistics are frozen weights here: DC-AE is never trained)."""

    eps: float = 1e-5
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        w = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        b = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        mean = self.param("running_mean", nn.initializers.zeros, (c,), self.param_dtype)
        var = self.param("running_var", nn.initializers.ones, (c,), self.param_dtype)
        y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * w + b).astype(x.dtype)


def _norm(kind: str, name: str, pd):
    return RMSNorm(1e-5, pd, use_bias=True, name=name) if kind == "rms_norm" else BatchNorm(1e-5, pd, name=name)


class ResBlock(nn.Module):
    channels: int
    norm: str = "rms_norm"
    act: str = "silu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _ACT[self.act](_conv(x.shape[-1], 3, "conv1", **kw)(x))
        h = _conv(self.channels, 3, "conv2", bias=False, **kw)(h)
        return _norm(self.norm, "norm", self.param_dtype)(h) + x


class MultiscaleProjection(nn.Module):
    heads: int
    kernel: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, bias=False)
        c = x.shape[-1]
        x = _conv(c, self.kernel, "proj_in", groups=c, **kw)(x)
        return _conv(c, 1, "proj_out", groups=3 * self.heads, **kw)(x)


class MultiscaleLinearAttention(nn.Module):
    head_dim: int
    scales: tuple
    norm: str = "rms_norm"
    eps: float = 1e-15
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        b, h, w, c = x.shape
        heads = c // self.head_dim
        inner = heads * self.head_dim
        qkv = jnp.concatenate([nn.Dense(inner, name=n, **kw)(x) for n in ("to_q", "to_k", "to_v")], -1)
        qkv = jnp.concatenate([qkv] + [MultiscaleProjection(heads, k, self.dtype, self.param_dtype,
                                                            name=f"to_qkv_multiscale_{i}")(qkv)
                                       for i, k in enumerate(self.scales)], -1)
        n = h * w
        linear = n > self.head_dim
        t = qkv.astype(jnp.float32) if linear else qkv
        t = t.reshape(b, n, -1, 3, self.head_dim)  # heads of 3 x head_dim consecutive channels
        q, k, v = jax.nn.relu(t[..., 0, :]), jax.nn.relu(t[..., 1, :]), t[..., 2, :]
        if linear:
            num = jnp.einsum("bmhd,bmhe,bnhe->bnhd", v, k, q)
            den = jnp.einsum("bmhe,bnhe->bnh", k, q)
            out = (num / (den[..., None] + self.eps)).astype(x.dtype)
        else:
            s = jnp.einsum("bmhe,bnhe->bhmn", k, q).astype(jnp.float32)
            s = s / (s.sum(2, keepdims=True) + self.eps)
            out = jnp.einsum("bmhd,bhmn->bnhd", v, s.astype(v.dtype))
        out = nn.Dense(c, name="to_out", **kw)(out.reshape(b, h, w, -1))
        return _norm(self.norm, "norm_out", self.param_dtype)(out) + x


class EfficientViTBlock(nn.Module):
    head_dim: int
    scales: tuple
    norm: str = "rms_norm"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = MultiscaleLinearAttention(self.head_dim, self.scales, self.norm, name="attn", **kw)(x)
        return GLUMBConv(x.shape[-1], name="conv_out", **kw)(x)


class DownBlock(nn.Module):
    """DCDownBlock2d: stride-2 conv, or conv + pixel-unshuffle; shortcut = pixel-unshuffle averaged in groups."""

    out_channels: int
    unshuffle: bool
    shortcut: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.unshuffle:
            y = pixel_unshuffle(_conv(self.out_channels // 4, 3, "conv", **kw)(x))
        else:
            y = _conv(self.out_channels, 3, "conv", stride=2, **kw)(x)
        if not self.shortcut:
            return y
        s = pixel_unshuffle(x)
        group = x.shape[-1] * 4 // self.out_channels
        return y + s.reshape(*s.shape[:-1], -1, group).mean(-1)


class UpBlock(nn.Module):
    """DCUpBlock2d: nearest x2 + conv, or conv + pixel-shuffle; shortcut = channels repeated, pixel-shuffled."""

    out_channels: int
    interpolate: bool
    shortcut: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        if self.interpolate:
            y = _conv(self.out_channels, 3, "conv", **kw)(resize_nearest(x, (2 * h, 2 * w)))
        else:
            y = pixel_shuffle(_conv(self.out_channels * 4, 3, "conv", **kw)(x))
        if not self.shortcut:
            return y
        return y + pixel_shuffle(jnp.repeat(x, self.out_channels * 4 // c, axis=-1))


def _block(kind, channels, head_dim, norm, act, scales, name, kw):
    if kind == "ResBlock":
        return ResBlock(channels, norm, act, name=name, **kw)
    if kind == "EfficientViTBlock":
        return EfficientViTBlock(head_dim, tuple(scales), norm, name=name, **kw)
    raise ValueError(f"DC-AE block type {kind!r} is not supported (ResBlock, EfficientViTBlock)")


class Encoder(nn.Module):
    config: DCAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch, layers = c.encoder_block_out_channels, c.encoder_layers_per_block
        unshuffle = c.downsample_block_type == "pixel_unshuffle"
        first = ch[0] if layers[0] > 0 else ch[1]
        if layers[0] > 0:
            x = _conv(first, 3, "conv_in", **kw)(x)
        else:
            x = DownBlock(first, unshuffle, shortcut=False, name="conv_in", **kw)(x)
        for i, (out, n) in enumerate(zip(ch, layers)):
            for j in range(n):
                x = _block(c.encoder_block_types[i], out, c.attention_head_dim, "rms_norm", "silu",
                           c.encoder_qkv_multiscales[i], f"down_blocks_{i}_{j}", kw)(x)
            if i < len(ch) - 1 and n > 0:
                x = DownBlock(ch[i + 1], unshuffle, name=f"down_blocks_{i}_{n}", **kw)(x)
        y = _conv(c.latent_channels, 3, "conv_out", **kw)(x)
        if c.encoder_out_shortcut:
            y = y + x.reshape(*x.shape[:-1], c.latent_channels, -1).mean(-1)
        return y


class Decoder(nn.Module):
    config: DCAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch, layers = c.decoder_block_out_channels, c.decoder_layers_per_block
        interpolate = c.upsample_block_type == "interpolate"
        x = _conv(ch[-1], 3, "conv_in", **kw)(z)
        if c.decoder_in_shortcut:
            x = x + jnp.repeat(z, ch[-1] // c.latent_channels, axis=-1)
        for i in reversed(range(len(ch))):
            j0 = 0
            if i < len(ch) - 1 and layers[i] > 0:
                x = UpBlock(ch[i], interpolate, name=f"up_blocks_{i}_0", **kw)(x)
                j0 = 1
            for j in range(layers[i]):
                x = _block(c.decoder_block_types[i], ch[i], c.attention_head_dim, c.decoder_norm_types[i],
                           c.decoder_act_fns[i], c.decoder_qkv_multiscales[i], f"up_blocks_{i}_{j0 + j}", kw)(x)
        x = _ACT[c.decoder_conv_act_fn](RMSNorm(1e-5, self.param_dtype, use_bias=True, name="norm_out")(x))
        if layers[0] > 0:
            return _conv(c.in_channels, 3, "conv_out", **kw)(x)
        return UpBlock(c.in_channels, interpolate, shortcut=False, name="conv_out", **kw)(x)


class AutoencoderDC(nn.Module):
    config: DCAEConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.encoder = Encoder(self.config, self.dtype, self.param_dtype)
        self.decoder = Decoder(self.config, self.dtype, self.param_dtype)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)

    def __call__(self, x):
        return self.decode(self.encode(x))

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config.encoder_block_out_channels) - 1)

    def init_shapes(self) -> Any:
        s = self.downscale
        x = jax.ShapeDtypeStruct((1, s, s, self.config.in_channels), jnp.float32)
        return jax.eval_shape(lambda a: self.init(jax.random.key(0), a), x)["params"]
