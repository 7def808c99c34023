"""Per-device memory of the real SD-1.5 and SDXL train steps, from XLA's own buffer assignment.

  python benchmarks/memory.py                 # CPU: 8 host devices, both models, the full table (hours on 2 cores)
  python benchmarks/memory.py --quick         # micro-batch 1 only (~45 min: one SDXL compile takes 11-15 min)
  python benchmarks/memory.py --gpu           # the same table on the accelerator's own devices

The UNets are built from their diffusers config JSONs (ddspo_jax/models/configs) with abstract inputs only
(`jax.eval_shape`: no weights are made); the project's step (`step.make_train_step`, bf16 compute, float32
master weights, the frozen reference in bf16, DDSPO's three reference forwards) is lowered and compiled for
one device, for 8 devices with fsdp = 8 and for 8 devices with data = 8, at micro_batch_per_device in
{1, 2, 4, 8}, and `compiled.memory_analysis()` of the gradient and the update programs is read.

Per device:
  resident = params (f32) + reference (bf16) + optimizer state + gradient accumulator (f32), each its fsdp
             shard (exact, from the shardings; cross-checked against XLA's argument sizes);
  peak     = resident + max(micro-batch + temp of the gradient program, temp of the update program)
             (outputs alias the donated inputs);
  temp     = XLA's temporaries: activations kept for the backward pass, gathered block weights, workspace.
The analytic column is params x (4 + 2 + 4 + optimizer) / fsdp bytes. A second table compares the remat
policies at fsdp = 8, micro-batch 2. Last line:
  RESULT sdxl_fsdp1_mb1_gib=... sdxl_fsdp8_mb1_gib=... sd15_fsdp1_mb1_gib=... sd15_fsdp8_mb1_gib=...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

if __name__ == "__main__" and "--gpu" not in sys.argv:  # 8 host devices; LLVM -O0 (buffers are decided before
    # codegen). Imported as a module (tpu_aot.py), no flag is set: XLA_FLAGS reach the TPU compiler too.
    # XLA:CPU's default scheduler orders for concurrency and keeps far more alive at once than the GPU/TPU
    # schedulers do (measured: SDXL fsdp 8, 1 pair/device, temporaries 60.2 GiB vs 15.3 GiB); the
    # memory-minimising scheduler is the closer stand-in for an accelerator. --cpu-scheduler=default compares.
    default = re.search(r"--cpu-scheduler[= ]default", " ".join(sys.argv))
    sched = "CPU_SCHEDULER_TYPE_DEFAULT" if default else "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                               " --xla_backend_optimization_level=0 --xla_cpu_scheduler_type=" + sched)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ddspo_jax import parallel, schedules  # noqa: E402
from ddspo_jax import step as step_lib  # noqa: E402
from ddspo_jax.backbones.sd import from_unet  # noqa: E402
from ddspo_jax.config import base_config, validate  # noqa: E402
from ddspo_jax.models.unet import UNet2DConditionModel, count_params, in_unit  # noqa: E402

CONFIGS = ROOT / "ddspo_jax" / "models" / "configs"
TOKENS = 77
GiB = 2 ** 30
MODELS = {"sd15": ("sd15_unet.json", 64, "block"), "sdxl": ("sdxl_unet.json", 128, "block"),
          "sd3medium": ("sd3_medium.json", 128, "block")}
OPT_BYTES = {"adamw": 8, "adafactor": 0}  # per param, f32 moments (Adafactor: factored, counted exactly below)


def shard_bytes(tree) -> int:
    """Per-device bytes of a tree of ShapeDtypeStructs with shardings (the first device's shard)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def placed(tree, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def micro_batch(model, family, hw, n, mesh):
    """Abstract micro-batch of n pairs as records hold it (bf16 latents and embeddings), split over the mesh."""
    c = model.config
    sh = parallel.batch_sharding(mesh)
    a = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sh)  # noqa: E731
    cond = lambda: {"prompt_embeds": a(n, TOKENS, c.cross_attention_dim[0])}  # noqa: E731
    if family == "sdxl":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        cond = lambda: {"prompt_embeds": a(n, TOKENS, c.cross_attention_dim[0]), "pooled_prompt_embeds": a(n, pooled),  # noqa: E731
                        "add_time_ids": a(n, 6)}
    return {"x0_w": a(n, hw, hw, c.in_channels), "x0_l": a(n, hw, hw, c.in_channels), "cond_w": cond(), "cond_l": cond()}


