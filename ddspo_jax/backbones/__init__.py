"""What differs between SD-1.x and SDXL (and later SANA), behind one small interface.

`step.py`, `prepare.py` and `sample.py` are written once against `Backbone`:
- `denoise(params, x_t, t, cond)` -> the schedule's prediction (epsilon or v), NHWC;
- `encode(texts)` -> the conditioning pytree the denoiser takes (SD-1.x: prompt_embeds; SDXL: also
  pooled_prompt_embeds and add_time_ids), and `negative_cond(n)` its CFG counterpart;
- `decode(latents)` -> images in [0, 1].
Records store the conditioning pytree as `encode` produced it, so the step never asks which model it runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ddspo_jax.errors import ConfigError, MissingFileError, ModelError
from ddspo_jax import schedules

# Paper's generation settings per family (Sec. 4 / App.): guidance scale, steps, resolution, sampler.
DEFAULTS = {
    "sd": dict(guidance=7.5, steps=25, resolution=512, sampler="pndm"),  # PNDM: SD-1.x's shipped scheduler
    "sdxl": dict(guidance=5.0, steps=25, resolution=1024, sampler="euler"),
    "sana": dict(guidance=4.5, steps=20, resolution=1024, sampler="flow_euler"),
}


def _dtype(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def schedule_from_folder(folder: Path, fallback, log=None) -> schedules.DDPMSchedule | schedules.FlowSchedule:
    """The training schedule from the pipeline's scheduler/scheduler_config.json (what the model was
    trained with), falling back to the config's `schedule` section when there is none. Where the folder's
    values replace the config's `schedule.*` keys, `log` is told once, with the values taken."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return schedules.from_config(fallback)
    sc = json.loads(path.read_text())
    if "FlowMatch" in sc.get("_class_name", "") or sc.get("use_flow_sigmas"):
        taken = {"kind": "flow", "num_train_timesteps": sc.get("num_train_timesteps", 1000),
                 "flow_shift": sc.get("shift", sc.get("flow_shift", 3.0))}
        out = schedules.FlowSchedule(taken["num_train_timesteps"], taken["flow_shift"],
                                     (fallback or {}).get("train_flow_shift", 1.0))
    else:
        taken = {"kind": "ddpm", "num_train_timesteps": sc.get("num_train_timesteps", 1000),
                 "beta_schedule": sc.get("beta_schedule", "scaled_linear"), "beta_start": sc.get("beta_start", 0.00085),
                 "beta_end": sc.get("beta_end", 0.012), "prediction_type": sc.get("prediction_type", "epsilon")}
        out = schedules.DDPMSchedule(*(taken[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start",
                                                          "beta_end", "prediction_type")))
    changed = {k: v for k, v in taken.items() if fallback is not None and k in fallback and fallback[k] != v}
    if changed and log is not None:
        log(f"{path} overrides the config: " + ", ".join(f"schedule.{k}={v!r} (config: {fallback[k]!r})"
                                                         for k, v in changed.items()))
    return out


@dataclasses.dataclass
class Backbone:
    family: str
    path: Path
    unet: Any
    unet_params: Any
    schedule: Any
    encoder: Any = None  # PromptEncoder, loaded on demand (training from records never needs it)
    vae: Any = None
    vae_params: Any = None

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def vae_scale(self) -> int:
        """Pixels per latent (8 for SD/SDXL), from the VAE config even when its weights are not loaded."""
        if self.vae is not None:
            return 2 ** (len(self.vae.config.block_out_channels) - 1)
        path = self.path / "vae" / "config.json"
        blocks = json.loads(path.read_text()).get("block_out_channels", [0] * 4) if path.is_file() else [0] * 4
        return 2 ** (len(blocks) - 1)

    def denoise(self, params, x_t, t, cond, gather=None):
        """The UNet's prediction. `gather` (inside the train step's shard_map): `params` are fsdp shards and
        every block gathers its own weights (models/unet.apply_sharded); remat_policy "full" also
        recomputes the whole forward in the backward pass."""
        from ddspo_jax.models.unet import apply_sharded

        added = None
        if self.family == "sdxl":
            added = {"text_embeds": cond["pooled_prompt_embeds"], "time_ids": cond["add_time_ids"]}
        if gather is None or gather.noop:  # whole float32 weights already: no per-block wrapper needed
            return self.unet.apply({"params": params}, x_t, t, cond["prompt_embeds"], added_cond=added)

        def run(params, x_t, t, ctx, added):
            return apply_sharded(self.unet, gather, params, x_t, t, ctx, added_cond=added)
        if self.unet.remat_policy == "full":
            run = jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)
        return run(params, x_t, t, cond["prompt_embeds"], added)

    def encode(self, texts) -> dict[str, np.ndarray]:
        out = self.encoder.encode(list(texts))
        return {k: np.asarray(v) for k, v in out.items() if k != "num_truncated"}

    def negative_cond(self, n: int) -> dict[str, np.ndarray]:
        out = self.encoder.encode_negative(n)
        return {k: np.asarray(v) for k, v in out.items() if k != "num_truncated"}

    def load_extras(self, *, text: bool = True, vae: bool = True) -> "Backbone":
        """Adds the text encoder(s) and the VAE when not loaded yet (training from records needs neither;
        its sample grids do)."""
        from ddspo_jax.convert import load_vae
        from ddspo_jax.backbones.text import PromptEncoder

        if text and self.encoder is None:
            self.encoder = PromptEncoder.from_pretrained(self.path, kind="sdxl" if self.family == "sdxl" else "sd1")
        if vae and self.vae is None:
            self.vae, self.vae_params = load_vae(self.path)
        return self

    @functools.cached_property
    def _decode(self):
        return jax.jit(lambda p, z: jnp.clip(self.vae.apply({"params": p}, z, method="decode") / 2 + 0.5, 0, 1))

    @functools.cached_property
    def _encode_images(self):
        return jax.jit(lambda p, x: self.vae.apply({"params": p}, x * 2.0 - 1.0, method="encode"))

    def encode_images(self, images) -> np.ndarray:
        """Images [B,H,W,3] in [0, 1] -> scaled latents (the posterior mean: deterministic), float32."""
        return np.asarray(self._encode_images(self.vae_params, jnp.asarray(images, jnp.float32)))

    def decode(self, latents) -> np.ndarray:
        """Scaled latents [B,h,w,C] -> images [B,H,W,3] in [0, 1] (float32 VAE, see models/vae.py)."""
        return np.asarray(self._decode(self.vae_params, latents))


