"""train.py end to end on a tiny diffusers UNet and tiny records: checkpoints, events, resume,
SIGKILL + resume bit-identical, SIGTERM save, NaN stop."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ddspo_jax.data import records as R

UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import torch
    from diffusers import UNet2DConditionModel

    root = tmp_path_factory.mktemp("train_assets")
    torch.manual_seed(0)
    UNet2DConditionModel(**UNET).save_pretrained(root / "model" / "unet")
    rng = np.random.default_rng(0)
    shards = []
    plan = R.plan_shards(24, 8)
    for shard, a, b in plan:
        with R.ShardWriter(root / "records" / R.shard_name(shard, len(plan))) as w:
            for i in range(a, b):
                cond = lambda: {"prompt_embeds": rng.standard_normal((6, 16)).astype(np.float32)}
                w.write(R.PairRecord(index=i, prompt=f"p{i}", neg_prompt=f"n{i}", cond=cond(), neg_cond=cond(),
                                     x0_w=rng.standard_normal((8, 8, 4)).astype(np.float32),
                                     x0_l=rng.standard_normal((8, 8, 4)).astype(np.float32)))
        shards.append(w.entry)
    R.write_manifest(root / "records", shards=shards, kind="pairs", model=str(root / "model"))
    return root


def write_config(path: Path, assets: Path, out: Path, **over):
    lines = "\n".join(f"    c.{k} = {v!r}" for k, v in over.items())
    path.write_text(textwrap.dedent(f"""\
        from ddspo_jax.config import base_config
        def get_config():
            c = base_config()
            c.model.path = {str(assets / 'model')!r}
            c.model.dtype = "float32"
            c.data.records = {str(assets / 'records')!r}
            c.output_dir = {str(out)!r}
            c.train.batch_size = 8
            c.train.micro_batch_per_device = 1
            c.train.beta = 500.0
            c.train.lr = 1e-4
            c.train.warmup_steps = 2
            c.train.steps = 6
            c.train.checkpoint_every = 2
        """) + lines + "\n    return c\n")
    return path


_XLA_CACHE: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def shared_xla_cache(tmp_path_factory):
    _XLA_CACHE[:] = [str(tmp_path_factory.mktemp("xla_cache"))]
    yield
    _XLA_CACHE.clear()


def train_env() -> dict:
    """4 host devices and one persistent XLA cache for every run of this module (per test worker): the
    programs are the same tiny step, so only the first run compiles (a resumed run compiles again otherwise;
    a cached executable is the same executable, so the bit-identity checks are unchanged)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    if _XLA_CACHE:  # set by this module's fixture; modules importing run_train (test_multiprocess) go without
        env["DDSPO_JAX_CACHE"] = _XLA_CACHE[0]
    return env


