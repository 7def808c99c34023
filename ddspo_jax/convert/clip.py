"""CLIP text encoder weights: transformers safetensors <-> Flax params for `models.clip_text.CLIPTextModel`.

Two key layouts exist in the wild and both load:
  * prefixed: everything under `text_model.` (transformers 4's `CLIPTextModel`, and
    `CLIPTextModelWithProjection` in every version), `text_projection.weight` unprefixed;
  * bare: transformers 5 saves `CLIPTextModel` without the `text_model.` prefix.
The layout is detected from the keys; old files may carry a `position_ids` buffer, which is ignored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ddspo_jax.convert.common import (
    ConversionError, export_dtype, KeyTable, params_from_state_dict, read_safetensors, resolve_component,
    state_dict_from_params, write_safetensors
)
from ddspo_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from ddspo_jax.models.clip_vision import AestheticMLP, CLIPModel, CLIPVisionConfig, CLIPVisionModel

_IGNORE = (r"(text_model\.)?embeddings\.position_ids",)

# The Flax tree already mirrors the PyTorch module tree; only list items are renamed (layers_0 -> layers.0).
PREFIXED_TABLE = KeyTable(list_modules=frozenset({"layers"}), ignore=_IGNORE)
BARE_TABLE = KeyTable(list_modules=frozenset({"layers"}), renames=((r"^text_model\.", ""),), ignore=_IGNORE)

LAYOUTS = {"prefixed": PREFIXED_TABLE, "bare": BARE_TABLE}


def detect_layout(keys) -> str:
    """"prefixed" if the transformer weights sit under `text_model.`, else "bare" (transformers 5 CLIPTextModel)."""
    keys = list(keys)
    if any(k.startswith("text_model.") for k in keys):
        return "prefixed"
    if any(k.startswith(("embeddings.", "encoder.", "final_layer_norm.")) for k in keys):
        return "bare"
    raise ConversionError("state dict holds no CLIP text weights (neither `text_model.embeddings.*` nor "
                          f"`embeddings.*` keys); first keys: {sorted(keys)[:5]}")


def clip_params_from_state_dict(model: CLIPTextModel, state_dict: Mapping[str, np.ndarray], *,
                                dtype=np.float32, source: str = "state dict") -> dict:
    table = LAYOUTS[detect_layout(state_dict)]
    return params_from_state_dict(table, model.init_shapes(), state_dict, dtype=dtype, source=source)


def load_clip_text(path: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32, *,
                   component: str = "text_encoder", config: Any = None,
                   variant: str | None = None) -> tuple[CLIPTextModel, dict]:
    """A transformers text-encoder folder, a pipeline folder (uses `component/`, e.g. "text_encoder_2") or a
    single .safetensors file -> (module, params).

    `dtype` is the compute dtype; `param_dtype` the dtype the weights are kept in (float32 by default, also for
    fp16/bf16 files). Whether the projection exists follows config `architectures`, or the keys if absent.
    """
    cfg, state_dict, source = resolve_component(path, component, config=config, variant=variant)
    with_projection = None
    if not cfg.get("architectures"):
        with_projection = "text_projection.weight" in state_dict
    model = CLIPTextModel(CLIPTextConfig.from_dict(cfg, with_projection), dtype=dtype, param_dtype=param_dtype)
    params = clip_params_from_state_dict(model, state_dict, dtype=np.dtype(param_dtype), source=source)
    return model, jax.tree.map(jnp.asarray, params)


def transformers_config(c: CLIPTextConfig) -> dict:
    """A config.json transformers' `CLIPTextConfig` reads back to the same forward pass."""
    return {
        "architectures": ["CLIPTextModelWithProjection" if c.with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "max_position_embeddings": c.max_position_embeddings, "hidden_act": c.hidden_act,
        "layer_norm_eps": c.layer_norm_eps, "eos_token_id": c.eos_token_id, "projection_dim": c.projection_dim,
        "attention_dropout": 0.0, "dropout": 0.0,
    }


def export_clip_text(model: CLIPTextModel | CLIPTextConfig | Mapping, params: Mapping[str, Any],
                     out_dir: str | os.PathLike, dtype: Any = "float32", *, layout: str | None = None) -> Path:
    """Flax params -> a folder (`model.safetensors` + config.json) transformers' `from_pretrained` loads.

    `model` may also be the CLIPTextConfig or the original transformers config dict (then written as is,
    keeping e.g. bos/pad ids). layout defaults to what the installed transformers writes itself ("bare" for
    CLIPTextModel under transformers 5, else "prefixed"); both load in either version.
    """
    import transformers

    if isinstance(model, CLIPTextModel):
        config, c = transformers_config(model.config), model.config
    elif isinstance(model, CLIPTextConfig):
        config, c = transformers_config(model), model
    else:
        config, c = dict(model), CLIPTextConfig.from_dict(model)  # validates before anything is written
    if layout is None:
        v5 = int(transformers.__version__.split(".")[0]) >= 5
        layout = "bare" if (v5 and not c.with_projection) else "prefixed"
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_dict = state_dict_from_params(LAYOUTS[layout], params, dtype=export_dtype(dtype))
    write_safetensors(state_dict, out / "model.safetensors", metadata={"format": "pt"})
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "config.json")
    return out


