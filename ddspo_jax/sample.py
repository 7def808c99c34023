"""Generate images from a diffusers model folder or a training run, and compare two models.

  python -m ddspo_jax.sample --model runs/tiny --prompts prompts.txt --out samples/ [--compare tiny]

--model / --compare take a diffusers pipeline folder, "tiny" (the embedded model), or a training run folder
(its base model with the trained UNet of its latest checkpoint, or --step N). Images are PNGs named by prompt
index and seed, plus a contact sheet `grid.png`; with --compare, `compare.png` puts the two models' images
side by side with the same seeds and settings, which is how a fine-tune is judged. Generation goes through
`sampling.Generator`, the same code `prepare` uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ddspo_jax import checkpoint
from ddspo_jax.config import base_config
from ddspo_jax.data.prompts import load_prompts
from ddspo_jax.errors import run_command, UserError
from ddspo_jax.files import remove_orphan_temps, temp_beside, write_text_atomic

# The package's JAX-importing modules are imported inside the functions that use them: `--help` and a
# mistyped argument answer in ~0.4 s instead of ~4 s (JAX, Flax, Orbax start-up, measured on 2 cores);
# tests/test_structure.py checks that every function-local import is one of those.


def load_model(spec: str, *, dtype: str, step: int | None = None):
    """(backbone with text encoder and VAE, UNet params) for a model folder, "tiny", or a run folder."""
    import ml_collections

    from ddspo_jax.backbones import load_backbone

    path = Path(spec)
    params = None
    mcfg = ml_collections.ConfigDict(base_config().model.to_dict())
    if checkpoint.is_run(path):
        params, _, run_cfg, base = checkpoint.restore_trained_params(path, step)
        mcfg.path = str(base)
    else:
        mcfg.path = spec  # the family is detected from the folder (backbones.detect_family)
    mcfg.dtype = dtype

    try:
        bb = load_backbone(mcfg, base_config().schedule, text=True, vae=True, log=None)
    except UserError as e:  # these commands take a folder, not a config: name the folder, not the config key
        raise type(e)(str(e).replace(f"config.model.path={mcfg.path!r}", f"model folder {mcfg.path}")) from None
    return bb, bb.params if params is None else params


def generate_images(bb, gen, params, prompts, indices, batch: int | None = None) -> np.ndarray:
    """Images [N, H, W, 3] in [0, 1]: prompts[i] from the initial noise of (seed, indices[i]), the noise
    prepare uses for prompt index i, so the image of prompt i is the decoded x0_w of its record.

    `gen` is a sampling.Generator and `params` replicated (sampling.replicate), both made once per model;
    with `batch`, short batches are padded to it so the sampler compiles once."""
    n = len(prompts)
    prompts, indices = list(prompts), list(indices)
    if batch and n < batch:
        prompts, indices = prompts + prompts[-1:] * (batch - n), indices + indices[-1:] * (batch - n)
    return bb.decode(gen(params, bb.encode(prompts), gen.noise(indices)))[:n]


def contact_sheet(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """rows: list of [N, H, W, 3] -> one uint8 image, each list entry one row."""
    h, w = rows[0].shape[1:3]
    n = max(len(r) for r in rows)
    sheet = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            sheet[y:y + h, x:x + w] = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return sheet


def save_png(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    if img.dtype != np.uint8:
        img = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    tmp = temp_beside(path)
    try:
        with tmp.open("wb") as f:  # pathlib or etils.epath (gs://) paths
            Image.fromarray(img).save(f, format="PNG")
        tmp.replace(path)  # a kill mid-write leaves a temp file (a re-run's remove_orphan_temps deletes it), never a truncated PNG
    finally:
        if tmp.exists():
            tmp.unlink()


def model_identity(spec: str, step: int | None = None) -> dict:
    """What generated a model's images: a run folder's resolved path and checkpoint step (the latest when
    `step` is None), else the folder and the size / mtime of its weight files -- so a cache of images is
    not trusted after the run trained on or the weights were replaced."""
    path = Path(spec)
    if checkpoint.is_run(path):
        return {"run": str(path.resolve()), "step": int(step if step is not None else checkpoint.steps(path)[-1])}
    if not path.is_dir():
        return {"model": spec}
    files = sorted(p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".msgpack") and p.is_file())
    return {"model": str(path.resolve()),
            "weights": [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def run(args) -> dict:
    import jax
    from tqdm import tqdm

    from ddspo_jax import parallel, sampling

    prompts, _ = load_prompts(args.prompts, field=args.field or None, limit=args.limit or None)
    if not prompts:
        raise SystemExit(f"error: no prompts in {args.prompts}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    mesh = parallel.make_mesh()
    models = [("model", args.model)] + ([("compare", args.compare)] if args.compare else [])
    images = {}
    for name, spec in models:
        bb, params = load_model(spec, dtype=dtype, step=args.step if name == "model" else None)
        from ddspo_jax.backbones import generation_settings

        settings = generation_settings(bb, sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                                                resolution=args.resolution, seed=args.seed)
        gen, rep = sampling.Generator(bb, settings, mesh), sampling.replicate(params, mesh)
        imgs = []
        for a in tqdm(range(0, len(prompts), args.batch), desc=f"sample {name}", unit="batch"):
            imgs.append(generate_images(bb, gen, rep, prompts[a:a + args.batch],
                                        range(a, min(a + args.batch, len(prompts))), batch=args.batch))
        images[name] = np.concatenate(imgs)
        folder = out if name == "model" else out / "compare"
        folder.mkdir(exist_ok=True)
        remove_orphan_temps(folder)  # what a killed sample left half-written
        for i, img in enumerate(images[name]):
            save_png(img, folder / f"{i:05d}_seed{args.seed}.png")
    per_row = max(1, int(np.ceil(np.sqrt(len(prompts)))))
    rows = [images["model"][a:a + per_row] for a in range(0, len(prompts), per_row)]
    save_png(contact_sheet(rows), out / "grid.png")
    summary = {"images": len(prompts), "out": str(out), "settings": settings}
    if args.compare:
        save_png(contact_sheet([images["model"], images["compare"]]), out / "compare.png")
    write_text_atomic(out / "samples.json", json.dumps({"model": args.model, "compare": args.compare,
                                                        "seed": args.seed, "prompts": prompts, "settings": settings},
                                                       indent=1) + "\n")
    print(f"sample: {len(prompts)} images ({settings['sampler']}, {settings['steps']} steps, guidance "
          f"{settings['guidance']}, {settings['resolution']}px) in {out}"
          + (f"; side by side with {args.compare} in {out / 'compare.png'}" if args.compare else ""))
    return summary


def parse_args(argv=None):
    from ddspo_jax.sampling import SAMPLERS

    ap = argparse.ArgumentParser(prog="python -m ddspo_jax.sample", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--model", required=True, help="diffusers folder, 'tiny', or a training run folder")
    ap.add_argument("--prompts", required=True, help="prompt file (.txt, .jsonl, .csv, .parquet)")
    ap.add_argument("--out", required=True, help="output folder for the PNGs")
    ap.add_argument("--compare", default="", help="a second model, sampled with the same seeds")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step of a run folder (default latest)")
    ap.add_argument("--steps", type=int, default=0, help="sampler steps (0: family default)")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default: family default)")
    ap.add_argument("--sampler", default="", choices=("",) + SAMPLERS)
    ap.add_argument("--resolution", type=int, default=0, help="pixels (0: the model's default)")
    ap.add_argument("--seed", type=int, default=0,
                    help="prompt i starts from the initial noise of (seed, i): with the seed prepare used (config.seed, "
                         "default 0) image i is the winner of record i; another seed gives other images")
    ap.add_argument("--batch", type=int, default=8, help="prompts per generation call")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N prompts")
    ap.add_argument("--field", default="", help="JSONL field / CSV column of the prompts")
    ap.add_argument("--dtype", default="", choices=("", "float32", "bfloat16"),
                    help="compute dtype (default: float32 on CPU, bfloat16 on accelerators)")
    args = ap.parse_args(argv)
    if args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    check_common_args(ap, args)
    return args


def check_common_args(ap, args) -> None:
    """sample's and evaluate's shared flags, before any model is loaded: --limit, --out, and that --model and
    --compare name something (a second model's typo found after the first model's images is time lost)."""
    if args.limit < 0:
        ap.error(f"--limit {args.limit}: must be >= 0 (0: every prompt)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        ap.error(f"--out {args.out} is an existing file; name a folder")
    for flag, spec in (("--model", args.model), ("--compare", args.compare)):
        if spec and not spec.startswith("tiny") and not Path(spec.split(":")[0]).exists():
            ap.error(f"{flag} {spec}: no such model folder or run folder")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # a bad flag: argparse printed its line; the exit code is returned like the others
        return int(e.code or 0)
    from ddspo_jax.parallel import cpu_host_setup

    cpu_host_setup()  # before JAX starts its backends
    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
