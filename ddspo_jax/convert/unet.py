"""diffusers `UNet2DConditionModel` <-> Flax `ddspo_jax.models.unet` (one key table, both directions).

Flax module names equal diffusers' except that list items are `name_<i>` instead of `name.<i>`, so the
table is just the list of module-list names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from ddspo_jax import lora
from ddspo_jax.convert.common import (
    ConversionError, export_dtype, KeyTable, params_from_state_dict, resolve_component, state_dict_from_params,
    write_safetensors
)
from ddspo_jax.models.unet import UNet2DConditionModel, UNetConfig

UNET_TABLE = KeyTable(list_modules=frozenset({
    "down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers", "upsamplers",
    "to_out", "net",
}))

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def check_diffusers_layout(state_dict: Mapping[str, Any], source: str, family: str, ldm_prefixes: tuple) -> None:
    """Original (LDM / CompVis) single-file checkpoints use another naming; say so instead of listing
    hundreds of missing keys."""
    if state_dict and all(k.startswith(ldm_prefixes) for k in list(state_dict)[:50]):
        raise ConversionError(
            f"{source} is an original Stable Diffusion (LDM-layout) checkpoint; only diffusers-layout {family} "
            "weights are read. Convert it once with diffusers (`StableDiffusionPipeline.from_single_file(...)"
            ".save_pretrained(...)`) and point at the result.")


def load_unet(path: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32, *, config: Any = None,
              variant: str | None = None, attention_impl: str | None = None,
              remat_policy: str = "none", on_host: bool = False) -> tuple[UNet2DConditionModel, dict]:
    """A diffusers UNet folder, pipeline folder (uses unet/) or single .safetensors -> (model, params).

    on_host=True keeps the params as numpy arrays (the trainer shards them from host memory, so no device
    ever holds the whole tree).

    Raises ConversionError listing every missing / unexpected / mis-shaped key, and
    UnsupportedConfigError naming any config field the port does not implement.
    """
    cfg, state_dict, source = resolve_component(path, "unet", config=config, variant=variant)
    model = UNet2DConditionModel.from_config(cfg, dtype=dtype, param_dtype=param_dtype,
                                             attention_impl=attention_impl, remat_policy=remat_policy)
    check_diffusers_layout(state_dict, source, "UNet", ("model.diffusion_model.", "model_ema."))
    params = params_from_state_dict(UNET_TABLE, model.init_shapes(), state_dict, dtype=param_dtype,
                                    source=source)
    return model, (params if on_host else jax.tree.map(jnp.asarray, params))


def export_config_and_weights(config: dict, table: KeyTable, params, out_dir, dtype) -> Path:
    """Writes `config.json` + `diffusion_pytorch_model.safetensors` (PyTorch layout) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_dict = state_dict_from_params(table, params, dtype=export_dtype(dtype))
    write_safetensors(state_dict, out / WEIGHTS_NAME, metadata={"format": "pt"})
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "config.json")
    return out


def export_unet(model: UNet2DConditionModel | UNetConfig | Mapping, params, out_dir: str | os.PathLike,
                dtype: Any = "float32") -> Path:
    """Flax params -> a folder `diffusers.UNet2DConditionModel.from_pretrained` loads (dtype: float32 /
    fp16 / bf16). `model` may also be the UNetConfig or the diffusers config dict."""
    if isinstance(model, UNet2DConditionModel):
        config = model.config.diffusers_config
    elif isinstance(model, UNetConfig):
        config = model.diffusers_config
    else:
        UNetConfig.from_diffusers(model)  # validate before writing anything
        config = dict(model)
    config.setdefault("_class_name", "UNet2DConditionModel")
    return export_config_and_weights(config, UNET_TABLE, params, out_dir, dtype)


def export_lora(lora_factors, alpha: float, path: str | os.PathLike) -> Path:
    """LoRA factors of the UNet -> a diffusers LoRA file (PEFT key names, `unet.` prefix) that
    `pipeline.load_lora_weights` reads; module names come from the UNet's key table."""


    name = lambda path: UNET_TABLE.torch_key(path + ("kernel",), 2)[:-len(".weight")]  # noqa: E731
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(lora.peft_state_dict(lora_factors, alpha, name), path, metadata={"format": "pt"})
    return path
