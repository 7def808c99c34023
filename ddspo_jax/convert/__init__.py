"""Weights in and out: safetensors I/O and one key table per model family (used for load AND export)."""

from ddspo_jax.convert.unet import export_unet, load_unet  # noqa: F401
from ddspo_jax.convert.vae import export_vae, load_vae  # noqa: F401
from ddspo_jax.convert.clip import export_clip_text, load_clip_model, load_clip_text, load_clip_vision  # noqa: F401
from ddspo_jax.convert.gemma import export_gemma2, load_gemma2  # noqa: F401
from ddspo_jax.convert.sana import export_sana, load_sana  # noqa: F401
from ddspo_jax.convert.dcae import export_dcae, load_dcae  # noqa: F401
