"""What differs between model families (SD-1.x, SDXL, SANA, SD3), behind one small interface.

`step.py`, `prepare.py`, `sample.py`, `export.py` and `train.py` are written once against `Backbone`:
- `denoise(params, x_t, t, cond, gather=None)` -> the schedule's prediction (epsilon, v or flow velocity), NHWC;
- `encode(texts)` -> the conditioning pytree the denoiser takes (SD-1.x: prompt_embeds; SDXL: also
  pooled_prompt_embeds and add_time_ids; SANA: prompt_embeds and prompt_attention_mask), `negative_cond(n)`
  its CFG counterpart, and `record_cond(row)` what one record stores of it;
- `encode_images(images)` / `decode(latents)` between images in [0, 1] and scaled latents;
- class-level facts: generation defaults (paper settings), the denoiser's folder, loader, exporter and LoRA
  targets and file, and the embedded tiny model.
The interface is in `base.py`, one module per family (`sd.py`, `sana.py`, `sd3.py`), the tiny model's parts in `tiny.py`;
this module is the registry: `detect_family(folder)` reads `model_index.json`, `load_backbone` builds one, and
`resolve_path` turns "tiny[-<family>]" into the embedded tiny model's folder (built on first use). Records store
the conditioning pytree as `encode` produced it, so the step never asks which model it runs. Adding a
family is one module that subclasses `Backbone` and registers itself in FAMILIES.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ddspo_jax.backbones.base import Backbone, dtype_of, schedule_from_folder
from ddspo_jax.backbones.sana import SanaBackbone
from ddspo_jax.backbones.sd import SD1Backbone, SDXLBackbone
from ddspo_jax.backbones.sd3 import SD3Backbone
from ddspo_jax.backbones.text import require_components
from ddspo_jax.backbones.tiny import MARKER, TINY_VERSION, write_json
from ddspo_jax.errors import ConfigError, MissingFileError, ModelError, UserError
from ddspo_jax.files import remove_orphan_temps, temp_beside
from ddspo_jax.sampling import SAMPLERS


def _registry() -> dict[str, type[Backbone]]:

    return {c.family: c for c in (SD1Backbone, SDXLBackbone, SanaBackbone, SD3Backbone)}


FAMILY_NAMES = ("sd", "sdxl", "sana", "sd3")  # the registry's keys, for config validation without importing models


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


# --------------------------------------------------------------------------------------------- the tiny model


class TinyFolderError(UserError, FileExistsError):
    """The folder named for the tiny model holds something else (never overwritten)."""


def build_tiny_model(out: str | os.PathLike, family: str = "sd", seed: int = 0) -> Path:
    """Writes the family's tiny pipeline (backbones.<family>.build_tiny) into `out` (created; not atomic:
    `ensure_tiny_model` wraps it)."""
    cls = family_class(family)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cls.build_tiny(out, seed)
    write_json(out / MARKER, {"version": TINY_VERSION, "family": family, "seed": seed})
    return out


def default_tiny_folder(family: str = "sd") -> Path:
    """Where the tiny model is cached when a config does not say: $DDSPO_JAX_CACHE or ~/.cache/ddspo_jax."""
    root = Path(os.environ.get("DDSPO_JAX_CACHE", Path.home() / ".cache" / "ddspo_jax"))
    return root / f"tiny-{family}-v{TINY_VERSION}"


def _is_tiny(folder: Path, family: str, seed: int) -> bool:
    try:
        m = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return m == {"version": TINY_VERSION, "family": family, "seed": seed}


def ensure_tiny_model(folder: str | os.PathLike | None = None, *, family: str = "sd", seed: int = 0,
                      verbose: bool = False) -> Path:
    """The tiny pipeline folder, built on first use (atomically) and reused afterwards.

    An existing folder is reused only if its `ddspo_tiny.json` marker matches (version, family, seed); an
    existing non-empty folder that is something else is an error, never overwritten."""
    folder = Path(folder) if folder else default_tiny_folder(family)
    if _is_tiny(folder, family, seed):
        return folder
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise TinyFolderError(f"{folder} exists and is not the tiny {family} model of version {TINY_VERSION} "
                              f"(no matching {MARKER}); remove it or choose another folder")
    if verbose:
        print(f"building the tiny {family} model in {folder} (once; cached afterwards)", flush=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(folder)
    remove_orphan_temps(folder.parent, folder.name)  # a killed builder's leftover (a live one's is left alone)
    try:
        build_tiny_model(tmp, family, seed)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        os.rename(tmp, folder)
    except OSError:
        if not _is_tiny(folder, family, seed):  # not a lost race with another builder
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


TINY_NAME = re.compile(r"tiny(?:-(\w+))?(?::(.*))?")


def parse_tiny(path: str, family: str = "") -> tuple[str, str | None] | None:
    """"tiny", "tiny-<family>", "tiny:<folder>" or "tiny-<family>:<folder>" -> (family, folder or None); anything
    else None. Plain "tiny" is the `family` hint (config.model.family) or SD-1.x."""
    m = TINY_NAME.fullmatch(path)
    if m is None:
        return None
    named = m.group(1)
    if named and family and named != family:
        raise ConfigError(f"config.model.path={path!r} names the tiny {named!r} model but model.family={family!r}")
    return named or family or "sd", m.group(2) or None


def resolve_model_path(path: str, family: str = "") -> Path:
    """`config.model.path` -> a model folder. "tiny[-<family>]" builds/reuses the tiny model in its default cache
    folder, "tiny[-<family>]:<folder>" in <folder>; anything else is returned as a path (a missing folder is an
    error there)."""
    tiny = parse_tiny(path, family)
    if tiny is not None:
        return ensure_tiny_model(tiny[1], family=tiny[0], verbose=True)
    return Path(path)


def resolve_path(path: str, family: str = "") -> Path:
    """config.model.path -> a diffusers folder: "tiny[-<family>]" / "tiny[-<family>]:<folder>" is the embedded
    tiny model (built on first use); anything else is taken as given. The one way commands reach it."""

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

    require_components(folder, [cls.denoiser_folder] + (["vae"] if vae else []))
    model, params = cls.load_denoiser(folder, dtype_of(model_cfg.dtype), dtype_of(model_cfg.param_dtype),
                                      attention=model_cfg.attention or None, remat_policy=model_cfg.remat_policy)
    if model_cfg.get("scan_blocks", False):
        model = model.clone(scan_blocks=True)  # every denoiser (UNet, SANA, MMDiT) has the field
    bb = cls(folder, model, params, schedule_from_folder(folder, schedule_cfg, log))
    bb.load_extras(text=text, vae=vae)
    return bb
