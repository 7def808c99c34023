"""CLIP text transformer in Flax linen: SD-1.x's `CLIPTextModel` and SDXL's `CLIPTextModelWithProjection`.

transformers v5 ships no Flax models, so this is our port. The parameter tree mirrors the PyTorch module
tree (`text_model/...`, `text_projection`) so that `ddspo_jax.convert.clip` maps names with a plain key
table. Params are float32; `dtype` only sets the compute dtype.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddspo_jax.models.layers import attention, gelu

CONFIG_DIR = Path(__file__).parent / "configs"

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP (SD-1.x)
    "gelu": gelu,  # OpenCLIP bigG (SDXL encoder 2)
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of a transformers `CLIPTextConfig` that change the forward pass (hashable: a module field)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2
    projection_dim: int = 512
    with_projection: bool = False

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], with_projection: bool | None = None) -> "CLIPTextConfig":
        """From a transformers config.json dict; `with_projection` defaults to what `architectures` says."""
        if config.get("model_type") == "clip":  # a full CLIPModel config: take its text part
            config = config.get("text_config", {})
        if with_projection is None:
            with_projection = any("WithProjection" in a for a in config.get("architectures") or ())
        fields = {f.name for f in dataclasses.fields(cls)} - {"with_projection"}
        kwargs = {k: config[k] for k in fields if config.get(k) is not None}
        out = cls(**kwargs, with_projection=bool(with_projection))
        if out.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported CLIP hidden_act {out.hidden_act!r}; known: {sorted(_ACTIVATIONS)}")
        if out.hidden_size % out.num_attention_heads:
            raise ValueError(f"hidden_size {out.hidden_size} is not divisible by "
                             f"num_attention_heads {out.num_attention_heads}")
        return out

    @classmethod
    def from_json(cls, path: str | Path, with_projection: bool | None = None) -> "CLIPTextConfig":
        return cls.from_dict(json.loads(Path(path).read_text()), with_projection)

    @classmethod
    def named(cls, name: str) -> "CLIPTextConfig":
        """A shipped real config: "sd15_text_encoder" or "sdxl_text_encoder_2" (and "sdxl_text_encoder")."""
        path = CONFIG_DIR / f"{name}.json"
        if not path.is_file():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
            raise ValueError(f"no shipped config {name!r} in {CONFIG_DIR}; known: {known}")
        return cls.from_json(path)


class CLIPAttention(nn.Module):
    config: Any  # CLIPTextConfig or models.clip_vision.CLIPVisionConfig: the same layer fields
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    causal: bool = True  # the text tower; the vision tower attends both ways

    @nn.compact
    def __call__(self, x, mask=None):
        c = self.config
        dense = lambda name: nn.Dense(c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        q, k, v = (dense(n)(x) for n in ("q_proj", "k_proj", "v_proj"))
        # mask=None: plain causal (what SD/SDXL use) or none at all (vision); else a [B, 1, T, T] boolean mask
        # already incl. causal.
        out = attention(q, k, v, c.num_attention_heads, mask=mask, is_causal=self.causal and mask is None)
        return dense("out_proj")(out)


class CLIPMLP(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        x = nn.Dense(c.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
        x = _ACTIVATIONS[c.hidden_act](x)
        return nn.Dense(c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x, mask=None):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ln = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, name=name, **kw)
        x = x + CLIPAttention(c, name="self_attn", causal=self.causal, **kw)(ln("layer_norm1")(x), mask)
        return x + CLIPMLP(c, name="mlp", **kw)(ln("layer_norm2")(x))


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tok = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding", **kw)(input_ids)
        pos = nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embedding", **kw)(
            jnp.arange(input_ids.shape[-1]))
        return tok + pos


class CLIPEncoder(nn.Module):
    """The layer stack both CLIP towers share (transformers' `CLIPEncoder`); `causal` for the text tower."""

    config: Any
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x, mask=None):
        """Returns every layer's output (the input first), as transformers' `hidden_states`."""
        hidden_states = [x]
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, self.param_dtype, self.causal, name=f"layers_{i}")(x, mask)
            hidden_states.append(x)
        return tuple(hidden_states)


def pooled_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Index of the EOS token per sequence, exactly as transformers picks it.

    Configs with the legacy `eos_token_id == 2` (SD-1.5, SDXL) take the argmax of the ids (EOS is the largest
    id in the real vocab); newer ones take the first position equal to `eos_token_id`.
    """
    if eos_token_id == 2:
        return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextTransformer(nn.Module):
    """transformers' `CLIPTextModel` body (the `text_model` submodule): embeddings, layers, final LN."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        seq = input_ids.shape[-1]
        if seq > c.max_position_embeddings:
            raise ValueError(f"sequence length {seq} exceeds max_position_embeddings {c.max_position_embeddings}")
        x = CLIPTextEmbeddings(c, name="embeddings", **kw)(input_ids)
        mask = None
        if attention_mask is not None:  # padding mask combined with causal, as transformers' create_causal_mask
            causal = jnp.tril(jnp.ones((seq, seq), bool))
            mask = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
        hidden_states = CLIPEncoder(c, name="encoder", **kw)(x, mask)
        last = nn.LayerNorm(epsilon=c.layer_norm_eps, name="final_layer_norm", **kw)(hidden_states[-1])
        pooled = last[jnp.arange(last.shape[0]), pooled_positions(input_ids, c.eos_token_id)]
        return {"last_hidden_state": last, "hidden_states": hidden_states, "pooler_output": pooled}


class CLIPTextModel(nn.Module):
    """`CLIPTextModel` or, with `config.with_projection`, `CLIPTextModelWithProjection`.

    Returns a dict: `last_hidden_state` [B,T,D] (after the final LN: what SD-1.x consumes), `hidden_states`
    (embeddings + every layer, before the final LN; SDXL takes `[-2]`), `pooler_output` [B,D] (EOS
    position) and, with the projection, `text_embeds` [B,P] (SDXL's pooled conditioning).
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        input_ids = jnp.asarray(input_ids)
        out = CLIPTextTransformer(self.config, self.dtype, self.param_dtype, name="text_model")(
            input_ids, attention_mask)
        if self.config.with_projection:
            out["text_embeds"] = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                                          param_dtype=self.param_dtype, name="text_projection")(out["pooler_output"])
        return out

    def init_shapes(self) -> Any:
        """The parameter tree as ShapeDtypeStructs (no memory): what the converter fills in."""
        ids = jax.ShapeDtypeStruct((1, self.config.max_position_embeddings), jnp.int32)
        return jax.eval_shape(lambda i: self.init(jax.random.key(0), i), ids)["params"]


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