def measure(name: str, mesh, per_dev: int, remat: str, optimizer: str = "adamw", dtype: str = "bfloat16") -> dict:
    file, hw, _ = MODELS[name]
    config = file[:-len(".json")] if name.startswith("sd3") else json.loads((CONFIGS / file).read_text())
    return measure_config(config, hw, mesh, per_dev, remat, optimizer, name, dtype)


def _cost(compiled) -> dict:
    c = compiled.cost_analysis()
    c = (c[0] if isinstance(c, (list, tuple)) else c) or {}
    return {"flops": float(c.get("flops", 0.0)), "bytes": float(c.get("bytes accessed", 0.0)),
            "optimal_s": float(c.get("optimal_seconds", float("nan")))}


def sana_micro_batch(cfg, n, mesh, tokens=300):
    """Abstract micro-batch of n SANA pairs (bf16 latents and Gemma-2 embeddings, the int mask)."""
    sh = parallel.batch_sharding(mesh)
    a = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt, sharding=sh)  # noqa: E731
    cond = lambda: {"prompt_embeds": a(n, tokens, cfg.caption_channels),  # noqa: E731
                    "prompt_attention_mask": a(n, tokens, dt=jnp.int32)}
    hw = cfg.sample_size
    return {"x0_w": a(n, hw, hw, cfg.in_channels), "x0_l": a(n, hw, hw, cfg.in_channels), "cond_w": cond(),
            "cond_l": cond()}


def sd3_micro_batch(cfg, hw, n, mesh, tokens=77 + 77):
    """Abstract micro-batch of n SD3 pairs: bf16 latents, the joint CLIP + T5 embeddings (77 + 77 tokens, as
    the release's max_sequence_length 77) and the pooled CLIP embeddings."""
    sh = parallel.batch_sharding(mesh)
    a = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=sh)  # noqa: E731
    cond = lambda: {"prompt_embeds": a(n, tokens, cfg.joint_attention_dim),  # noqa: E731
                    "pooled_prompt_embeds": a(n, cfg.pooled_projection_dim)}
    return {"x0_w": a(n, hw, hw, cfg.in_channels), "x0_l": a(n, hw, hw, cfg.in_channels), "cond_w": cond(),
            "cond_l": cond()}


def build(config, hw: int, mesh, per_dev: int, remat: str, optimizer: str = "adamw", dtype: str = "bfloat16",
          scan: bool = False):
    """(train step, abstract params, reference, micro-batch, train config) of a diffusers UNet config (dict)
    or a SANA / SD3 config name ("sana_600m_1024", "sd3_medium") or an MMDiTConfig, from shapes only."""
    backbone, schedule, params, mb, cfg = build_backbone(config, hw, mesh, per_dev, remat, optimizer, dtype, scan)
    ref = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), params)
    opt, _ = step_lib.make_optimizer(cfg, 1e-5)
    ts = step_lib.make_train_step(backbone.denoise, schedule, cfg, mesh, opt, params, ref_shape=ref)
    return ts, params, ref, mb, cfg


