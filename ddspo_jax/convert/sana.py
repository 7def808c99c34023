"""SANA transformer weights: diffusers safetensors <-> Flax params for `models.sana.SanaTransformer2DModel`.

The Flax tree mirrors diffusers' except where linen wants flat names inside one compact module (the attention
projections `attn1_to_q`, the embedders `time_embed_linear`, ...); the renames below restore diffusers' dotted
paths. One table serves load and export.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ddspo_jax import lora
from ddspo_jax.convert.common import (
    ConversionError, export_dtype, KeyTable, params_from_state_dict, resolve_component, state_dict_from_params,
    write_safetensors
)
from ddspo_jax.models.sana import SanaConfig, SanaTransformer2DModel

SANA_TABLE = KeyTable(
    list_modules=frozenset({"transformer_blocks"}),
    renames=((r"^patch_embed_proj", "patch_embed.proj"),
             (r"^time_embed_emb_timestep_embedder", "time_embed.emb.timestep_embedder"),
             (r"^time_embed_linear", "time_embed.linear"),
             (r"^caption_projection_linear_(\d)", r"caption_projection.linear_\1"),
             (r"\.attn([12])_to_out_0$", r".attn\1.to_out.0"),
             (r"\.attn([12])_to_([qkv])$", r".attn\1.to_\2")),
    ignore=(r"patch_embed\.pos_embed",),  # a persistent sincos buffer in some checkpoints; recomputed here
)


def load_sana(path: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32, *, component: str = "transformer",
              config: Any = None, variant: str | None = None, attention_impl=None,
              remat_policy: str = "none") -> tuple[SanaTransformer2DModel, dict]:
    """A SANA transformer folder, a pipeline folder (its `transformer/`) or a single .safetensors file with a
    config -> (module, params)."""
    cfg, state_dict, source = resolve_component(path, component, config=config, variant=variant)
    try:
        model = SanaTransformer2DModel.from_config(cfg, dtype, param_dtype, attention_impl, remat_policy)
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None
    params = params_from_state_dict(SANA_TABLE, model.init_shapes(), state_dict, dtype=np.dtype(param_dtype),
                                    source=source)
    return model, jax.tree.map(jnp.asarray, params)


def export_sana(model: SanaTransformer2DModel | Mapping, params: Mapping[str, Any], out_dir: str | os.PathLike,
                dtype: Any = "float32") -> Path:
    """Flax params -> a diffusers transformer folder (`diffusion_pytorch_model.safetensors` + config.json).
    `model` is the module (its config is written from the dataclass) or the original diffusers config dict."""
    if isinstance(model, SanaTransformer2DModel):
        config = {"_class_name": "SanaTransformer2DModel", **dataclasses.asdict(model.config)}
    else:
        config = dict(model)
        SanaConfig.from_dict(config)  # validates before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_dict = state_dict_from_params(SANA_TABLE, params, dtype=export_dtype(dtype))
    write_safetensors(state_dict, out / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "config.json")
    return out


# The release's SANA LoRA: to_q / to_k / to_v of both attentions (linear self-attention and cross-attention).
LORA_TARGETS = ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn2_to_q", "attn2_to_k", "attn2_to_v")


def export_sana_lora(lora_factors, alpha: float, path: str | os.PathLike) -> Path:
    """LoRA factors of the SANA transformer -> a diffusers LoRA file (PEFT key names, `transformer.` prefix)
    that `SanaPipeline.load_lora_weights` reads; module names come from the key table."""

    name = lambda p: SANA_TABLE.torch_key(p + ("kernel",), 2)[:-len(".weight")]  # noqa: E731
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(lora.peft_state_dict(lora_factors, alpha, name, prefix="transformer."), path,
                      metadata={"format": "pt"})
    return path


__all__ = ["ConversionError", "LORA_TARGETS", "SANA_TABLE", "export_sana", "export_sana_lora", "load_sana"]
