"""CLIP vision tower and the CLIP pair in Flax linen: `CLIPVisionModelWithProjection` and `CLIPModel`.

What the CLIP-based scorers (CLIPScore, PickScore, the LAION aesthetic predictor) are built on. The parameter
tree mirrors transformers' module tree (`vision_model/...`, `visual_projection`, `text_model/...`,
`text_projection`, `logit_scale`) so `ddspo_jax.convert.clip` maps names with a plain key table. The encoder
layers are the text tower's own (`clip_text.CLIPEncoder`), run without the causal mask. Inputs are NHWC
pixel values already preprocessed (`ddspo_jax.scoring.clip.preprocess`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddspo_jax.errors import ModelError
from ddspo_jax.models.clip_text import _ACTIVATIONS, CLIPEncoder, CLIPTextConfig, CLIPTextTransformer


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The fields of a transformers `CLIPVisionConfig` that change the forward pass."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    with_projection: bool = True

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], with_projection: bool | None = None) -> "CLIPVisionConfig":
        """From a transformers config.json dict (a `CLIPModel` config: its `vision_config`)."""
        projection_dim = config.get("projection_dim")
        if config.get("model_type") == "clip":
            config = config.get("vision_config") or {}
        if with_projection is None:
            with_projection = any("WithProjection" in a for a in config.get("architectures") or ())
        fields = {f.name for f in dataclasses.fields(cls)} - {"with_projection"}
        kwargs = {k: config[k] for k in fields if config.get(k) is not None}
        if projection_dim is not None:  # CLIPModel keeps projection_dim at the top level
            kwargs["projection_dim"] = projection_dim
        out = cls(**kwargs, with_projection=bool(with_projection))
        if out.hidden_act not in _ACTIVATIONS:
            raise ModelError(f"unsupported CLIP vision hidden_act {out.hidden_act!r}; known: {sorted(_ACTIVATIONS)}")
        if out.hidden_size % out.num_attention_heads:
            raise ModelError(f"CLIP vision hidden_size {out.hidden_size} is not divisible by "
                             f"num_attention_heads {out.num_attention_heads}")
        return out

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        b, h, w, _ = pixel_values.shape
        if (h, w) != (c.image_size, c.image_size):
            raise ModelError(f"CLIP vision input is {h}x{w}, the model takes {c.image_size}x{c.image_size} "
                             "(preprocess the images with the folder's image processor settings first)")
        patches = nn.Conv(c.hidden_size, (c.patch_size, c.patch_size), strides=c.patch_size, padding="VALID",
                          use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="patch_embedding")(pixel_values.astype(self.dtype))
        patches = patches.reshape(b, -1, c.hidden_size)  # row-major over the grid, as torch's flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (c.hidden_size,), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), patches], axis=1)
        pos = nn.Embed(c.num_positions, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                       name="position_embedding")(jnp.arange(c.num_positions))
        return x + pos


class CLIPVisionTransformer(nn.Module):
    """transformers' `vision_model`: embeddings, `pre_layrnorm` (sic), the encoder, `post_layernorm` on CLS."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = CLIPVisionEmbeddings(c, name="embeddings", **kw)(pixel_values)
        x = nn.LayerNorm(epsilon=c.layer_norm_eps, name="pre_layrnorm", **kw)(x)
        hidden_states = CLIPEncoder(c, causal=False, name="encoder", **kw)(x)
        last = hidden_states[-1]
        pooled = nn.LayerNorm(epsilon=c.layer_norm_eps, name="post_layernorm", **kw)(last[:, 0])
        return {"last_hidden_state": last, "hidden_states": hidden_states, "pooler_output": pooled}


class CLIPVisionModel(nn.Module):
    """`CLIPVisionModel` or, with `config.with_projection`, `CLIPVisionModelWithProjection`.

    Returns `last_hidden_state` [B, 1+P, D] (before the post-LN, as transformers), `pooler_output` [B, D]
    (post-LN class token) and, with the projection, `image_embeds` [B, projection_dim] (not normalised).
    """

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        out = CLIPVisionTransformer(self.config, self.dtype, self.param_dtype, name="vision_model")(pixel_values)
        if self.config.with_projection:
            out["image_embeds"] = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                                           param_dtype=self.param_dtype, name="visual_projection")(
                out["pooler_output"])
        return out

    def init_shapes(self) -> Any:
        c = self.config
        x = jax.ShapeDtypeStruct((1, c.image_size, c.image_size, c.num_channels), jnp.float32)
        return jax.eval_shape(lambda p: self.init(jax.random.key(0), p), x)["params"]


def _normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(nn.Module):
    """transformers' `CLIPModel`: both towers, both projections and `logit_scale`.

    `__call__(input_ids, pixel_values, attention_mask)` returns the L2-normalised `text_embeds` and
    `image_embeds` and `logits_per_image` [B_img, B_txt] = exp(logit_scale) x cosine, as transformers does.
    """

    text_config: CLIPTextConfig
    vision_config: CLIPVisionConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = CLIPTextTransformer(self.text_config, **kw)
        self.vision_model = CLIPVisionTransformer(self.vision_config, **kw)
        self.text_projection = nn.Dense(self.vision_config.projection_dim, use_bias=False, **kw)
        self.visual_projection = nn.Dense(self.vision_config.projection_dim, use_bias=False, **kw)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), (), self.param_dtype)

    def text_features(self, input_ids, attention_mask=None):
        """Projected, not normalised (transformers' `get_text_features`)."""
        return self.text_projection(self.text_model(jnp.asarray(input_ids), attention_mask)["pooler_output"])

    def image_features(self, pixel_values):
        """Projected, not normalised (transformers' `get_image_features`)."""
        return self.visual_projection(self.vision_model(pixel_values)["pooler_output"])

    def __call__(self, input_ids, pixel_values, attention_mask=None):
        text = _normalize(self.text_features(input_ids, attention_mask).astype(jnp.float32))
        image = _normalize(self.image_features(pixel_values).astype(jnp.float32))
        logits = jnp.exp(self.logit_scale.astype(jnp.float32)) * image @ text.T
        return {"text_embeds": text, "image_embeds": image, "logits_per_image": logits}

    def init_shapes(self) -> Any:
        v = self.vision_config
        ids = jax.ShapeDtypeStruct((1, self.text_config.max_position_embeddings), jnp.int32)
        x = jax.ShapeDtypeStruct((1, v.image_size, v.image_size, v.num_channels), jnp.float32)
        return jax.eval_shape(lambda i, p: self.init(jax.random.key(0), i, p), ids, x)["params"]


class AestheticMLP(nn.Module):
    """The LAION improved aesthetic predictor's head (`sac+logos+ava1-l14-linearMSE`): five Linear layers and
    no activations (its Dropouts are identities at inference), keys `layers.{0,2,4,6,7}`."""

    widths: tuple[int, ...] = (1024, 128, 64, 16, 1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for width, idx in zip(self.widths, (0, 2, 4, 6, 7)):
            x = nn.Dense(width, dtype=self.dtype, name=f"layers_{idx}")(x)
        return x