def build_backbone(config, hw: int, mesh, per_dev: int, remat: str, optimizer: str = "adamw",
                   dtype: str = "bfloat16", scan: bool = False):
    """(backbone, schedule, abstract params, micro-batch, train config): what `build` makes a step of, and
    what the sampler benchmark (tpu_aot.py --sampler) generates with."""
    cd = jnp.dtype(dtype)
    cfg = base_config()
    from ddspo_jax.models.mmdit import MMDiTConfig, SD3Transformer2DModel

    if isinstance(config, str) and config.startswith("sd3"):
        config = MMDiTConfig.named(config)
    if isinstance(config, MMDiTConfig):  # SD3: its release config (flow, logit-normal t, x_0-space loss)
        from ddspo_jax.backbones.sd3 import SD3Backbone
        from ddspo_jax.configs.sd3 import get_config as sd3_config

        cfg = sd3_config()
        model = SD3Transformer2DModel(config, dtype=cd, param_dtype=jnp.float32, remat_policy=remat,
                                      scan_blocks=scan)
        make_backbone = lambda sch: SD3Backbone(Path("."), model, None, sch)  # noqa: E731
        mb = sd3_micro_batch(model.config, hw, per_dev * mesh.size, mesh)
    elif isinstance(config, str):  # SANA: its release config (flow schedule, the release's optimizer)
        from ddspo_jax.backbones.sana import SanaBackbone
        from ddspo_jax.configs.sana import get_config as sana_config
        from ddspo_jax.models.sana import SanaConfig, SanaTransformer2DModel

        cfg = sana_config()
        model = SanaTransformer2DModel(SanaConfig.named(config), dtype=cd, param_dtype=jnp.float32,
                                       remat_policy=remat, scan_blocks=scan)
        make_backbone = lambda sch: SanaBackbone(Path("."), model, None, sch)  # noqa: E731
        mb = sana_micro_batch(model.config, per_dev * mesh.size, mesh)
    else:
        model = UNet2DConditionModel.from_config(config, dtype=cd, param_dtype=jnp.float32,
                                                 attention_impl="auto", remat_policy=remat, scan_blocks=scan)
        family = "sdxl" if model.config.addition_embed_type == "text_time" else "sd"
        make_backbone = lambda sch: from_unet(model, sch)  # noqa: E731
        mb = micro_batch(model, family, hw, per_dev * mesh.size, mesh)
    cfg.model.dtype, cfg.model.remat_policy, cfg.train.optimizer = dtype, remat, optimizer
    cfg.model.scan_blocks = scan
    cfg.model.lora_rank = 0
    cfg.train.batch_size, cfg.train.micro_batch_per_device = 2 * per_dev * mesh.size, per_dev  # 2 micro-batches
    cfg.mesh.data, cfg.mesh.fsdp = mesh.shape["data"], mesh.shape["fsdp"]
    validate(cfg)
    schedule = schedules.from_config(cfg.schedule)
    backbone = make_backbone(schedule)
    return backbone, schedule, model.init_shapes(), mb, cfg


def grad_args(ts, params, ref, mb, mesh) -> tuple:
    """The gradient program's abstract arguments, placed on `mesh`: (accumulator, params, reference,
    micro-batch, key, step, micro-batch index)."""
    rep = parallel.NamedSharding(mesh, parallel.P())
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    return (placed(ts.acc_shape, ts.acc_shardings), placed(params, parallel.tree_shardings(params, mesh)),
            placed(ref, parallel.tree_shardings(ref, mesh)), mb, key, scalar, scalar)


def lowered_cost(config, hw: int, per_dev: int, remat: str, optimizer: str = "adamw",
                 dtype: str = "bfloat16") -> dict:
    """Flops and bytes of what one device's gradient program computes for `per_dev` pairs, from XLA's cost
    analysis of the step lowered (not compiled) for one host CPU device: the count where a compiler gives no
    cost analysis (XLA:GPU without a GPU). Always the unrolled step: XLA counts a scanned loop's body once.
    Collectives aside, each device of a mesh computes this much."""
    mesh = parallel.make_mesh(1, 1, jax.devices("cpu")[:1])
    ts, params, ref, mb, _ = build(config, hw, mesh, per_dev, remat, optimizer, dtype)
    return _cost(ts.grad.lower(*grad_args(ts, params, ref, mb, mesh)))  # a Lowered has cost_analysis() too


def measure_config(config, hw: int, mesh, per_dev: int, remat: str, optimizer: str = "adamw",
                   name: str = "", dtype: str = "bfloat16", scan: bool = False) -> dict:
    """The table's numbers for one model config on one mesh (see the module docstring), plus each compiled
    program's cost analysis (flops, bytes accessed, the compiler's optimal_seconds; per device)."""
    ts, params, ref, mb, _ = build(config, hw, mesh, per_dev, remat, optimizer, dtype, scan)
    acc_a, p_a, r_a, *_ = args = grad_args(ts, params, ref, mb, mesh)
    state_a = placed(ts.state_shape, ts.state_shardings)
    t0 = time.time()
    g = ts.grad.lower(*args).compile()
    u = ts.update.lower(state_a, acc_a).compile()
    compile_s = time.time() - t0
    mg, mu = g.memory_analysis(), u.memory_analysis()
    n = count_params(params)
    parts = dict(params=shard_bytes(p_a), ref=shard_bytes(r_a), acc=shard_bytes(acc_a["grads"]),
                 opt=shard_bytes(state_a["opt_state"]), batch=shard_bytes(mb))
    resident = parts["params"] + parts["ref"] + parts["acc"] + parts["opt"]
    xla_args = mg.argument_size_in_bytes  # acc + params + ref + batch (+ scalars): cross-check
    peak = resident + max(parts["batch"] + mg.temp_size_in_bytes, mu.temp_size_in_bytes)
    fsdp = mesh.shape["fsdp"]
    opt_an = OPT_BYTES[optimizer] * n if optimizer == "adamw" else parts["opt"] * fsdp
    outside = sum(math.prod(x.shape) for p_, x in jax.tree_util.tree_flatten_with_path(params)[0]
                  if not in_unit(parallel.key_path(p_)))
    cg, cu = _cost(g), _cost(u)
    return dict(model=name, mesh=f"data={mesh.shape['data']} fsdp={fsdp}", devices=mesh.size, per_dev=per_dev,
                remat=remat, optimizer=optimizer, params_M=n / 1e6, outside_units=outside / n,
                resident=resident / GiB, analytic=(n * (4 + 2 + 4) + opt_an) / fsdp / GiB,
                xla_args_check=(xla_args - parts["params"] - parts["ref"] - parts["acc"] - parts["batch"]) / GiB,
                xla_update_args_check=(mu.argument_size_in_bytes - parts["params"] - parts["opt"] - parts["acc"]) / GiB,
                temp_grad=mg.temp_size_in_bytes / GiB, temp_update=mu.temp_size_in_bytes / GiB,
                peak=peak / GiB, compile_s=compile_s, **{k: v / GiB for k, v in parts.items()},
                **{f"{k}_grad": v for k, v in cg.items()}, **{f"{k}_update": v for k, v in cu.items()})