# ------------------------------------------------------------------------------- vision and pair

_VISION_IGNORE = (r"(vision_model\.)?embeddings\.position_ids",)
VISION_PREFIXED = KeyTable(list_modules=frozenset({"layers"}), ignore=_VISION_IGNORE)
VISION_BARE = KeyTable(list_modules=frozenset({"layers"}), renames=((r"^vision_model\.", ""),), ignore=_VISION_IGNORE)
PAIR_TABLE = KeyTable(list_modules=frozenset({"layers"}), ignore=_IGNORE + _VISION_IGNORE)


def _vision_layout(keys) -> KeyTable:
    keys = list(keys)
    if any(k.startswith("vision_model.") for k in keys):
        return VISION_PREFIXED
    if any(k.startswith(("embeddings.patch_embedding", "pre_layrnorm.")) for k in keys):
        return VISION_BARE
    raise ConversionError("state dict holds no CLIP vision weights (neither `vision_model.embeddings.*` nor "
                          f"`embeddings.patch_embedding.*` keys); first keys: {sorted(keys)[:5]}")


def load_clip_vision(path: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32, *,
                     component: str = "image_encoder", variant: str | None = None):
    """A `CLIPVisionModelWithProjection` or `CLIPModel` folder (or a pipeline's `image_encoder/`) -> the
    vision tower with its projection, as (module, params).

    From a CLIPModel the text tower is dropped; without `visual_projection.weight` in the file the module
    has no projection and returns no `image_embeds`.
    """

    cfg, state_dict, source = resolve_component(path, component, variant=variant)
    if cfg.get("model_type") == "clip" or any(k.startswith("text_model.") for k in state_dict):
        state_dict = {k: v for k, v in state_dict.items()
                      if k.startswith(("vision_model.", "visual_projection."))}
    model = CLIPVisionModel(CLIPVisionConfig.from_dict(cfg, "visual_projection.weight" in state_dict),
                            dtype=dtype, param_dtype=param_dtype)
    params = params_from_state_dict(_vision_layout(state_dict), model.init_shapes(), state_dict,
                                    dtype=np.dtype(param_dtype), source=source)
    return model, jax.tree.map(jnp.asarray, params)


def load_clip_model(path: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32, *,
                    variant: str | None = None):
    """A transformers `CLIPModel` folder (config `model_type: clip`; PickScore, OpenAI CLIP, LAION CLIP)
    -> (models.clip_vision.CLIPModel, params)."""

    cfg, state_dict, source = resolve_component(path, "clip", variant=variant)
    if cfg.get("model_type") != "clip":
        raise ConversionError(f"{source}: config.json has model_type {cfg.get('model_type')!r}; a CLIPModel "
                              "folder (model_type 'clip', both towers and logit_scale) is needed here")
    text = CLIPTextConfig.from_dict(cfg, with_projection=False)
    model = CLIPModel(text, CLIPVisionConfig.from_dict(cfg, True), dtype=dtype, param_dtype=param_dtype)
    params = params_from_state_dict(PAIR_TABLE, model.init_shapes(), state_dict, dtype=np.dtype(param_dtype),
                                    source=source)
    return model, jax.tree.map(jnp.asarray, params)


AESTHETIC_TABLE = KeyTable(list_modules=frozenset({"layers"}))


def load_aesthetic_head(path: str | os.PathLike, embed_dim: int = 768):
    """The improved aesthetic predictor's MLP head from a safetensors file (converted once from the published
    .pth; never unpickled here) -> (models.clip_vision.AestheticMLP, params). Shapes are checked against
    `embed_dim`, the CLIP projection width it reads."""

    head = AestheticMLP()
    shapes = jax.eval_shape(lambda x: head.init(jax.random.key(0), x),
                            jax.ShapeDtypeStruct((1, embed_dim), jnp.float32))["params"]
    params = params_from_state_dict(AESTHETIC_TABLE, shapes, read_safetensors(path), source=str(path))
    return head, jax.tree.map(jnp.asarray, params)
