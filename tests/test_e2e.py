"""The embedded default end to end (README's first command, small settings): tiny model built, records
prepared because they are missing, DDSPO trained, checkpointed, exported to diffusers, sample grid written."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--config.data.prompt_limit=16", "--config.data.shard_size=8", "--config.prepare.batch_size=8",
         "--config.prepare.steps=2", "--config.train.batch_size=8", "--config.train.micro_batch_per_device=2",
         "--config.train.checkpoint_every=2", "--config.train.sample_every=2", "--config.train.warmup_steps=1"]


def run(tmp_path, *extra):
    env = dict(os.environ, DDSPO_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.run([sys.executable, "-m", "ddspo_jax.train", f"--config={REPO / 'configs' / 'tiny.py'}",
                           f"--config.output_dir={tmp_path / 'run'}", f"--config.data.records={tmp_path / 'rec'}",
                           *SMALL, *extra], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)


def test_tiny_road_end_to_end(tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from ddspo_jax.convert import load_unet
    from ddspo_jax.checkpoint import restore_trained_params

    res = run(tmp_path, "--config.train.steps=4")
    assert res.returncode == 0, res.stderr[-4000:]
    out = res.stdout
    assert "no preference records" in out and "preparing them" in out and "prepare: wrote 16 pairs" in out
    for what in ("records", "checkpoints", "TensorBoard", "samples", "diffusers"):
        assert what in out, out
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert list(run_dir.glob("events.out.tfevents.*"))
    grids = sorted((run_dir / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_000002.png", "step_000004.png"]
    assert np.asarray(Image.open(grids[-1])).shape[0] > 2 * 64  # reference row + current row

    # the exported pipeline loads in diffusers and its UNet is the trained one
    pipe = StableDiffusionPipeline.from_pretrained(run_dir / "export", safety_checker=None)
    params, step, _, base = restore_trained_params(run_dir)
    assert step == 4
    model, ref = load_unet(base)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, 32)).astype(np.float32)
    ours = np.asarray(model.apply({"params": params}, x, np.array([500]), ctx))
    with torch.no_grad():
        theirs = pipe.unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), 500, torch.from_numpy(ctx)).sample.numpy()
    np.testing.assert_allclose(ours, theirs.transpose(0, 2, 3, 1), atol=1e-4)
    assert not np.allclose(ours, np.asarray(model.apply({"params": ref}, x, np.array([500]), ctx)))  # it trained

    # a second run resumes and reuses the records, scoring the model on world prompts at its end
    from ddspo_jax.world.__main__ import PROMPT_DIR
    lines = (PROMPT_DIR / "world_eval.jsonl").read_text().splitlines()
    (tmp_path / "eval.jsonl").write_text("\n".join(lines[:2] + lines[-2:]) + "\n")
    res = run(tmp_path, "--config.train.steps=6", f"--config.train.eval_prompts={tmp_path / 'eval.jsonl'}")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resumed" in res.stdout and "at step 4" in res.stdout and "preparing them" not in res.stdout
    assert (run_dir / "checkpoints" / "6").is_dir()
    assert "step 6: eval shapes_overall" in res.stdout and "(reference " in res.stdout, res.stdout[-2000:]
    # the logged score is what `evaluate` reports for the same model, prompts and settings (image 0, seed 0)
    import re

    from ddspo_jax import evaluate
    logged = float(re.search(r"eval shapes_overall ([0-9.]+)", res.stdout).group(1))
    assert evaluate.main(["--model", str(run_dir), "--prompts", str(tmp_path / "eval.jsonl"), "--scorer", "shapes",
                          "--steps", "2", "--out", str(tmp_path / "ev")]) == 0
    import json
    s = json.loads((tmp_path / "ev" / "summary.json").read_text())["geneval"]["models"]["model"]["overall"]
    assert abs(s - logged) < 1e-4


def test_world_default_prints_reference_vs_finetuned_table(tmp_path):
    """README's first command (configs/world.py) with small settings: records from the world's training
    captions, DDSPO on the shipped world model, the held-out table (reference vs fine-tuned) at the end."""
    from ddspo_jax.configs.world import WORLD_MODEL

    assert (WORLD_MODEL / "model_index.json").is_file(), "the shipped world model is missing"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    res = subprocess.run([sys.executable, "-m", "ddspo_jax.train", f"--config={REPO / 'configs' / 'world.py'}",
                          f"--config.output_dir={tmp_path / 'run'}", f"--config.data.records={tmp_path / 'rec'}",
                          "--config.data.prompt_limit=16", "--config.data.shard_size=8", "--config.prepare.steps=4",
                          "--config.train.batch_size=8", "--config.train.micro_batch_per_device=2",
                          "--config.train.steps=2", "--config.train.checkpoint_every=2", "--config.train.sample_every=2",
                          "--config.train.warmup_steps=1", "--config.train.eval_limit=24"],
                         capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    out = res.stdout
    assert "held-out evaluation" in out and "GenEval accuracy per tag" in out, out[-3000:]
    assert "fine-tuned" in out and "reference" in out and "overall" in out and "difference" in out
    # the end-of-run evaluation is kept in the run folder in evaluate's summary.json format, and it is the table
    import json

    s = json.loads((tmp_path / "run" / "summary.json").read_text())["geneval"]
    row = next(line for line in out.splitlines() if line.strip().startswith("overall"))
    toks = row.split()  # overall  F [lo, hi]  R [lo, hi]  D [lo, hi]
    printed = [float(toks[1]), float(toks[4])]
    assert abs(printed[0] - s["models"]["model"]["overall"]) < 6e-4, (row, s["models"])
    assert abs(printed[1] - s["models"]["compare"]["overall"]) < 6e-4, (row, s["models"])
