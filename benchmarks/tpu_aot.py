"""The real train steps compiled by the TPU compiler for TPU slices (and by XLA:GPU for H100s), on a machine
without a TPU or a GPU.

  pip install -e '.[tpu-aot]'      # in a venv of its own: libtpu 0.0.42 (the pin of jax[tpu] 0.10.2)
  python benchmarks/tpu_aot.py --topology v5e:2x4 --models sd15 --fsdp 8 --micro 1,2 --remat block
  python benchmarks/tpu_aot.py --topology v5e:2x2 --models tiny --fsdp 4        # a minute: the smoke check
  python benchmarks/tpu_aot.py --topology v5e:2x4 --models sdxl --scan on       # ~16 min, ~17 GiB of host memory
  pip install -e '.[gpu-aot]'      # another venv: jax-cuda12-plugin / -pjrt 0.10.2 (XLA:GPU, no driver needed)
  python benchmarks/tpu_aot.py --topology h100:1x1x8 --models sd15 --fsdp 8

`jax.experimental.topologies.get_topology_desc(topology, "tpu")` gives compile-only TPU devices (for
"h100:...", `platform="cuda"` with the GpuTargetConfigProto shipped in ddspo_jax/configs/targets/h100.txtpb);
the
project's train step (`step.make_train_step`, exactly as `benchmarks/memory.py` builds it: bf16 compute, f32
master weights, the bf16 frozen reference, DDSPO's three reference forwards; shapes only, no weights) is
lowered on a mesh of them and compiled by libtpu. Per chip, one row per (model, mesh, remat, micro-batch):

  resident   params + reference + optimizer state + gradient accumulator, each its fsdp shard (exact)
  temp       the TPU compiler's temporaries of the gradient program (activations, gathered blocks, workspace)
  peak       resident + max(micro-batch + temp of the gradient program, temp of the update program); vs HBM
  TFLOP      per chip per micro-batch, from the compiled program's cost analysis (cross-check: the analytic
             count, docs/performance.md: 0.80 TFLOP per SD-1.5 UNet forward at 64x64, 9 forward-equivalents
             per pair); XLA:GPU gives none without a GPU: there, XLA's count of the unoptimised step lowered
             for one CPU device with the same pairs per device (`memory.lowered_cost`)
  est ms     the compiler's `optimal_seconds` where it is positive and not below the roofline, else the
             roofline max(flops / bf16 peak, bytes accessed / HBM bandwidth) ("est" column says which);
             H100 rows and scanned rows (--scan on; XLA's cost analysis counts a loop body once): flops of
             the unrolled step / bf16 peak ("flops bound", a lower bound: the unoptimised bytes are unfused)
  pairs/s    pairs per micro-batch / est time (the update, once per step, amortised away); MFU = flops /
             est time / the chip's bf16 peak

Last line: RESULT <model>_<topology>_fsdp<k>_mb<m>_<remat>_{peak,resident,est_ms,tflop}=... (GiB per chip,
ms, TFLOP per chip; one group per row). Compile times are minutes per SD-1.5 program on 2 cores; SDXL's are
tens of minutes: budget them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path


def accelerator_type(topology: str) -> str:
    """The TPU_ACCELERATOR_TYPE name of a topology ("v5e:2x4" -> "v5litepod-8"): libtpu reads it at start-up
    and warns (harmlessly) when it is missing on a host without a TPU."""
    kind, _, dims = topology.partition(":")
    chips = 1
    for d in dims.split("x") if dims else []:
        chips *= int(d) if d.isdigit() else 1
    return {"v5e": f"v5litepod-{chips}", "v6e": f"v6e-{chips}"}.get(kind, f"{kind}-{2 * chips}")


def libtpu_environment(argv) -> None:
    """Before JAX starts (run as a script only: an importer's environment is left alone -- TPU_WORKER_HOSTNAMES
    would make every later JAX program of that process start a multi-process runtime): no metadata server or
    TPU here, so libtpu is told what it would otherwise look up; the host's own backend is the CPU."""
    topology = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--topology"), "v5e:2x4")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(topology))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # TPU devices come from the topology only
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # no chip to own: two compiles may run at once


if __name__ == "__main__":
    libtpu_environment(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import memory  # noqa: E402

from ddspo_jax import parallel  # noqa: E402

GiB = 2 ** 30
# Per chip: HBM (GiB), dense bf16 peak (FLOP/s), HBM bandwidth (B/s) -- the vendors' published figures.
CHIPS = {"v4": (32, 275e12, 1228e9), "v5e": (16, 197e12, 819e9), "v5p": (95, 459e12, 2765e9),
         "v6e": (32, 918e12, 1640e9), "h100": (80, 989e12, 3352e9)}
GPU_TARGETS = {"h100": ROOT / "ddspo_jax" / "configs" / "targets" / "h100.txtpb"}  # XLA:GPU's view of the chip
# model name -> (config for memory.build: a UNet config dict or a SANA config name, latent side)
TINY_UNET = dict(block_out_channels=[32, 64], layers_per_block=1, in_channels=4, out_channels=4, sample_size=16,
                 cross_attention_dim=32, attention_head_dim=4, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], norm_num_groups=8)


