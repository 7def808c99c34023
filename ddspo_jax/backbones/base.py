"""The Backbone interface every family implements (SD-1.x, SDXL, SANA), and what its loaders share."""

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
from ddspo_jax.models.layers import apply_sharded


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


def kl_vae_scale(bb) -> int:
    """Pixels per latent of a KL VAE (SD-1.x, SDXL, SD3): 2^(levels - 1), from the loaded VAE or, when its
    weights are not loaded, its config."""
    if bb.vae is not None:
        return 2 ** (len(bb.vae.config.block_out_channels) - 1)
    path = bb.path / "vae" / "config.json"
    blocks = json.loads(path.read_text()).get("block_out_channels", [0] * 4) if path.is_file() else [0] * 4
    return 2 ** (len(blocks) - 1)


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
