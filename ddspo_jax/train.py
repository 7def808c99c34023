"""Fine-tune a diffusion model with DDSPO (or a baseline) on preference records.

  python -m ddspo_jax.train --config configs/sd15.py --config.train.beta=8000

One readable loop in banner sections: runtime and mesh -> model -> data -> optimizer and state ->
checkpoint (resume) -> step -> loop. The output folder holds `config.json`, Orbax checkpoints
(params, optimizer state, step, RNG and the Grain iterator state) under `checkpoints/`, TensorBoard
events, and sample grids. A run resumes from its latest checkpoint automatically; SIGTERM (TPU
preemption) saves before exit; a step with a NaN/inf loss or gradient is skipped on device, and
train.max_skipped_steps of them in a row stop the run (every checkpoint holds a finite state).
"""

from __future__ import annotations


import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # clu's metric writers import TensorFlow: keep it quiet

from absl import app  # noqa: E402

from ddspo_jax import checkpoint
from ddspo_jax.config import define_config_flag, learning_rate, load_config_flag
from ddspo_jax.errors import ConfigError, DataError, user_exits, UserError
from ddspo_jax.evaluate import TrainingEval
from ddspo_jax.export import export
from ddspo_jax.files import write_text_atomic
from ddspo_jax.prepare import run_prepare
from ddspo_jax.sample import contact_sheet, generate_images, save_png

from ddspo_jax.configs import path as _config_path  # noqa: E402

# The package's JAX-importing modules are imported inside the functions that use them: `--help` and a
# mistyped argument answer in ~0.4 s instead of ~4 s (JAX, Flax, Orbax start-up, measured on 2 cores);
# tests/test_structure.py checks that every function-local import is one of those.

_CONFIG = define_config_flag(str(_config_path("tiny")))

# Peak dense bf16 FLOP/s per device, for MFU (device_kind substrings).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "TPU v6": 918e12,
              "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12}


class TrainingDiverged(UserError, RuntimeError):
    """Non-finite steps in a row (the checkpoints stay finite)."""


class OutOfMemory(UserError, RuntimeError):
    """RESOURCE_EXHAUSTED, with the keys that lower the per-device memory."""


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in PEAK_FLOPS.items() if k in kind), None)


# Keys a resumed run may not change: they decide the train state's structure (model, LoRA, optimizer), what a
# step computes (objective, schedule, targets) or which pairs the restored loader position points at. Any
# other key (lr, steps, logging, evaluation, mesh, micro-batching) may change on resume; train says which did.
RESUME_FIXED = ("seed", "model.", "schedule.", "train.objective", "train.cpp", "train.cpp_pair", "train.optimizer",
                "train.batch_size", "train.share_noise", "data.records", "data.variant", "data.cond_mode",
                "data.extra_records", "data.rand_cond", "data.shuffle_seed")


def _flat_dict(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat_dict(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def check_resume(out, cfg) -> list[str]:
    """A run folder with checkpoints is resumed only by a config that keeps RESUME_FIXED: otherwise a ConfigError
    naming the changed keys (before config.json or anything else is written). Returns the other changed keys
    as 'key old -> new' for the log."""
    if not (out / "config.json").exists() or not (out / "checkpoints").exists() or not any(
            p.name.isdigit() for p in (out / "checkpoints").iterdir()):
        return []
    try:
        old = dict(_flat_dict(json.loads((out / "config.json").read_text())))
    except (ValueError, OSError) as e:
        raise ConfigError(f"{out / 'config.json'} is unreadable ({e}); it holds the config of the checkpoints "
                          "there: restore it or choose another output_dir") from None
    new = dict(_flat_dict(json.loads(cfg.to_json_best_effort())))
    changed = [k for k in sorted(set(old) | set(new)) if k != "output_dir" and old.get(k) != new.get(k)]
    fixed = [k for k in changed if any(k == f or (f.endswith(".") and k.startswith(f)) for f in RESUME_FIXED)]
    if fixed:
        what = ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in fixed[:6])
        more = f" and {len(fixed) - 6} more" if len(fixed) > 6 else ""
        raise ConfigError(f"{out} holds checkpoints of a run with other settings: {what}{more}; a resume keeps "
                          "these keys (lr, steps, logging, evaluation and the mesh may change): use the run's "
                          "values or another output_dir")
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed]


