"""Turn a training run's Orbax checkpoint back into a diffusers pipeline folder.

  python -m ddspo_jax.export --run runs/sd15 --out exported/sd15-ddspo [--step N] [--dtype fp16]

The fine-tuned denoiser (UNet or SANA transformer; LoRA merged when the run used it) is written through its
family's key table; the base model's other components (text encoders, tokenizers, VAE, scheduler,
model_index.json) are copied (or, with --link, symlinked) unchanged, so `diffusers.*Pipeline.from_pretrained(out)`
loads the result. A LoRA run also writes its factors as a diffusers LoRA file (`load_lora_weights`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from ddspo_jax.checkpoint import (
    base_family, base_folder, lora_alpha, merge_trained, restore_checkpoint_params, run_config, RunError
)
from ddspo_jax.errors import run_command
from ddspo_jax.files import remove_orphan_temps, temp_beside, write_text_atomic


class ExportError(RunError):
    """A user-facing export problem (an output folder that may not be written); a bad run folder or a missing
    step is checkpoint.RunError."""


LORA_FILE = "pytorch_lora_weights.safetensors"


def export_pair(run: Path, out: Path, step: int | None = None, log=print) -> Path:
    """An sft_pair run -> `<out>/winning/` and `<out>/losing/`, each a diffusers LoRA file."""
    import jax

    params, step, cfg = restore_checkpoint_params(run, step)
    if jax.process_index() == 0:
        family = base_family(base_folder(cfg))
        for name, key in (("winning", "w"), ("losing", "l")):
            family.export_lora(params[key], lora_alpha(cfg), out / name / LORA_FILE)
        write_text_atomic(out / EXPORT_MARK, json.dumps({"run": str(run.resolve()), "step": int(step)}) + "\n")
        log(f"exported the winning and losing adapters of step {step} of {run} to {out}/winning and {out}/losing "
            f"({LORA_FILE}, PEFT key names: pipeline.load_lora_weights reads them)")
    return out


EXPORT_MARK = ".ddspo_export.json"  # written into every export: what --overwrite may replace


def check_replaceable(out: Path, run: Path, overwrite: bool) -> None:
    """`out` may be written: it is empty or absent, or --overwrite names a folder an export wrote (it carries
    EXPORT_MARK, or is a pipeline folder made before the mark existed) that holds no run, no records and is
    neither the run, a folder above it, nor the working directory or one above it. Nothing a user had is
    removed by a typo in --out."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is an existing file, not a folder; choose a folder path")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"output folder {out} is not empty; choose another or pass --overwrite")
    o = out.resolve()
    for what, p in (("the training run", run.resolve()), ("the working directory", Path.cwd().resolve())):
        if o == p or o in p.parents:
            raise ExportError(f"--out {out} is {what} or a folder above it; --overwrite replaces only a folder an "
                              "export wrote: choose another --out")
    marked = (out / EXPORT_MARK).is_file()
    legacy = (out / "model_index.json").is_file()
    held = next((p for pat in ("config.json", "manifest.json", "checkpoints") for p in out.rglob(pat)
                 if pat != "config.json" or (p.parent / "checkpoints").is_dir()), None)
    if held is not None or not (marked or legacy):
        why = f"it holds {held}" if held is not None else f"it has no {EXPORT_MARK} (not written by export)"
        raise ExportError(f"--overwrite refused for {out}: {why}; --overwrite replaces only a folder an export "
                          "wrote: choose another --out")


def export(run: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None, dtype: str = "fp32",
           unet_only: bool = False, overwrite: bool = False, link: bool = False, log=print) -> Path:
    import jax

    run, out = Path(run), Path(out)
    check_replaceable(out, run, overwrite)
    if run_config(run).get("train", {}).get("objective") == "sft_pair":
        return export_pair(run, out, step, log)
    raw, step, cfg = restore_checkpoint_params(run, step)  # every process of a multi-process run reads (the
    if jax.process_index() != 0:  # restore is collective) ... and process 0 writes
        return out
    base = base_folder(cfg)
    family = base_family(base)
    params = merge_trained(raw, cfg, base)
    tmp = temp_beside(out)
    remove_orphan_temps(out.parent, out.name)  # a killed export's half-written folder (and our own pid's)
    tmp.mkdir(parents=True)
    try:
        family.export_denoiser(base, params, tmp if unet_only else tmp / family.denoiser_folder, dtype=dtype)
        if cfg["model"].get("lora_rank", 0) > 0:  # the factors too, as a diffusers LoRA file
            family.export_lora(raw, lora_alpha(cfg), tmp / LORA_FILE)
        if not unet_only:
            for item in sorted(base.iterdir()):
                if item.name == family.denoiser_folder or item.name.startswith(".") or item.name == "ddspo_tiny.json":
                    continue
                dst = tmp / item.name
                if link:
                    dst.symlink_to(item.resolve(), target_is_directory=item.is_dir())
                elif item.is_dir():
                    shutil.copytree(item, dst)
                else:
                    shutil.copy2(item, dst)
        write_text_atomic(tmp / EXPORT_MARK, json.dumps({"run": str(run.resolve()), "step": int(step)}) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"exported step {step} of {run} ({family.denoiser_folder + ' only' if unet_only else 'full pipeline'}, "
        f"{dtype}) to {out}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ddspo_jax.export", description=__doc__.split("\n\n")[0],
                                 epilog="The base model is the run's config.model.path; its components other "
                                        "than the denoiser are copied unchanged.")
    ap.add_argument("--run", required=True, help="training output folder (config.output_dir of the run)")
    ap.add_argument("--out", required=True, help="folder to write the diffusers pipeline into")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                    help="dtype of the written denoiser")
    ap.add_argument("--unet-only", action="store_true",
                    help="write only the denoiser (UNet or SANA transformer: config.json + weights)")
    ap.add_argument("--link", action="store_true", help="symlink the unchanged components instead of copying")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    a = ap.parse_args(argv)
    return run_command(export, a.run, a.out, step=a.step, dtype=a.dtype, unet_only=a.unet_only,
                       overwrite=a.overwrite, link=a.link)


if __name__ == "__main__":
    sys.exit(main())
