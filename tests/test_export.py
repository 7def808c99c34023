"""export: Orbax run folder -> diffusers pipeline that diffusers loads, UNet output equal to ours."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddspo_jax import export as ex
from ddspo_jax import checkpoint, lora
from ddspo_jax.config import base_config
from ddspo_jax.convert import load_unet
from ddspo_jax.backbones import ensure_tiny_model


def hand_merge(base, factors, alpha):
    """W + (alpha / r) A B on each factor's kernel, written out here (not lora.merge, which is under test)."""
    out = jax.tree.map(np.asarray, base)
    for name, f in factors.items():
        node = out
        for k in name.split(lora.SEP):
            node = node[k]
        a, b = np.asarray(f["a"], np.float64), np.asarray(f["b"], np.float64)
        node["kernel"] = (node["kernel"] + alpha / a.shape[1] * (a @ b)).astype(np.float32)
    return out


def fake_run(root, family, *, lora_rank=0, steps=(3, 5), mesh=None):
    """A run folder laid out exactly as train.py writes it, with perturbed UNet params (sharded on `mesh`
    when given, as a run on that mesh saves them)."""
    from ddspo_jax import parallel

    model_dir = ensure_tiny_model(root / f"tiny-{family}", family=family)
    cfg = base_config()
    cfg.model.family, cfg.model.path, cfg.model.lora_rank = family, str(model_dir), lora_rank
    cfg.output_dir = str(root / f"run-{family}-{lora_rank}")
    run = root / f"run-{family}-{lora_rank}"
    run.mkdir()
    (run / "config.json").write_text(cfg.to_json_best_effort())
    _, base = load_unet(model_dir)
    mngr = checkpoint.manager(run, cfg)
    expected = {}
    for s in steps:
        if lora_rank:
            p = lora.init(base, lora_rank, jax.random.key(s))
            p = jax.tree.map(lambda x: x + 0.01 * s, p)  # B != 0
            expected[s] = hand_merge(base, p, float(lora_rank))
        else:
            p = jax.tree.map(lambda x: x + 0.001 * s * jnp.sin(jnp.arange(x.size).reshape(x.shape)), base)
            expected[s] = p
        if mesh is not None:
            p = parallel.shard_tree(p, mesh)
        state = {"params": p, "opt_state": {}, "step": jnp.int32(s)}
        mngr.save(s, args=checkpoint.save_args(state, np.zeros(2, np.uint32), {"pos": s}), force=True)
    mngr.wait_until_finished()
    mngr.close()
    return run, model_dir, expected


def torch_vs_jax(unet_dir_or_pipe_unet, params, model, sdxl=False):
    rng = np.random.default_rng(0)
    c = model.config
    x = rng.standard_normal((2, 16, 16, c.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, c.cross_attention_dim[0])).astype(np.float32)
    t = np.array([10, 700])
    added, tadded = None, None
    if sdxl:
        te = rng.standard_normal((2, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim)).astype(np.float32)
        ti = np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (2, 1))
        added = {"text_embeds": te, "time_ids": ti}
        tadded = {"text_embeds": torch.from_numpy(te), "time_ids": torch.from_numpy(ti)}
    ours = np.asarray(model.apply({"params": params}, x, t, ctx, added_cond=added))
    with torch.no_grad():
        theirs = unet_dir_or_pipe_unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                                       torch.from_numpy(ctx), added_cond_kwargs=tadded).sample.numpy()
    np.testing.assert_allclose(ours, theirs.transpose(0, 2, 3, 1), atol=1e-4 * max(1.0, np.abs(theirs).max()))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_export_pipeline_loads_in_diffusers(tmp_path, family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    run, model_dir, expected = fake_run(tmp_path, family)
    out = ex.export(run, tmp_path / "out", log=lambda *_: None)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(out, safety_checker=None) if family == "sd" else cls.from_pretrained(out)
    model, _ = load_unet(model_dir)
    torch_vs_jax(pipe.unet, expected[5], model, sdxl=family == "sdxl")  # latest step by default
    # every component, and not the tiny model's cache marker (an export is not the tiny model)
    assert sorted(p.name for p in out.iterdir()) == sorted([ex.EXPORT_MARK] + [p.name for p in model_dir.iterdir()
                                                                               if p.name != "ddspo_tiny.json"])


def test_export_step_dtype_lora_unet_only(tmp_path):
    from diffusers import UNet2DConditionModel

    run, model_dir, expected = fake_run(tmp_path, "sd", lora_rank=2)
    out = ex.export(run, tmp_path / "u", step=3, unet_only=True, log=lambda *_: None)
    assert (out / "config.json").is_file() and not (out / "vae").exists()
    model, _ = load_unet(model_dir)
    torch_vs_jax(UNet2DConditionModel.from_pretrained(out), expected[3], model)
    half = ex.export(run, tmp_path / "h", step=5, unet_only=True, dtype="fp16", log=lambda *_: None)
    from safetensors import safe_open
    with safe_open(str(half / "diffusion_pytorch_model.safetensors"), "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    u16 = UNet2DConditionModel.from_pretrained(half, torch_dtype=torch.float16)
    assert next(u16.parameters()).dtype == torch.float16


def test_export_refuses_clearly(tmp_path, capsys):
    run, _, _ = fake_run(tmp_path, "sd")
    with pytest.raises(checkpoint.RunError, match="no checkpoint for step 4; available: 3, 5"):
        ex.export(run, tmp_path / "a", step=4)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(ex.ExportError, match="not empty"):
        ex.export(run, tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(ex.ExportError, match="not written by export"):  # --overwrite replaces only an export
        ex.export(run, tmp_path / "full", overwrite=True, log=lambda *_: None)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    empty = tmp_path / "emptyrun"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(base_config().to_dict()))
    assert ex.main(["--run", str(empty), "--out", str(tmp_path / "b")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert ex.main(["--run", str(tmp_path / "nothing"), "--out", str(tmp_path / "c")]) == 2
    assert "not a training run folder" in capsys.readouterr().err


def test_export_on_one_device_of_a_run_sharded_over_eight(tmp_path):
    """A checkpoint written by an fsdp = 8 mesh, exported by a process that has one device (params only)."""
    import os
    import subprocess
    import sys

    from diffusers import UNet2DConditionModel

    from ddspo_jax import parallel

    mesh = parallel.make_mesh(1, 8)
    run, model_dir, expected = fake_run(tmp_path, "sd", mesh=mesh)
    sharded = [x for x in jax.tree.leaves(parallel.shard_tree(expected[5], mesh)) if x.sharding.spec != ()]
    assert sharded, "nothing was sharded: the test would not test resharding"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-m", "ddspo_jax.export", "--run", str(run), "--out", str(tmp_path / "o"),
                          "--unet-only"], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    model, _ = load_unet(model_dir)
    torch_vs_jax(UNet2DConditionModel.from_pretrained(tmp_path / "o"), expected[5], model)