def check_records(cfg, manifest, backbone) -> None:
    """The records were made for this run's model: same family, same model folder, latents of its channels and
    of the resolution the config trains at (prepare.resolution, else the model's own). Checked before anything
    compiles: records of another model fine-tune silently or crash deep in Flax."""
    import numpy as np

    from ddspo_jax.data.loader import PairSource

    where, s = cfg.data.records, manifest.get("settings", {})
    fam = s.get("family")
    if fam and fam != backbone.family:
        raise DataError(f"{where}: records of a {fam!r} model, but model.path is a {backbone.family!r} model "
                        f"({backbone.path}); prepare records with this model or set data.records to its records")
    made_by = manifest.get("model") or s.get("model")
    if made_by and Path(made_by).resolve() != Path(backbone.path).resolve():
        raise DataError(f"{where}: records made by the model {made_by}, but model.path is {backbone.path}; "
                        "prepare records with this model (or point data.records at its records)")
    if not manifest.get("num_records"):
        return
    shape = tuple(np.shape(PairSource(where)[0]["x0_w"]))
    res = cfg.prepare.resolution or backbone.default_resolution()
    want = (res // backbone.vae_scale, res // backbone.vae_scale, backbone.latent_channels)
    if shape != want:
        raise DataError(f"{where}: latents of shape {list(shape)}, but this model at {res} px makes "
                        f"{list(want)} (prepare.resolution={cfg.prepare.resolution or 'the model default'}); "
                        "prepare records at this resolution or set prepare.resolution to theirs")


@contextlib.contextmanager
def out_of_memory_hint(cfg, mesh):
    """XLA's RESOURCE_EXHAUSTED (at compile or run time) -> one message naming the keys that lower memory."""
    import jax

    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e) and "Out of memory" not in str(e):
            raise
        asked = re.search(r"allocate ([0-9.]+[KMGT]?i?B|[0-9]+ bytes)", str(e))
        raise OutOfMemory(
            f"out of device memory{' (XLA asked for ' + asked.group(1) + ')' if asked else ''} with "
            f"train.micro_batch_per_device={cfg.train.micro_batch_per_device}, "
            f"model.remat_policy={cfg.model.remat_policy!r}, mesh.fsdp={mesh.shape['fsdp']}: lower the first, "
            "choose a stronger remat policy (dots_saveable < block < full) or shard over more devices "
            "(benchmarks/memory.py prints the per-device bytes of each choice)") from None


def compilation_cache(out) -> str | None:
    """Turns on JAX's persistent compilation cache, so a resumed or repeated run does not compile again:
    $DDSPO_JAX_CACHE/xla if that variable is set (the project's cache root, shared by runs), else
    <output_dir>/xla_cache. A cache configured for JAX directly (JAX_COMPILATION_CACHE_DIR) is left alone."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    root = os.environ.get("DDSPO_JAX_CACHE", "")
    folder = str(Path(root) / "xla") if root else str(out / "xla_cache")
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder


def open_records(cfg, mesh, backbone, main_process, log):
    """(manifest, loader, micro-batches per step, pairs per micro-batch): the records checked against the
    model (prepared first when absent and data.prompts names prompts), and this process's loader."""
    import jax

    from ddspo_jax import parallel
    from ddspo_jax import step as step_lib
    from ddspo_jax.data.loader import PairLoader
    from ddspo_jax.data.records import read_manifest

    if not (Path(cfg.data.records) / "manifest.json").is_file() and cfg.data.prompts:
        log(f"no preference records in {cfg.data.records}: preparing them from {cfg.data.prompts} "
            "(what `python -m ddspo_jax.prepare` does)")

        run_prepare(cfg, progress=main_process)
    manifest = read_manifest(cfg.data.records)  # clear error (with how to create it) when missing
    check_records(cfg, manifest, backbone)
    n_proc = jax.process_count()
    k, micro = step_lib.micro_batching(cfg, mesh)
    if micro % n_proc:
        raise ConfigError(f"a micro-batch of {micro} pairs is not divisible by the {n_proc} processes")
    # The loader yields micro-batches (only one is on device at a time); each process reads only the contiguous
    # block of every micro-batch that its devices hold, so the global batch (and the result) is the same for
    # any process count and any micro-batch split.
    if cfg.data.rand_cond != "none" and not cfg.data.extra_records:
        raise ConfigError(f"data.rand_cond={cfg.data.rand_cond!r} needs data.extra_records (records of extra prompts)")
    block, blocks = parallel.process_batch_block(mesh, micro)
    loader = PairLoader(cfg.data.records, batch_size=micro // n_proc, seed=cfg.data.shuffle_seed,
                        variant=cfg.data.variant, worker_count=cfg.data.worker_count, process_index=block,
                        process_count=blocks, extra_dir=cfg.data.extra_records or None)
    return manifest, loader, k, micro


