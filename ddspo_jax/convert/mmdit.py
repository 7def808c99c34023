"""SD3 transformer weights: diffusers safetensors <-> Flax params for `models.mmdit.SD3Transformer2DModel`.

The Flax tree mirrors diffusers' except where linen wants flat names inside one compact module (the attention
projections `attn_to_q`, the adaLN linears `norm1_linear`, the embedders `time_text_embed_...`); the renames
below restore diffusers' dotted paths. One table serves load and export.
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
from ddspo_jax.models.layers import sincos_pos_embed
from ddspo_jax.models.mmdit import MMDiTConfig, SD3Transformer2DModel

_ATTN = r"to_[qkv]|add_[qkv]_proj|to_add_out|norm_q|norm_k|norm_added_q|norm_added_k"
MMDIT_TABLE = KeyTable(
    list_modules=frozenset({"transformer_blocks"}),
    renames=((r"^pos_embed_proj", "pos_embed.proj"),
             (r"^time_text_embed_timestep_embedder", "time_text_embed.timestep_embedder"),
             (r"^time_text_embed_text_embedder_linear_(\d)", r"time_text_embed.text_embedder.linear_\1"),
             (r"^norm_out_linear", "norm_out.linear"),
             (r"\.norm1_linear$", ".norm1.linear"),
             (r"\.norm1_context_linear$", ".norm1_context.linear"),
             (r"\.(attn2?)_to_out_0$", r".\1.to_out.0"),
             (rf"\.(attn2?)_({_ATTN})$", r".\1.\2"),
             (r"\.(ff|ff_context)_net_0_proj$", r".\1.net.0.proj"),
             (r"\.(ff|ff_context)_net_2$", r".\1.net.2")),
    ignore=(r"pos_embed\.pos_embed",),  # the persistent sin-cos buffer: recomputed here, written on export
)

# The release's SD3 LoRA (rank = alpha = 128): the joint attention's projections of both streams.
LORA_TARGETS = ("attn_to_q", "attn_to_k", "attn_to_v", "attn_to_out_0", "attn_add_q_proj", "attn_add_k_proj",
                "attn_add_v_proj", "attn_to_add_out")


def load_mmdit(path: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32, *,
               component: str = "transformer", config: Any = None, variant: str | None = None, attention_impl=None,
               remat_policy: str = "none") -> tuple[SD3Transformer2DModel, dict]:
    """An SD3 transformer folder, a pipeline folder (its `transformer/`) or a single .safetensors file with a
    config -> (module, params)."""
    cfg, state_dict, source = resolve_component(path, component, config=config, variant=variant)
    try:
        model = SD3Transformer2DModel.from_config(cfg, dtype, param_dtype, attention_impl, remat_policy)
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None
    params = params_from_state_dict(MMDIT_TABLE, model.init_shapes(), state_dict, dtype=np.dtype(param_dtype),
                                    source=source)
    return model, jax.tree.map(jnp.asarray, params)


def export_mmdit(model: SD3Transformer2DModel | Mapping, params: Mapping[str, Any], out_dir: str | os.PathLike,
                 dtype: Any = "float32") -> Path:
    """Flax params -> a diffusers transformer folder (`diffusion_pytorch_model.safetensors` + config.json).
    `model` is the module (its config is written from the dataclass) or the original diffusers config dict."""
    if isinstance(model, SD3Transformer2DModel):
        config = {"_class_name": "SD3Transformer2DModel", **dataclasses.asdict(model.config)}
        config["dual_attention_layers"] = list(config["dual_attention_layers"])
    else:
        config = dict(model)
    c = MMDiTConfig.from_dict(config)  # validates before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_dict = state_dict_from_params(MMDIT_TABLE, params, dtype=export_dtype(dtype))
    grid = c.pos_embed_max_size  # diffusers registers it as a persistent buffer: a file without it fails to load
    state_dict["pos_embed.pos_embed"] = sincos_pos_embed(c.inner_dim, grid, grid, c.sample_size // c.patch_size,
                                                         1.0)[None].astype(np.float32)
    write_safetensors(state_dict, out / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "config.json")
    return out


def export_mmdit_lora(lora_factors, alpha: float, path: str | os.PathLike) -> Path:
    """LoRA factors of the SD3 transformer -> a diffusers LoRA file (PEFT key names, `transformer.` prefix)
    that `StableDiffusion3Pipeline.load_lora_weights` reads; module names come from the key table."""
    name = lambda p: MMDIT_TABLE.torch_key(p + ("kernel",), 2)[:-len(".weight")]  # noqa: E731
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(lora.peft_state_dict(lora_factors, alpha, name, prefix="transformer."), path,
                      metadata={"format": "pt"})
    return path


__all__ = ["ConversionError", "LORA_TARGETS", "MMDIT_TABLE", "export_mmdit", "export_mmdit_lora", "load_mmdit"]