def run_train(cfg_file, *extra, timeout=600):
    env = train_env()
    return subprocess.run([sys.executable, "-m", "ddspo_jax.train", f"--config={cfg_file}", *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


def final_params(out: Path, step: int):
    import orbax.checkpoint as ocp

    ckpt = ocp.StandardCheckpointer()
    return ckpt.restore((out / "checkpoints" / str(step) / "params").absolute())


def test_train_checkpoints_events_and_resume(assets, tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.py", assets, out, **{"train.steps": 4})
    res = run_train(cfg)
    assert res.returncode == 0, res.stderr[-4000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard events"
    assert "loss" in res.stdout + res.stderr
    res = run_train(cfg, "--config.train.steps=6")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resumed" in res.stdout and "at step 4" in res.stdout
    assert (out / "checkpoints" / "6").is_dir()


def test_sigkill_resume_is_bit_identical(assets, tmp_path):
    ref_out = tmp_path / "uninterrupted"
    cfg = write_config(tmp_path / "a.py", assets, ref_out)
    assert run_train(cfg).returncode == 0

    out = tmp_path / "killed"
    cfg2 = write_config(tmp_path / "b.py", assets, out)
    env = train_env()
    proc = subprocess.Popen([sys.executable, "-m", "ddspo_jax.train", f"--config={cfg2}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "2").is_dir():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert done and done[-1] < 6, f"killed too late to test anything: {done}"
    res = run_train(cfg2)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resumed" in res.stdout
    a, b = final_params(ref_out, 6), final_params(out, 6)
    import jax
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_sigterm_saves_before_exit(assets, tmp_path):
    out = tmp_path / "term"
    cfg = write_config(tmp_path / "c.py", assets, out, **{"train.steps": 100000, "train.checkpoint_every": 100000})
    env = train_env()
    proc = subprocess.Popen([sys.executable, "-m", "ddspo_jax.train", f"--config={cfg}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    for line in proc.stdout:  # wait for the first logged step
        if "loss" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == 128 + signal.SIGTERM, rest[-3000:]
    assert "received signal" in rest
    saved = [p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and int(saved[0]) >= 1


def test_nan_stops_and_keeps_last_good_checkpoint(assets, tmp_path):
    out = tmp_path / "nan"
    cfg = write_config(tmp_path / "d.py", assets, out, **{"train.beta": 3e38, "train.warmup_steps": 0,
                                                           "train.grad_clip": 0.0, "train.steps": 8,
                                                           "train.checkpoint_every": 1})
    res = run_train(cfg)
    assert res.returncode != 0
    # non-finite steps are skipped on device; after train.max_skipped_steps (3) in a row the run stops
    assert "non-finite loss or gradient and were skipped" in res.stderr and "holds a finite state" in res.stderr
    assert "Traceback" not in res.stderr
    saved = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert saved, "no checkpoint was kept"
    import jax
    for step in saved:  # every checkpoint written, including those after the first bad step, is finite
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(final_params(out, step))), step


def test_nonfinite_weights_are_never_saved(assets, tmp_path, monkeypatch):
    """Fault injection: an update that overflows the weights while loss and gradients stay finite. The run
    stops naming the last finite checkpoint and writes no checkpoint of the broken weights."""
    import runpy

    import jax
    import jax.numpy as jnp
    import optax

    from ddspo_jax import step as step_lib
    from ddspo_jax import train
    from ddspo_jax.config import validate

    overflow = optax.GradientTransformation(lambda p: optax.EmptyState(),
                                            lambda g, s, p=None: (jax.tree.map(lambda x: jnp.full_like(x, jnp.inf), g), s))
    monkeypatch.setattr(step_lib, "make_optimizer", lambda cfg, lr: (overflow, lambda i: lr))
    out = tmp_path / "overflow"
    cfg = validate(runpy.run_path(str(write_config(tmp_path / "o.py", assets, out, **{"train.steps": 4})))["get_config"]())
    with pytest.raises(train.TrainingDiverged, match="non-finite weights.*were not saved.*step None"):
        train.train(cfg, log=lambda *a: None)
    assert not any(p.name.isdigit() for p in (out / "checkpoints").iterdir())


def test_missing_records_explains(assets, tmp_path):
    cfg = write_config(tmp_path / "e.py", assets, tmp_path / "x", **{"data.records": str(tmp_path / "none")})
    res = run_train(cfg)
    assert res.returncode != 0
    assert "ddspo_jax.prepare" in res.stderr


def test_out_of_memory_names_the_keys():
    """XLA's RESOURCE_EXHAUSTED becomes one user error naming the three keys and the bytes asked for."""
    import jax
    import pytest

    from ddspo_jax import parallel
    from ddspo_jax.config import base_config
    from ddspo_jax.errors import UserError
    from ddspo_jax.train import out_of_memory_hint

    cfg = base_config()
    cfg.train.micro_batch_per_device, cfg.model.remat_policy = 8, "none"
    mesh = parallel.make_mesh(2, 4)
    with pytest.raises(UserError) as e:
        with out_of_memory_hint(cfg, mesh):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                             "82.50GiB.")
    msg = str(e.value)
    for part in ("train.micro_batch_per_device=8", "model.remat_policy='none'", "mesh.fsdp=4", "82.50GiB"):
        assert part in msg, msg
    with pytest.raises(jax.errors.JaxRuntimeError):  # other runtime errors are bugs: untouched
        with out_of_memory_hint(cfg, mesh):
            raise jax.errors.JaxRuntimeError("INTERNAL: something else")