def write_run_config(out, cfg) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.json", cfg.to_json_best_effort(indent=2) + "\n")  # export reads it
    except OSError as e:
        raise ConfigError(f"output_dir {out} cannot be written ({e.strerror or e}); choose another "
                          "config.output_dir") from None


class Checkpoints:
    """The run's checkpoints with train's guarantees: a state is saved only if its weights are finite, and
    too many skipped (non-finite) steps in a row stop the run naming the last good checkpoint."""

    def __init__(self, cfg, out):
        import jax
        import jax.numpy as jnp


        self.cfg, self.out, self.mngr = cfg, out, checkpoint.manager(out, cfg)
        self.all_finite = jax.jit(lambda p: jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p)])))

    def latest(self):
        return self.mngr.latest_step()

    def restore(self, step, state, loader):
        """(state, rng) of `step`, laid out like `state`; the loader is moved to where that step left it."""
        import jax
        import numpy as np


        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = checkpoint.restore(self.mngr, step, abstract)
        loader.set_state(restored["loader"])
        return restored["state"], np.asarray(restored["rng"])

    def _diverged(self, what):
        return TrainingDiverged(f"{what}; the last checkpoint ({self.out / 'checkpoints'}, step {self.latest()}) "
                                "holds a finite state. Lower train.lr or train.beta and resume.")

    def check_finite(self, state, step_no) -> int:
        """Reads the on-device skip counters (before each save and log): the state itself is always finite."""
        import jax

        bad, skipped = (int(x) for x in jax.device_get((state["bad_run"], state["skipped"])))
        if bad >= self.cfg.train.max_skipped_steps:
            raise self._diverged(f"the last {bad} steps (to step {step_no}) had a non-finite loss or gradient and "
                                 f"were skipped ({skipped} in all)")
        return skipped

    def save(self, step_no, state, rng, loader) -> None:
        import jax
        import numpy as np


        self.check_finite(state, step_no)
        if not bool(jax.device_get(self.all_finite(state["params"]))):  # finite loss and gradients, yet the
            raise self._diverged(f"step {step_no} left non-finite weights (the update overflowed); they were "  # update
                                 "not saved")  # overflowed: never a checkpoint of non-finite weights
        self.mngr.save(step_no, args=checkpoint.save_args(state, np.asarray(rng), loader.get_state()), force=True)


def compile_step(train_step, cfg, mesh, args, k, barrier, cache, log):
    """(grad_fn, update_fn, FLOPs per step from XLA's cost analysis): the step compiled ahead of time."""
    import time as _time

    import jax.numpy as jnp

    from ddspo_jax import parallel

    acc, state, ref_params, mb, key = args
    with out_of_memory_hint(cfg, mesh):
        tc = _time.time()
        grad_fn = train_step.grad.lower(acc, state["params"], ref_params, mb, key, state["step"], jnp.int32(0)).compile()
        update_fn = train_step.update.lower(state, acc).compile()
        log(f"compiled the step in {_time.time() - tc:.1f} s" + (f" (cache: {cache})" if cache else ""))
        parallel.barrier(barrier)  # the first step's collectives start together
    cost = grad_fn.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return grad_fn, update_fn, float((cost or {}).get("flops", 0.0)) * k or None


