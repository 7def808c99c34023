"""The run folder: what `train` writes and `export`, `sample`, `evaluate` and DD-CPP read.

  <output_dir>/config.json               the run's resolved config (written once the model and data checked out)
  <output_dir>/checkpoints/<step>/       Orbax: `params` (the trainable tree: a denoiser or LoRA factors, alone so
                                         readers restore only it), `train` (optimizer state, step, skip counters),
                                         `rng`, `loader` (the Grain iterator position)

One room for the format, so a reader never imports a command to read a checkpoint. Reads reshard: a checkpoint
written on any mesh and process count restores onto this host's devices.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ddspo_jax.errors import UserError

# The package's JAX-importing modules are imported inside the functions that use them: `--help` and a
# mistyped argument answer in ~0.4 s instead of ~4 s (JAX, Flax, Orbax start-up, measured on 2 cores);
# tests/test_structure.py checks that every function-local import is one of those.

CHECKPOINTS = "checkpoints"


class RunError(UserError, RuntimeError):
    """A run folder that is not one, or lacks the step asked for."""


# --------------------------------------------------------------------------------------------- writing


def manager(out, cfg):
    """The run's Orbax CheckpointManager (asynchronous saves, train.keep_checkpoints kept; local or gs://)."""
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=cfg.train.keep_checkpoints, enable_async_checkpointing=True,
                                        create=True)
    path = out / CHECKPOINTS
    return ocp.CheckpointManager(path if str(path).startswith("gs://") else path.absolute(), options=opts)


def save_args(state, rng, loader_state):
    """The checkpoint's items: `params` on its own (export and sampling restore only it), the rest of the
    train state, the RNG key and the Grain iterator state."""
    import orbax.checkpoint as ocp

    rest = {k: v for k, v in state.items() if k != "params"}
    return ocp.args.Composite(params=ocp.args.StandardSave(state["params"]), train=ocp.args.StandardSave(rest),
                              rng=ocp.args.ArraySave(rng), loader=ocp.args.JsonSave(loader_state))


def restore(mngr, step, abstract_state):
    """The whole train state at `step`, laid out as `abstract_state` says (shardings included)."""
    import orbax.checkpoint as ocp

    rest = {k: v for k, v in abstract_state.items() if k != "params"}
    out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_state["params"]),
                                                     train=ocp.args.StandardRestore(rest),
                                                     rng=ocp.args.ArrayRestore(), loader=ocp.args.JsonRestore()))
    return {"state": {"params": out["params"], **out["train"]}, "rng": out["rng"], "loader": out["loader"]}


# --------------------------------------------------------------------------------------------- reading


def is_run(path: Path) -> bool:
    return (Path(path) / "config.json").is_file() and (Path(path) / CHECKPOINTS).is_dir()


def run_config(run: Path) -> dict:
    path = Path(run) / "config.json"
    if not path.is_file():
        raise RunError(f"{run} is not a training run folder: it has no config.json "
                       "(python -m ddspo_jax.train writes one into its output_dir)")
    return json.loads(path.read_text())


def steps(run: Path) -> list[int]:
    ckpts = Path(run) / CHECKPOINTS
    found = sorted(int(p.name) for p in ckpts.iterdir() if p.is_dir() and p.name.isdigit()) if ckpts.is_dir() else []
    if not found:
        raise RunError(f"{run} has no checkpoint under {ckpts} (train saves every train.checkpoint_every "
                       "steps and at the end)")
    return found


def restore_params(path: Path):
    """The `params` item of a checkpoint as numpy, onto this host's first device, whatever mesh or process
    count wrote it (Orbax reshards on read; only the params are read, not the optimizer state)."""
    import jax
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    if not path.is_dir():
        raise RunError(f"{path.parent} holds no params item (a checkpoint written by an older version?)")
    meta = ckptr.metadata(path.absolute()).item_metadata.tree
    dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=dev), meta)
    return jax.tree.map(np.asarray, ckptr.restore(path.absolute(), abstract))


def restore_checkpoint_params(run: Path, step: int | None = None):
    """(the checkpoint's trainable params as numpy: a denoiser tree or LoRA factors, step, run config)."""
    run = Path(run)
    cfg = run_config(run)
    found = steps(run)
    if step is None:
        step = found[-1]
    elif step not in found:
        raise RunError(f"{run} has no checkpoint for step {step}; available: {', '.join(map(str, found))}")
    return restore_params(run / CHECKPOINTS / str(step) / "params"), step, cfg


def lora_alpha(cfg: dict) -> float:
    return float(cfg["model"].get("lora_alpha") or cfg["model"]["lora_rank"])


def base_folder(cfg: dict) -> Path:
    """The run's base model folder (config.model.path resolved: a folder, or "tiny[:...]")."""
    from ddspo_jax.backbones import resolve_path

    return resolve_path(cfg["model"]["path"], cfg["model"].get("family", ""))


def base_family(base: Path):
    """The Backbone class of a run's base model folder."""
    from ddspo_jax.backbones import detect_family, family_class

    return family_class(detect_family(base))


def merge_trained(params, cfg: dict, base: Path, adapter: str = "w"):
    """A checkpoint's trainable params -> the trained denoiser's params (numpy): LoRA factors merged into the
    base (an sft_pair run: its `adapter`, "w" the winning or "l" the losing one). Host only: no collectives."""
    import jax

    from ddspo_jax import lora

    if cfg["model"].get("lora_rank", 0) <= 0:
        return params
    if cfg["train"].get("objective") == "sft_pair":
        params = params[adapter]
    _, base_params = base_family(base).load_denoiser(base, np.float32, np.float32)
    return jax.tree.map(np.asarray, lora.merge(base_params, params, lora_alpha(cfg)))


def restore_trained_params(run: Path, step: int | None = None, adapter: str = "w"):
    """(params of the trained denoiser as numpy, step, run config, base folder); LoRA factors merged in."""
    params, step, cfg = restore_checkpoint_params(run, step)
    base = base_folder(cfg)
    return merge_trained(params, cfg, base, adapter), step, cfg, base
