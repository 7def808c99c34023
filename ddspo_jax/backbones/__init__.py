"""What differs between model families (SD-1.x, SDXL, SANA), behind one small interface.

`step.py`, `prepare.py`, `sample.py`, `export.py` and `train.py` are written once against `Backbone`:
- `denoise(params, x_t, t, cond, gather=None)` -> the schedule's prediction (epsilon, v or flow velocity), NHWC;
- `encode(texts)` -> the conditioning pytree the denoiser takes (SD-1.x: prompt_embeds; SDXL: also
  pooled_prompt_embeds and add_time_ids; SANA: prompt_embeds and prompt_attention_mask), `negative_cond(n)`
  its CFG counterpart, and `record_cond(row)` what one record stores of it;
- `encode_images(images)` / `decode(latents)` between images in [0, 1] and scaled latents;
- class-level facts: generation defaults (paper settings), the denoiser's folder, loader, exporter and LoRA
  targets and file, and the embedded tiny model.
One module per family (`sd.py`, `sana.py`); `detect_family(folder)` reads `model_index.json`. Records store
the conditioning pytree as `encode` produced it, so the step never asks which model it runs. Adding a
family is one module that subclasses `Backbone` and registers itself in FAMILIES.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from ddspo_jax import schedules
from ddspo_jax.errors import ConfigError, MissingFileError, ModelError


def dtype_of(name: str):
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
    """One loaded model: its denoiser (and host params), schedule, and on demand its text encoder and VAE.

    Subclasses set the class-level facts and implement `denoise`, `load_denoiser`, `export_denoiser`,
    `_load_encoder`, `_load_vae`, `build_tiny`; the rest is shared."""

    path: Path
    denoiser: Any
    params: Any  # the denoiser's weights (host numpy after load; the train step shards them)
    schedule: Any
    encoder: Any = None  # prompt encoder, loaded on demand (training from embedding records never needs it)
    vae: Any = None
    vae_params: Any = None

    family: ClassVar[str] = ""
    pipeline_class: ClassVar[str] = ""  # model_index.json's _class_name
    denoiser_folder: ClassVar[str] = "unet"
    defaults: ClassVar[dict] = {}  # the paper's generation settings: guidance, steps, resolution, sampler
    lora_targets: ClassVar[tuple] = ("to_q", "to_k", "to_v", "to_out_0")
    lora_a_std: ClassVar[str] = "fan_in"  # lora.init's A initialisation (see lora.py)

    # ------------------------------------------------------------------ family facts (no instance)
    @classmethod
    def matches(cls, folder: Path) -> bool:
        """Whether a folder without model_index.json holds this family (from its denoiser's config)."""
        return False

    @classmethod
    def load_denoiser(cls, folder: Path, dtype, param_dtype, *, attention=None, remat_policy="none"):
        """(module, host params) of the denoiser in `folder/<denoiser_folder>`."""
        raise NotImplementedError

    @classmethod
    def export_denoiser(cls, base: Path, params, out_dir: Path, dtype: str = "float32") -> Path:
        """Writes the trained denoiser (config from `base`) as a diffusers component folder."""
        raise NotImplementedError

    @classmethod
    def export_lora(cls, factors, alpha: float, path: Path) -> Path:
        """LoRA factors -> a diffusers LoRA file (PEFT key names) the family's pipeline loads."""
        raise NotImplementedError

    @classmethod
    def build_tiny(cls, out: Path, seed: int = 0) -> None:
        """Writes the embedded tiny pipeline of this family into `out` (random weights, offline)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------- per model
    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent, from the VAE config even when its weights are not loaded."""
        raise NotImplementedError

    def default_resolution(self) -> int:
        """What the family's pipeline defaults height/width to: the denoiser's sample size x the VAE scale."""
        return int(self.denoiser.config.sample_size) * self.vae_scale

    def set_resolution(self, resolution: int) -> None:
        """Tells the conditioning the image size it is sampled at (SDXL's time ids); most families ignore it."""

    def denoise(self, params, x_t, t, cond, gather=None):
        raise NotImplementedError

    def _apply(self, params, gather, *args, **kwargs):
        """`denoiser.apply` on whole weights, or on fsdp shards inside the train step's shard_map (`gather`):
        every block then gathers its own weights (models/layers.apply_sharded); remat_policy "full" also
        recomputes the whole forward in the backward pass."""
        from ddspo_jax.models.layers import apply_sharded

        if gather is None or gather.noop:  # whole float32 weights already: no per-block wrapper needed
            return self.denoiser.apply({"params": params}, *args, **kwargs)

        def run(params, args, kwargs):
            return apply_sharded(self.denoiser, gather, params, *args, **kwargs)
        if self.denoiser.remat_policy == "full":
            run = jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)
        return run(params, args, kwargs)

    def _load_encoder(self):
        raise NotImplementedError

    def _load_vae(self):
        raise NotImplementedError

    def load_extras(self, *, text: bool = True, vae: bool = True) -> "Backbone":
        """Adds the text encoder(s) and the VAE when not loaded yet (training from records needs neither;
        its sample grids do)."""
        if text and self.encoder is None:
            self.encoder = self._load_encoder()
        if vae and self.vae is None:
            self.vae, self.vae_params = self._load_vae()
        return self

    def encode(self, texts) -> dict[str, np.ndarray]:
        out = self.encoder.encode(list(texts))
        return {k: np.asarray(v) for k, v in out.items() if k != "num_truncated"}

    def negative_cond(self, n: int) -> dict[str, np.ndarray]:
        out = self.encoder.encode_negative(n)
        return {k: np.asarray(v) for k, v in out.items() if k != "num_truncated"}

    def encode_ids(self, texts) -> dict[str, np.ndarray]:
        """What a token-ids record stores (data.cond_mode=token_ids); `embed_ids` turns it into `encode`'s
        conditioning inside the train step with the frozen encoder's params `text_params`."""
        return self.encoder.encode_ids_cond(list(texts))

    @property
    def text_params(self):
        return self.encoder.params

    def embed_ids(self, text_params, cond):
        return self.encoder.embed_ids(text_params, cond)

    def record_cond(self, cond: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One prompt's conditioning (no batch dim) -> what its record stores. The loader zero-pads arrays
        shorter than the manifest's shape back to it (data/loader.py), so a family may store a prefix."""
        return cond

    def _vae_encode(self, params, x):
        return self.vae.apply({"params": params}, x, method="encode")

    def _vae_decode(self, params, z):
        return self.vae.apply({"params": params}, z, method="decode")

    @functools.cached_property
    def _decode(self):
        return jax.jit(lambda p, z: jnp.clip(self._vae_decode(p, z) / 2 + 0.5, 0, 1))

    @functools.cached_property
    def _encode_images(self):
        return jax.jit(lambda p, x: self._vae_encode(p, x * 2.0 - 1.0))

    def encode_images(self, images) -> np.ndarray:
        """Images [B,H,W,3] in [0, 1] -> scaled latents (the posterior mean: deterministic), float32."""
        return np.asarray(self._encode_images(self.vae_params, jnp.asarray(images, jnp.float32)))

    def decode(self, latents) -> np.ndarray:
        """Scaled latents [B,h,w,C] -> images [B,H,W,3] in [0, 1] (float32 VAE)."""
        return np.asarray(self._decode(self.vae_params, latents))


def _registry() -> dict[str, type[Backbone]]:
    from ddspo_jax.backbones.sana import SanaBackbone
    from ddspo_jax.backbones.sd import SD1Backbone, SDXLBackbone

    return {c.family: c for c in (SD1Backbone, SDXLBackbone, SanaBackbone)}


FAMILY_NAMES = ("sd", "sdxl", "sana")  # the registry's keys, for config validation without importing models


def family_class(family: str) -> type[Backbone]:
    reg = _registry()
    if family not in reg:
        raise ModelError(f"model.family={family!r} is not one of {sorted(reg)}")
    return reg[family]


def detect_family(folder: str | Path) -> str:
    """The family of a diffusers pipeline folder, from model_index.json's `_class_name` (or, without one,
    from the denoiser's config)."""
    folder = Path(folder)
    reg = _registry()
    index = folder / "model_index.json"
    if index.is_file():
        try:
            name = json.loads(index.read_text()).get("_class_name", "")
        except ValueError as e:
            raise ModelError(f"{index}: not valid JSON ({e})") from None
        for cls in reg.values():
            if cls.pipeline_class == name:
                return cls.family
        raise ModelError(f"{index}: _class_name {name!r} is not a supported pipeline "
                         f"({', '.join(c.pipeline_class for c in reg.values())})")
    for cls in reg.values():
        if cls.matches(folder):
            return cls.family
    raise ModelError(f"{folder}: no model_index.json and no recognisable unet/ or transformer/ config; "
                     "is it a diffusers pipeline folder?")


GENERATION_FILE = "ddspo_generation.json"  # a model folder's own sampler / steps / guidance, if it has them
_GENERATION_KEYS = {"sampler": str, "steps": int, "guidance": float}


def folder_generation_defaults(folder) -> dict[str, Any]:
    """A model folder's recommended generation settings (`ddspo_generation.json`: any of sampler, steps,
    guidance), which replace its family's paper defaults: a model trained here, like the scene world's, has
    its own best CFG scale, and the file travels with the folder through `export`. No file: {}."""
    path = Path(folder) / GENERATION_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object with any of {sorted(_GENERATION_KEYS)}")
    out = {}
    for k, v in raw.items():
        if k.startswith("_"):  # comments
            continue
        if k not in _GENERATION_KEYS:
            raise ConfigError(f"{path}: unknown key {k!r} (allowed: {sorted(_GENERATION_KEYS)})")
        try:
            out[k] = _GENERATION_KEYS[k](v)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: {k}={v!r} is not a {_GENERATION_KEYS[k].__name__}") from None
    from ddspo_jax.sampling import SAMPLERS

    if out.get("sampler", SAMPLERS[0]) not in SAMPLERS:
        raise ConfigError(f"{path}: sampler {out['sampler']!r} is not one of {SAMPLERS}")
    if out.get("steps", 1) < 1 or out.get("guidance", 0.0) < 0:
        raise ConfigError(f"{path}: steps must be >= 1 and guidance >= 0 (got {out})")
    return out


def generation_settings(bb: Backbone, *, sampler: str = "", steps: int = 0, guidance=None, resolution: int = 0,
                        seed: int = 0) -> dict[str, Any]:
    """Sampler, steps, guidance and latent shape: explicit values, else the model folder's own
    (`ddspo_generation.json`), else the family's paper defaults (`defaults`); and the folder's scheduler
    settings."""
    d = {**bb.defaults, **folder_generation_defaults(bb.path)}
    path = bb.path / "scheduler" / "scheduler_config.json"
    sched = json.loads(path.read_text()) if path.is_file() else {}
    resolution = resolution or bb.default_resolution()
    scale = bb.vae_scale
    if resolution % scale:
        raise ConfigError(f"resolution {resolution} is not a multiple of the VAE scale {scale}")
    return {"family": bb.family, "sampler": sampler or d["sampler"], "steps": int(steps or d["steps"]),
            "guidance": float(d["guidance"] if guidance is None else guidance), "resolution": int(resolution),
            "latent_shape": [resolution // scale, resolution // scale, bb.latent_channels],
            "steps_offset": int(sched.get("steps_offset", 1)),
            "set_alpha_to_one": bool(sched.get("set_alpha_to_one", False)), "seed": int(seed)}


def resolve_path(path: str, family: str = "") -> Path:
    """config.model.path -> a diffusers folder: "tiny[-<family>]" / "tiny[-<family>]:<folder>" is the embedded
    tiny model (built on first use); anything else is taken as given. The one way commands reach it."""
    from ddspo_jax.tiny import resolve_model_path

    return resolve_model_path(path, family)


def load_backbone(model_cfg, schedule_cfg, *, text: bool = True, vae: bool = True, log=print) -> Backbone:
    """Loads the diffusers pipeline folder named by `config.model.path` as its family's Backbone; the family
    is detected from the folder, and `model.family`, when set, must agree."""
    want = model_cfg.get("family", "") or ""
    folder = resolve_path(model_cfg.path, want) if model_cfg.path else Path("")
    if not model_cfg.path or not folder.is_dir():
        raise MissingFileError(f"config.model.path={model_cfg.path!r} is not a diffusers model folder")
    family = detect_family(folder)
    if want and want != family:
        raise ModelError(f"config.model.family={want!r} but {folder} holds a {family!r} model "
                         f"({folder / 'model_index.json'}); set model.family={family!r} or leave it empty")
    cls = family_class(family)
    from ddspo_jax.backbones.text import require_components

    require_components(folder, [cls.denoiser_folder] + (["vae"] if vae else []))
    model, params = cls.load_denoiser(folder, dtype_of(model_cfg.dtype), dtype_of(model_cfg.param_dtype),
                                      attention=model_cfg.attention or None, remat_policy=model_cfg.remat_policy)
    bb = cls(folder, model, params, schedule_from_folder(folder, schedule_cfg, log))
    bb.load_extras(text=text, vae=vae)
    return bb
