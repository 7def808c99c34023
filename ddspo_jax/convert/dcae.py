"""DC-AE weights: diffusers `AutoencoderDC` safetensors -> Flax params for `models.dcae.AutoencoderDC`.

linen names a Sequential's members `down_blocks_<i>_<j>` inside one module; the renames restore diffusers'
`down_blocks.<i>.<j>`. BatchNorm's running statistics load as (frozen) weights; its step counter is ignored.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddspo_jax.convert.common import ConversionError, KeyTable, params_from_state_dict, resolve_component
from ddspo_jax.convert.unet import export_config_and_weights
from ddspo_jax.models.dcae import AutoencoderDC, DCAEConfig

DCAE_TABLE = KeyTable(
    list_modules=frozenset({"to_qkv_multiscale"}),
    renames=((r"(encoder|decoder)\.(down|up)_blocks_(\d+)_(\d+)", r"\1.\2_blocks.\3.\4"),),
    ignore=(r".*num_batches_tracked",),
)


def load_dcae(path: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32, *, component: str = "vae",
              config: Any = None, variant: str | None = None) -> tuple[AutoencoderDC, dict]:
    """A DC-AE folder, a pipeline folder (its `vae/`) or a single .safetensors file with a config ->
    (module, params). `apply(..., method="encode" | "decode")` on NHWC; decode in float32 as the paper's
    pipeline does (SANA's VAE is run in float32 or bf16; float32 is the default here)."""
    cfg, state_dict, source = resolve_component(path, component, config=config, variant=variant)
    try:
        model = AutoencoderDC(DCAEConfig.from_dict(cfg), dtype=dtype, param_dtype=param_dtype)
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None
    params = params_from_state_dict(DCAE_TABLE, model.init_shapes(), state_dict, dtype=np.dtype(param_dtype),
                                    source=source)
    return model, jax.tree.map(jnp.asarray, params)


def export_dcae(config: dict, params, out_dir: str | os.PathLike, dtype: Any = "float32"):
    """Flax params -> a diffusers `AutoencoderDC` folder (config.json + diffusion_pytorch_model.safetensors)."""

    DCAEConfig.from_dict(config)  # validates before anything is written
    return export_config_and_weights(dict(config), DCAE_TABLE, params, out_dir, dtype)
