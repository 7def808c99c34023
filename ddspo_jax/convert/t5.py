"""T5 encoder weights: transformers safetensors -> Flax params for `models.t5.T5EncoderModel` (SD3's third text
encoder). A `T5EncoderModel` checkpoint holds `shared.weight` and the `encoder.*` stack (the tied
`encoder.embed_tokens.weight` copy, where present, is the same table). Load only: the encoder is frozen, and
`export` copies its folder as it was."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddspo_jax.convert.common import ConversionError, KeyTable, params_from_state_dict, resolve_component
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


__all__ = ["T5_TABLE", "load_t5"]