def generation_settings(bb, *, sampler: str = "", steps: int = 0, guidance=None, resolution: int = 0,
                        seed: int = 0) -> dict[str, Any]:
    """Sampler, steps, guidance and latent shape: explicit values, else the family's paper defaults
    (DEFAULTS) and the model folder's scheduler settings."""
    import json

    d = DEFAULTS[bb.family]
    path = bb.path / "scheduler" / "scheduler_config.json"
    sched = json.loads(path.read_text()) if path.is_file() else {}
    resolution = resolution or (bb.encoder.resolution if bb.encoder is not None else d["resolution"])
    scale = bb.vae_scale
    if resolution % scale:
        raise ConfigError(f"resolution {resolution} is not a multiple of the VAE scale {scale}")
    return {"family": bb.family, "sampler": sampler or d["sampler"], "steps": int(steps or d["steps"]),
            "guidance": float(d["guidance"] if guidance is None else guidance), "resolution": int(resolution),
            "latent_shape": [resolution // scale, resolution // scale, bb.latent_channels],
            "steps_offset": int(sched.get("steps_offset", 1)),
            "set_alpha_to_one": bool(sched.get("set_alpha_to_one", False)), "seed": int(seed)}


def resolve_path(path: str, family: str = "sd") -> Path:
    """config.model.path -> a diffusers folder: "tiny" / "tiny:<folder>" is the embedded tiny model (built on
    first use); anything else is taken as given. The one way commands reach the embedded model."""
    from ddspo_jax.tiny import resolve_model_path


    return resolve_model_path(path, family)


def load_backbone(model_cfg, schedule_cfg, *, text: bool = True, vae: bool = True, log=print) -> Backbone:
    """Loads a diffusers pipeline folder named by `config.model.path` ("tiny" / "tiny:<folder>": the
    embedded tiny model, built on first use)."""
    from ddspo_jax.convert import load_unet
    from ddspo_jax.backbones.text import require_components

    family = model_cfg.family
    if family not in ("sd", "sdxl"):
        raise ModelError(f"model.family={family!r}: only 'sd' and 'sdxl' backbones exist so far")
    folder = resolve_path(model_cfg.path, family) if model_cfg.path else Path("")
    if not model_cfg.path or not folder.is_dir():
        raise MissingFileError(f"config.model.path={model_cfg.path!r} is not a diffusers model folder")
    require_components(folder, ["unet"] + (["vae"] if vae else []))
    dtype, pdtype = _dtype(model_cfg.dtype), _dtype(model_cfg.param_dtype)
    unet, unet_params = load_unet(folder, dtype, pdtype, attention_impl=model_cfg.attention or None,
                                  remat_policy=model_cfg.remat_policy, on_host=True)
    is_xl = unet.config.addition_embed_type == "text_time"
    if is_xl != (family == "sdxl"):
        raise ModelError(f"config.model.family={family!r} but {folder / 'unet'} is "
                         f"{'an SDXL' if is_xl else 'an SD-1.x-style'} UNet")
    bb = Backbone(family, folder, unet, unet_params, schedule_from_folder(folder, schedule_cfg, log))
    bb.load_extras(text=text, vae=vae)
    return bb