def table(rows, cols):
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[fmt(r[c]) for c in cols] for r in rows]
    w = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    line = lambda xs: "| " + " | ".join(f"{x:>{w[i]}}" for i, x in enumerate(xs)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(x) for x in cells])


COLS = ["model", "mesh", "per_dev", "remat", "params", "ref", "opt", "acc", "resident", "analytic", "temp_grad",
        "temp_update", "peak", "compile_s"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="micro-batch 1 only, no remat table")
    ap.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl, sd3medium")
    ap.add_argument("--micro", default="1,2,4,8", help="micro_batch_per_device values")
    ap.add_argument("--optimizer", default="adamw", choices=("adamw", "adafactor"))
    ap.add_argument("--gpu", action="store_true", help="the accelerator's devices instead of 8 host devices")
    ap.add_argument("--cpu-scheduler", choices=("memory", "default"), default="memory",
                    help="XLA:CPU's instruction scheduler: memory-minimising (the stand-in for an accelerator's, "
                         "default) or XLA:CPU's own concurrency-first default")
    a = ap.parse_args(argv)
    devs = jax.devices()
    meshes = [("1 device", parallel.make_mesh(1, 1, devs[:1]))]
    if len(devs) >= 8:
        meshes += [("fsdp 8", parallel.make_mesh(1, 8, devs[:8])), ("data 8", parallel.make_mesh(8, 1, devs[:8]))]
    micro = [1] if a.quick else [int(x) for x in a.micro.split(",")]
    print(f"jax {jax.__version__} on {devs[0].platform} ({devs[0].device_kind}), {len(devs)} devices; per-device GiB; "
          f"optimizer {a.optimizer}; bf16 compute and reference, f32 master weights and accumulator")
    rows, result = [], {}
    for name in a.models.split(","):
        remat = MODELS[name][2]
        for label, mesh in meshes:
            for m in micro:
                r = measure(name, mesh, m, remat, a.optimizer)
                rows.append(r)
                print(f"  {name} {label} micro {m}: peak {r['peak']:.2f} GiB (compiled in {r['compile_s']:.0f} s)",
                      flush=True)
                if m == 1 and label != "data 8":
                    result[f"{name}_fsdp{mesh.shape['fsdp']}_mb1_gib"] = r["peak"]
        print(f"{name}: {rows[-1]['params_M']:.1f}M params, {100 * rows[-1]['outside_units']:.1f} % of them outside "
              "the gathered blocks (gathered once per call)")
    print(table(rows, COLS))
    if not a.quick and len(meshes) > 1:
        pol = []
        for name in a.models.split(","):
            for remat in ("none", "dots_saveable", "block", "full"):
                pol.append(measure(name, meshes[1][1], 2, remat, a.optimizer))
                print(f"  {name} remat {remat}: peak {pol[-1]['peak']:.2f} GiB", flush=True)
        print("remat policies at fsdp 8, micro-batch 2 per device:")
        print(table(pol, COLS))
    order = ["sdxl_fsdp1_mb1_gib", "sdxl_fsdp8_mb1_gib", "sd15_fsdp1_mb1_gib", "sd15_fsdp8_mb1_gib"]
    print("RESULT " + " ".join(f"{k}={result[k]:.3f}" for k in order if k in result))


if __name__ == "__main__":
    main()