class StepLog:
    """Every train.log_every steps: the step's metrics, lr, step time, pairs/s and MFU to TensorBoard and the
    progress bar; a skipped step is said once."""

    def __init__(self, cfg, writer, bar, lr_schedule, start, log):
        self.cfg, self.writer, self.bar, self.lr_schedule, self.log = cfg, writer, bar, lr_schedule, log
        self.start, self.t_last, self.pairs_last, self.skipped_seen = start, time.time(), 0, 0
        self.flops = self.peak = None
        self.last: dict = {}

    def set_flops(self, flops, mesh):
        import jax

        peak = peak_flops(jax.devices()[0])
        self.flops, self.peak = flops, (peak * mesh.size if (peak and flops) else None)

    def __call__(self, step_no, metrics, step_time, skipped):
        if skipped > self.skipped_seen:
            self.log(f"step {step_no}: non-finite loss or gradient, update skipped ({skipped} so far)")
            self.skipped_seen = skipped
        now, pairs = time.time(), (step_no - self.start) * self.cfg.train.batch_size
        scalars = {k: float(v) for k, v in metrics.items()}
        scalars.update(lr=float(self.lr_schedule(step_no - 1)), step_time_s=step_time,
                       pairs_per_s=(pairs - self.pairs_last) / max(now - self.t_last, 1e-9))
        if self.flops and self.peak:
            scalars["mfu"] = self.flops / max(step_time, 1e-9) / self.peak
        self.writer.write_scalars(step_no, scalars)
        self.last, self.t_last, self.pairs_last = scalars, now, pairs
        self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", **({"acc": f"{scalars['implicit_acc']:.2f}"}
                                                                if "implicit_acc" in scalars else {}))