def model_config(name: str):
    if name == "tiny":
        return TINY_UNET, 16
    if name.startswith("sana"):
        return {"sana600m": "sana_600m_1024", "sana1600m": "sana_1600m_1024"}[name], 32
    if name.startswith("sd3"):  # 1024^2: 128x128 latents
        return {"sd3medium": "sd3_medium", "sd35large": "sd35_large"}[name], 128
    file, hw, _ = memory.MODELS[name]
    return json.loads((memory.CONFIGS / file).read_text()), hw


def chip_of(topology: str) -> tuple[str, tuple]:
    kind = topology.split(":")[0]
    if kind not in CHIPS:
        raise SystemExit(f"--topology {topology!r}: chip {kind!r} is not one of {sorted(CHIPS)}")
    return kind, CHIPS[kind]


def estimate(flops: float, nbytes: float, optimal_s: float, peak: float, bw: float) -> tuple[float, str]:
    """(seconds, which estimate): the cost model's optimal_seconds where valid, else the roofline."""
    roof = max(flops / peak, nbytes / bw)
    if optimal_s > 0 and optimal_s >= 0.5 * roof:
        return optimal_s, "cost model"
    return roof, "roofline"


def tpu_devices(topology: str):
    """Compile-only devices: a TPU slice ("v5e:2x4") from libtpu, or H100s ("h100:1x1x8") from the CUDA plugin."""
    from jax.experimental import topologies

    kind, _, dims = topology.partition(":")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind in GPU_TARGETS:
            proto = "\n".join(x for x in GPU_TARGETS[kind].read_text().splitlines() if not x.startswith("#"))
            topo = topologies.get_topology_desc(platform="cuda", topology_name=f"{kind}x{dims}",
                                                topology=dims or "1x1x8", target_config=proto)
        else:
            topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    return topo.devices


def row(name, topology, devices, fsdp, per_dev, remat, scan=False) -> dict:
    kind, (hbm, peak, bw) = chip_of(topology)
    n = len(devices)
    mesh = parallel.make_mesh(n // fsdp, fsdp, devices)
    config, hw = model_config(name)
    r = memory.measure_config(config, hw, mesh, per_dev, remat, name=name, scan=scan)
    if not r["flops_grad"] or scan:  # XLA:GPU compile-only: no cost analysis; and XLA's cost analysis counts
        # a while loop's body once, so a scanned program's is short by its blocks: the unoptimised unrolled
        # step's count instead. Its bytes are unfused (every intermediate read and written): no bandwidth
        # bound can be taken from them, so the time is the compute bound flops / peak -- a lower bound (MFU 1
        # by construction: none).
        c = memory.lowered_cost(config, hw, per_dev, remat)
        r.update(flops_grad=c["flops"], bytes_grad=c["bytes"])
        t, which = r["flops_grad"] / peak, "flops bound"
    else:
        t, which = estimate(r["flops_grad"], r["bytes_grad"], r["optimal_s_grad"], peak, bw)
    pairs = per_dev * n
    return dict(model=name, topology=topology, chip=devices[0].device_kind, mesh=r["mesh"], per_dev=per_dev,
                remat=remat + (" scan" if scan else ""), resident=r["resident"], temp=r["temp_grad"],
                peak=r["peak"], hbm=float(hbm),
                fits="yes" if r["peak"] <= 0.9 * hbm else "no", tflop=r["flops_grad"] / 1e12,
                gbytes=r["bytes_grad"] / 1e9, optimal_ms=r["optimal_s_grad"] * 1e3, est_ms=t * 1e3, est=which,
                pairs_s=pairs / t, mfu=r["flops_grad"] / t / peak if which != "flops bound" else float("nan"),
                compile_s=r["compile_s"])


def sampler_row(name, topology, devices, per_dev) -> dict:
    """Pair generation (prepare) per chip: one guided denoiser call -- the family's sampler loop with one
    step, images per chip `per_dev` (each a CFG pair of rows), bf16 weights replicated, data parallel over the
    chips (the sampler's shard_map) -- compiled, and its time scaled by the family's steps; a pair is two
    images (c and c-)."""
    from ddspo_jax import sampling

    kind, (hbm, peak, bw) = chip_of(topology)
    n = len(devices)
    mesh = parallel.make_mesh(n, 1, devices)
    config, hw = model_config(name)
    bb, schedule, params, mb, _ = memory.build_backbone(config, hw, mesh, per_dev, "none")
    d = bb.defaults or dict(sampler="ddim", steps=25, guidance=7.5)
    run = sampling.make_sampler(bb.denoise, schedule, sampler=d["sampler"], steps=1, guidance=d["guidance"],
                                mesh=mesh)
    rep = parallel.NamedSharding(mesh, parallel.P())
    weights = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=rep), params)
    noise = jax.ShapeDtypeStruct(mb["x0_w"].shape, jnp.float32, sharding=mb["x0_w"].sharding)
    t0 = time.time()
    c = run.lower(weights, noise, mb["cond_w"], mb["cond_l"]).compile()
    compile_s = time.time() - t0
    m, cost = c.memory_analysis(), memory._cost(c)
    if not cost["flops"]:  # XLA:GPU compile-only: no cost analysis; no estimate
        cost.update(flops=float("nan"), bytes=float("nan"))
    t, which = estimate(cost["flops"], cost["bytes"], cost["optimal_s"], peak, bw)
    steps = int(d["steps"])
    return dict(model=name, topology=topology, per_dev=per_dev, sampler=f"{d['sampler']} {steps}",
                weights=m.argument_size_in_bytes / GiB, temp=m.temp_size_in_bytes / GiB,
                peak=(m.argument_size_in_bytes + m.temp_size_in_bytes) / GiB, hbm=float(hbm),
                tflop_step=cost["flops"] / 1e12, step_ms=t * 1e3, est=which,
                pairs_s_chip=per_dev / 2 / (steps * t), compile_s=compile_s)


