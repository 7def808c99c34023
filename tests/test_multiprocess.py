"""A real two-process run on one machine: `python -m ddspo_jax.train` twice on 127.0.0.1 through
jax.distributed (CPU collectives over gloo), 2 CPU devices per process and one mesh over all 4, a few
steps, a collective Orbax checkpoint, a resume, and the final parameters equal to a single-process run on
4 devices with the same config."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddspo_jax.config import SCHEMA
from test_train import assets, run_train, write_config  # noqa: F401  (assets: fixture)

CFG = {"train.steps": 4, "train.checkpoint_every": 2}
# Sample grids need a text encoder and a VAE, which the tiny test model has not; the end-of-run export
# (every process restores, process 0 writes) runs.
CFG.update({k: v for k, v in {"train.sample_every": -1}.items() if k in SCHEMA})
CASES = {
    # fsdp=4: parameters and optimizer state sharded across both processes (cross-process all-gather,
    # reduce-scatter, and a checkpoint written by both); the batch split over all 4 devices.
    "full-fsdp4": {"mesh.data": 1, "mesh.fsdp": 4},
    # data=2 across the processes, fsdp=2 inside each; LoRA factors (made by jax.random on one device)
    # placed on a mesh that spans processes.
    "lora-data2xfsdp2": {"mesh.data": 2, "mesh.fsdp": 2, "model.lora_rank": 2},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(cfg_file: Path, *extra, timeout=900):
    """Both processes of one run; returns [(returncode, stdout, stderr)] for process 0 and 1."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COORDINATOR", "SLURM_", "TPU_", "MEGASCALE_"))}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    coord = f"127.0.0.1:{free_port()}"
    logs = cfg_file.parent / f"{cfg_file.stem}-{free_port()}"  # files, not pipes: a full pipe would stall
    logs.mkdir()  # one process while the other waits for it in a collective
    procs = []
    try:
        for i in range(2):
            with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "ddspo_jax.train", f"--config={cfg_file}",
                     f"--config.runtime.coordinator={coord}", "--config.runtime.num_processes=2",
                     f"--config.runtime.process_id={i}", *extra], env=env, stdout=out, stderr=err))
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:  # one process failing leaves the other waiting in a collective
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text())
            for i, p in enumerate(procs)]


def _check(results):
    for i, (rc, out, err) in enumerate(results):
        assert rc == 0, f"process {i} exited {rc}:\n{out[-2000:]}\n{err[-6000:]}"


def saved_state(out: Path, step: int):
    """The whole train state of a checkpoint on this process's first device, whatever mesh saved it (the
    two-process checkpoint names devices this process does not have, so no saved sharding is reused)."""
    import jax
    import orbax.checkpoint as ocp

    ckpt = ocp.StandardCheckpointer()
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = {}
    for item in ("params", "train"):
        path = (out / "checkpoints" / str(step) / item).absolute()
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev),
                              ckpt.metadata(path).item_metadata.tree)
        tree = ckpt.restore(path, target)
        state.update({"params": tree} if item == "params" else tree)
    return state


def max_abs_diff(a, b) -> float:
    import jax

    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)),
                                                   initial=0.0)), a, b)
    return max(jax.tree.leaves(diffs))


@pytest.mark.slow  # ~5 min per case on 2 shared cores: 5 training processes
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_checkpoint_resume_equal_single_process(assets, tmp_path, case):  # noqa: F811
    import jax

    over = {**CFG, **CASES[case]}
    single = tmp_path / "single"
    res = run_train(write_config(tmp_path / "single.py", assets, single, **over))
    assert res.returncode == 0, res.stderr[-4000:]

    multi = tmp_path / "multi"
    cfg = write_config(tmp_path / "multi.py", assets, multi, **over)
    first = run_two_processes(cfg, "--config.train.steps=2")
    _check(first)
    assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    assert "distributed" not in first[1][1] and "loss" not in first[1][1] + first[1][2], \
        "process 1 logged (only process 0 should)"

    second = run_two_processes(cfg)  # resumes from step 2 to the config's 4 steps
    _check(second)
    assert "resumed" in second[0][1] and "at step 2" in second[0][1], second[0][1][-2000:]
    assert "at step 2" not in second[1][1], "process 1 logged (only process 0 should)"
    assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert (multi / "config.json").is_file()
    assert (multi / "export" / "unet" / "config.json").is_file(), "the multi-process export did not complete"
    assert len(list(multi.glob("events.out.tfevents.*"))) == 2, "TensorBoard events from process 1"

    for step in (2, 4):  # params and optimizer state
        a, b = saved_state(single, step), saved_state(multi, step)
        assert jax.tree.structure(a) == jax.tree.structure(b)
        assert int(a["step"]) == int(b["step"]) == step
        diff = max_abs_diff(a, b)
        print(f"{case} step {step}: max |single - two-process| over the train state = {diff:.3g}")
        # Same global batches, same per-pair noise and the same mesh: only the order of cross-process
        # reductions (gloo vs in-process) may differ.
        assert diff <= 1e-6, f"step {step}: two-process params differ from single-process by {diff}"