def train(cfg, *, log=print) -> dict:
    """Runs (or resumes) the configured fine-tune; returns a summary dict."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from clu import metric_writers
    from etils import epath
    from tqdm import tqdm

    from ddspo_jax import parallel, trainable
    from ddspo_jax import step as step_lib
    from ddspo_jax.backbones import load_backbone

    # ---------------------------------------------------------------------------- runtime and mesh
    parallel.maybe_initialize_distributed(cfg.runtime.coordinator, cfg.runtime.num_processes, cfg.runtime.process_id)
    main_process = jax.process_index() == 0
    if not main_process:  # logs, tqdm, TensorBoard events and config.json come from process 0 only
        log = lambda *a, **k: None  # noqa: E731
    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    out = epath.Path(cfg.output_dir)  # local or gs://: Orbax, TensorBoard and this code all write through it
    accepted = check_resume(out, cfg)  # before anything is written: a refused resume leaves the run as it was
    if accepted:
        log("resuming with changed keys: " + ", ".join(accepted))

    # ---------------------------------------------------------------------------------- model
    backbone = load_backbone(cfg.model, cfg.schedule, text=False, vae=False, log=log)

    # ----------------------------------------------------------------------------------- data
    manifest, loader, k, micro = open_records(cfg, mesh, backbone, main_process, log)

    if main_process:  # after every check of the model and data: a refused run writes nothing
        write_run_config(out, cfg)

    # ------------------------------------------------------------------ optimizer and train state
    lr = learning_rate(cfg)
    optimizer, lr_schedule = step_lib.make_optimizer(cfg, lr)
    model = trainable.build(cfg, backbone, mesh, manifest, log)
    ref_params, to_unet_params = model.ref_params, model.to_unet_params
    trainable_shape = jax.eval_shape(lambda: model.params)
    state = step_lib.create_state(model.params, optimizer, mesh)
    model.params = None  # the state holds them now
    rng = jax.random.key_data(jax.random.key(cfg.seed))

    # ------------------------------------------------------------------------- checkpoint / resume
    ckpt = Checkpoints(cfg, out)
    start = ckpt.latest()
    if start is not None:
        state, rng = ckpt.restore(start, state, loader)
        log(f"resumed from {out / 'checkpoints'} at step {start}")
    start = start or 0

    # ----------------------------------------------------------------------------------- step
    cache = compilation_cache(out)
    train_step = step_lib.make_train_step(model.denoise_ref, backbone.schedule, cfg, mesh, optimizer, trainable_shape,
                                          ref_shape=jax.eval_shape(lambda: ref_params), model_apply=model.model_apply)
    # From host data: device_put of a process-local jax Array onto a mesh spanning processes is refused.
    key = jax.random.wrap_key_data(jax.device_put(np.asarray(rng), parallel.NamedSharding(mesh, parallel.P())))
    if k > 1:
        log(f"{cfg.train.batch_size} pairs per step = {k} micro-batches of {micro} "
            f"({cfg.train.micro_batch_per_device} per device)")

    stop = {"signal": None}

    def on_sigterm(signum, frame):
        stop["signal"] = signum
    previous = signal.signal(signal.SIGTERM, on_sigterm)

    writer = metric_writers.create_default_writer(str(out), just_logging=not main_process, asynchronous=True)
    if start == 0:
        writer.write_hparams({k: v for k, v in _flat_hparams(cfg).items()})

    grid = SampleGrid(cfg, backbone, mesh, out, writer, log) if cfg.train.sample_every >= 0 else None
    evaluator = None
    if cfg.train.eval_prompts:

        evaluator = TrainingEval(cfg, backbone, mesh, writer, log)

    # ----------------------------------------------------------------------------------- loop
    grad_fn = update_fn = flops = acc = None
    bar = tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step", disable=not main_process,
               dynamic_ncols=True)
    steplog = StepLog(cfg, writer, bar, lr_schedule, start, log)
    step_no, last_eval = start, None
    try:
        while step_no < cfg.train.steps:
            t0 = time.time()
            for j in range(k):  # one micro-batch on device at a time; the next one is read while this one runs
                mb = parallel.put_batch({n: v for n, v in next(loader).items() if n in step_lib.step_keys(cfg)}, mesh)
                if grad_fn is None:  # compile once (persistent cache); FLOPs from XLA's cost analysis
                    acc = train_step.zeros()
                    grad_fn, update_fn, flops = compile_step(train_step, cfg, mesh, (acc, state, ref_params, mb, key),
                                                             k, f"compiled-{start}", cache, log)
                    steplog.set_flops(flops, mesh)
                with out_of_memory_hint(cfg, mesh):
                    acc = grad_fn(acc, state["params"], ref_params, mb, key, state["step"], jnp.int32(j))
                if j + 1 < k:
                    jax.block_until_ready(acc)  # bounds the device queue: the next micro-batch is not put early
            state, metrics = update_fn(state, acc)  # acc stays: the next first micro-batch overwrites it
            step_no += 1
            if step_no % cfg.train.log_every == 0 or step_no == cfg.train.steps:
                steplog(step_no, jax.device_get(metrics), time.time() - t0, ckpt.check_finite(state, step_no))
            bar.update(1)
            if step_no % cfg.train.checkpoint_every == 0 or step_no == cfg.train.steps:
                ckpt.save(step_no, state, rng, loader)
            if grid is not None and (step_no == cfg.train.steps or
                                     (cfg.train.sample_every > 0 and step_no % cfg.train.sample_every == 0)):
                grid(step_no, ref_params["unet"], to_unet_params(state["params"], ref_params))
            if evaluator is not None and (step_no == cfg.train.steps or
                                          (cfg.train.eval_every > 0 and step_no % cfg.train.eval_every == 0)):
                summary_eval = evaluator(step_no, ref_params["unet"], to_unet_params(state["params"], ref_params))
                if summary_eval is not None:
                    last_eval = summary_eval
            if stop["signal"] is not None:
                ckpt.save(step_no, state, rng, loader)
                ckpt.mngr.wait_until_finished()
                log(f"received signal {stop['signal']}: saved step {step_no} to {out / 'checkpoints'}; exiting")
                sys.exit(128 + stop["signal"])
    finally:
        bar.close()
        signal.signal(signal.SIGTERM, previous)
        ckpt.mngr.wait_until_finished()
        writer.flush()
        loader.close()
    eval_summary = evaluator.summary(step_no) if evaluator is not None and main_process else None
    if eval_summary is not None:  # the end-of-run evaluation is kept, not only printed
        write_text_atomic(out / "summary.json", json.dumps(eval_summary, indent=1) + "\n")
    summary = {"steps": step_no, "resumed_from": start, "output_dir": str(out), "eval": last_eval,
               "metrics": steplog.last,
               "eval_reference": evaluator.reference if evaluator is not None else None,
               "checkpoint": str(out / "checkpoints" / str(ckpt.latest())), "flops_per_step": flops,
               "params": state["params"], "records": str(cfg.data.records),
               "samples": str(out / "samples") if grid is not None and grid.written else None, "export": None,
               "pipeline": backbone.pipeline_class, "eval_table": evaluator.table() if evaluator is not None else None}
    ckpt.mngr.close()
    if cfg.train.export_at_end:  # every process takes part in the restore; process 0 writes

        parallel.barrier("export")  # process 0 may still be writing grids or evaluating
        path = export(out, out / "export", overwrite=True, log=log)
        summary["export"] = str(path) if main_process else None
    return summary


class SampleGrid:
    """Ref-vs-current images for fixed prompts and seeds: the first thing users look at.

    Row 1 is the frozen reference, row 2 the model being trained, same prompts and initial noise; written as
    a TensorBoard image and as samples/step_<N>.png. Single-process runs only (for now)."""

    def __init__(self, cfg, backbone, mesh, out, writer, log):
        self.cfg, self.bb, self.mesh, self.out, self.writer, self.log = cfg, backbone, mesh, out, writer, log
        self.gen = self.ref_images = None
        self.written = self.disabled = False

    def __call__(self, step_no, ref_params, params):
        import jax

        if self.disabled:
            return
        from ddspo_jax import sampling

        if jax.process_count() > 1:
            if not self.written:
                self.log("sample grids are not written in multi-process runs yet")
                self.written = True
            return
        prompts = list(self.cfg.train.sample_prompts)
        if self.gen is None:
            from ddspo_jax.backbones.text import MissingComponentError

            try:
                self.bb.load_extras(text=True, vae=True)
            except MissingComponentError as e:  # e.g. a UNet-only model folder: train on, without grids
                self.log(f"no sample grids: {e}")
                self.disabled = True
                return
            from ddspo_jax.backbones import generation_settings

            settings = generation_settings(self.bb, sampler=self.cfg.prepare.sampler,
                                                    steps=self.cfg.prepare.steps, guidance=self.cfg.prepare.guidance,
                                                    resolution=self.cfg.prepare.resolution, seed=self.cfg.seed)
            self.gen = sampling.Generator(self.bb, settings, self.mesh)
            self.ref_images = generate_images(self.bb, self.gen, sampling.replicate(ref_params, self.mesh), prompts,
                                              range(len(prompts)))
        cur = generate_images(self.bb, self.gen, sampling.replicate(params, self.mesh), prompts, range(len(prompts)))
        sheet = contact_sheet([self.ref_images, cur])
        self.writer.write_images(step_no, {"samples/reference_vs_current": sheet[None]})
        folder = self.out / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        save_png(sheet, folder / f"step_{step_no:06d}.png")
        self.written = True


def _flat_hparams(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        if hasattr(v, "items"):
            out.update(_flat_hparams(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's per-save notices drown the progress bar
    logging.getLogger("jax").setLevel(logging.WARNING)  # backend probing notices
    from ddspo_jax.parallel import cpu_host_setup

    cpu_host_setup()  # before JAX starts its backends

    with user_exits():  # a user mistake or a diverged run: one clear line (DDSPO_DEBUG=1 for the traceback)
        cfg = load_config_flag(_CONFIG.value)
        summary = train(cfg)
    import jax

    if jax.process_index() != 0:
        return
    lines = [f"done: {summary['steps']} steps (resumed from {summary['resumed_from']})" if summary["resumed_from"]
             else f"done: {summary['steps']} steps",
             f"  records      {summary['records']}",
             f"  checkpoints  {summary['output_dir']}/checkpoints (latest: {summary['checkpoint']})",
             f"  TensorBoard  tensorboard --logdir {summary['output_dir']}"]
    if summary["samples"]:
        lines.append(f"  samples      {summary['samples']} (top row: reference, bottom: fine-tuned)")
    if summary["export"]:
        lines.append(f"  diffusers    {summary['export']} ({summary.get('pipeline') or 'diffusers'}.from_pretrained)")
    if summary.get("eval_table"):
        lines += [f"held-out evaluation ({cfg.train.eval_prompts}, one image per prompt, seed {cfg.seed}):",
                  summary["eval_table"]]
    print("\n".join(lines))


if __name__ == "__main__":
    app.run(main)
