"""T5 encoder weights: transformers safetensors -> Flax params for `models.t5.T5EncoderModel` (SD3's third text
encoder). A `T5EncoderModel` checkpoint holds `shared.weight` and the `encoder.*` stack (the tied
`encoder.embed_tokens.weight` copy, where present, is the same table). The encoder is frozen: `export` copies
its folder as it was; `export_t5` exists for the embedded tiny SD3 model."""

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
from ddspo_jax.models.t5 import T5Config, T5EncoderModel

T5_TABLE = KeyTable(
    list_modules=frozenset({"block"}),
    renames=((r"^block_0_layer_0_SelfAttention_relative_attention_bias$",
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"),
             (r"^block\.", "encoder.block."),
             (r"^final_layer_norm$", "encoder.final_layer_norm"),
             (r"\.layer_(\d)_SelfAttention_(\w+)$", r".layer.\1.SelfAttention.\2"),
             (r"\.layer_(\d)_layer_norm$", r".layer.\1.layer_norm"),
             (r"\.layer_1_DenseReluDense_(\w+)$", r".layer.1.DenseReluDense.\1")),
    ignore=(r"encoder\.embed_tokens\.weight",),
)


def load_t5(path: str | os.PathLike, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, *,
            component: str = "text_encoder_3", config: Any = None,
            variant: str | None = None) -> tuple[T5EncoderModel, dict]:
    """A transformers T5 encoder folder, a pipeline folder (its `text_encoder_3/`) or a single .safetensors
    file -> (module, params). bf16 by default: T5-XXL's 4.7 B parameters are 19 GB in float32."""
    cfg, state_dict, source = resolve_component(path, component, config=config, variant=variant)
    try:
        model = T5EncoderModel(T5Config.from_dict(cfg), dtype=dtype, param_dtype=param_dtype)
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None
    if "shared.weight" not in state_dict and "encoder.embed_tokens.weight" in state_dict:
        state_dict = {**state_dict, "shared.weight": state_dict["encoder.embed_tokens.weight"]}
    params = params_from_state_dict(T5_TABLE, model.init_shapes(), state_dict, dtype=np.dtype(param_dtype),
                                    source=source)
    return model, jax.tree.map(jnp.asarray, params)


def export_t5(config: dict, params, out_dir: str | os.PathLike, dtype: Any = "float32"):
    """Flax params -> a transformers `T5EncoderModel` folder (config.json + model.safetensors)."""
    import json
    from pathlib import Path

    T5Config.from_dict(config)  # validates before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(state_dict_from_params(T5_TABLE, params, dtype=export_dtype(dtype)),
                      out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
    return out


__all__ = ["T5_TABLE", "export_t5", "load_t5"]
