"""Gemma-2 weights: transformers safetensors -> Flax params for `models.gemma.Gemma2Model` (SANA's text encoder).

A SANA pipeline's `text_encoder/` holds a bare `Gemma2Model` (keys `embed_tokens.*`, `layers.*`, `norm.*`);
a `Gemma2ForCausalLM` checkpoint holds the same under `model.` plus an `lm_head` (tied to the embedding, so
often absent), which the encoder does not use. Both load; the layout is detected from the keys.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddspo_jax.convert.common import (
    ConversionError, export_dtype, KeyTable, params_from_state_dict, resolve_component, state_dict_from_params,
    write_safetensors
)
from ddspo_jax.models.gemma import Gemma2Config, Gemma2Model

BARE_TABLE = KeyTable(list_modules=frozenset({"layers"}))
CAUSAL_LM_TABLE = KeyTable(list_modules=frozenset({"layers"}), prefix="model.", ignore=(r"lm_head\.weight",))


def detect_table(keys) -> KeyTable:
    keys = list(keys)
    if any(k.startswith("model.embed_tokens.") for k in keys):
        return CAUSAL_LM_TABLE
    if any(k.startswith("embed_tokens.") for k in keys):
        return BARE_TABLE
    raise ConversionError("state dict holds no Gemma-2 weights (neither `embed_tokens.*` nor "
                          f"`model.embed_tokens.*` keys); first keys: {sorted(keys)[:5]}")


def load_gemma2(path: str | os.PathLike, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, *,
                component: str = "text_encoder", config: Any = None,
                variant: str | None = None) -> tuple[Gemma2Model, dict]:
    """A transformers Gemma-2 folder, a pipeline folder (its `text_encoder/`) or a single .safetensors file
    -> (module, params). bf16 weights and compute by default: the encoder is frozen, and 2.6 B parameters
    in float32 would be 10 GB."""
    cfg, state_dict, source = resolve_component(path, component, config=config, variant=variant)
    try:
        model_cfg = Gemma2Config.from_dict(cfg)
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None
    model = Gemma2Model(model_cfg, dtype=dtype, param_dtype=param_dtype)
    params = params_from_state_dict(detect_table(state_dict), model.init_shapes(), state_dict,
                                    dtype=np.dtype(param_dtype), source=source)
    return model, jax.tree.map(jnp.asarray, params)


def export_gemma2(config: dict, params, out_dir: str | os.PathLike, dtype: Any = "float32"):
    """Flax params -> a transformers `Gemma2Model` folder (config.json + model.safetensors, bare key names)."""
    import json
    from pathlib import Path


    Gemma2Config.from_dict(config)  # validates before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(state_dict_from_params(BARE_TABLE, params, dtype=export_dtype(dtype)),
                      out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return out