SAMPLER_COLS = ["model", "topology", "per_dev", "sampler", "weights", "temp", "peak", "hbm", "tflop_step",
                "step_ms", "est", "pairs_s_chip", "compile_s"]

COLS = ["model", "topology", "mesh", "per_dev", "remat", "resident", "temp", "peak", "hbm", "fits", "tflop",
        "gbytes", "optimal_ms", "est_ms", "est", "pairs_s", "mfu", "compile_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", default="v5e:2x4", help="TPU topology, e.g. v5e:2x4, v6e:2x4, v5p:2x2x2; or "
                                                            "h100:1x1x8 (8 H100s, XLA:GPU)")
    ap.add_argument("--models", default="sd15", help="comma-separated: tiny, sd15, sdxl, sana600m, sana1600m, sd3medium, sd35large")
    ap.add_argument("--fsdp", default="8", help="comma-separated fsdp sizes (the rest of the chips is data)")
    ap.add_argument("--micro", default="1", help="comma-separated micro_batch_per_device values")
    ap.add_argument("--remat", default="block", help="comma-separated remat policies")
    ap.add_argument("--scan", default="off", help="comma-separated off,on: model.scan_blocks (each stack of "
                    "identical transformer blocks as one lax.scan: one block body to compile)")
    ap.add_argument("--sampler", action="store_true", help="pair generation instead of the train step: "
                    "--micro is images per chip, data parallel, the family's sampler, steps and CFG")
    a = ap.parse_args(argv)
    chip_of(a.topology)
    scans = a.scan.split(",")
    if set(scans) - {"off", "on"}:
        raise SystemExit(f"--scan {a.scan!r}: each value is off or on")
    devices = tpu_devices(a.topology)
    print(f"jax {jax.__version__}; {len(devices)} compile-only {devices[0].device_kind} devices ({a.topology}); "
          "per chip GiB; bf16 compute and reference, f32 master weights and accumulator, AdamW", flush=True)
    rows = []
    if a.sampler:
        for name in a.models.split(","):
            for per_dev in (int(x) for x in a.micro.split(",")):
                rows.append(sampler_row(name, a.topology, devices, per_dev))
                r = rows[-1]
                print(f"  {name} sampler, {per_dev} images per chip: peak {r['peak']:.2f} / {r['hbm']:.0f} GiB, "
                      f"{r['step_ms']:.1f} ms per step ({r['est']}), {r['pairs_s_chip']:.2f} pairs/s per chip, "
                      f"compiled in {r['compile_s']:.0f} s", flush=True)
        print(memory.table(rows, SAMPLER_COLS))
        print("RESULT " + " ".join(f"{r['model']}_{r['topology'].replace(':', '-')}_sampler_mb{r['per_dev']}_{k}="
                                   f"{r[k]:.4g}" for r in rows for k in ("peak", "step_ms", "pairs_s_chip", "tflop_step")))
        return 0
    for name in a.models.split(","):
        for fsdp in (int(x) for x in a.fsdp.split(",")):
            for remat in a.remat.split(","):
                for per_dev, scan in ((int(x), y) for x in a.micro.split(",") for y in scans):
                    rows.append(row(name, a.topology, devices, fsdp, per_dev, remat, scan == "on"))
                    r = rows[-1]
                    print(f"  {name} fsdp {fsdp} {r['remat']} micro {per_dev}: peak {r['peak']:.2f} / {r['hbm']:.0f} GiB, "
                          f"{r['tflop']:.2f} TFLOP, est {r['est_ms']:.0f} ms ({r['est']}), compiled in "
                          f"{r['compile_s']:.0f} s", flush=True)
    print(memory.table(rows, COLS))
    print("RESULT " + " ".join(
        f"{r['model']}_{r['topology'].replace(':', '-')}_fsdp{r['mesh'].split('fsdp=')[1]}_mb{r['per_dev']}_{r['remat'].replace(' ', '_')}"
        f"_{k}={r[k]:.4g}" for r in rows for k in ("peak", "resident", "est_ms", "tflop")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
