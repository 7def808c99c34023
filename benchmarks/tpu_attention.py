"""Attention on a TPU chip, compiled without one: XLA's attention (what the project ran on TPU), the
query-chunked XLA path ('chunked', the CPU default for long sequences) and Pallas' TPU flash attention
('pallas', `jax.experimental.pallas.ops.tpu.flash_attention`), forward + backward, at the sequence lengths
where a train step spends its attention: SD-1.5's and SDXL's 4096-token levels, SDXL's 1024-token level,
SANA's cross-attention (1024 latent tokens x 300 text tokens).

  pip install -e '.[tpu-aot]'       # libtpu, as benchmarks/tpu_aot.py
  python benchmarks/tpu_attention.py --chip v5e --batch 2

Per case and implementation, from the TPU compiler (`memory_analysis`, `cost_analysis`) for one chip:
temporaries (MiB), bytes accessed, and the estimated time: the roofline max(flops / bf16 peak, bytes /
HBM bandwidth) with the *analytic* flops (2 matmuls forward, 5 backward with the probabilities recomputed:
14 B H Tq Tk D; the Pallas backward kernels carry no cost estimate, and XLA counts a `lax.map` body once,
so the compiler's flops are not comparable across implementations; the chunked path's bytes are scaled by its
trip count, the Pallas bytes are the forward kernel's estimate: flash attention's backward re-reads only
Q, K, V and dO blocks), and the compiler's own `optimal_seconds` where it is positive. The last lines are `RESULT case_impl_temp_mib=... _est_us=...`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tpu_aot  # noqa: E402  (sets libtpu's environment when run as a script)

if __name__ == "__main__":
    tpu_aot.libtpu_environment(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddspo_jax.models import layers  # noqa: E402

# case -> (query tokens, key tokens, heads, head dim): per latent level of the real configs
CASES = {
    "sd15_64x64": (4096, 4096, 8, 40),      # SD-1.5 at 512^2, first level: 320 channels, 8 heads
    "sdxl_64x64": (4096, 4096, 10, 64),     # SDXL at 1024^2, second level: 640 channels, 64-wide heads
    "sdxl_32x32": (1024, 1024, 20, 64),     # SDXL's third level: 1280 channels
    "sana_cross": (1024, 300, 70, 32),      # SANA 1600M at 1024^2: 32x32 latent tokens x 300 Gemma tokens
}
IMPLS = ("xla", "chunked", "pallas")


def analytic_flops(b, tq, tk, h, d) -> float:
    return 14.0 * b * h * tq * tk * d


def compile_case(device, b, tq, tk, h, d, impl):
    mesh = Mesh(np.array([device]), ("x",))
    sh = NamedSharding(mesh, P())
    q = jax.ShapeDtypeStruct((b, tq, h * d), jnp.bfloat16, sharding=sh)
    kv = jax.ShapeDtypeStruct((b, tk, h * d), jnp.bfloat16, sharding=sh)

    def loss(q, k, v):
        return jnp.sum(layers.attention(q, k, v, h, impl=impl).astype(jnp.float32) ** 2)

    t0 = time.time()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv).compile()
    return compiled, time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chip", default="v5e", help="v5e | v6e | v5p | v4 (the compile-only device's kind)")
    ap.add_argument("--batch", type=int, default=2, help="sequences per chip (one DDSPO pair: 2 latents)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--impls", default=",".join(IMPLS))
    args = ap.parse_args(argv)
    kind, (hbm, peak, bw) = tpu_aot.chip_of(args.chip)
    device = tpu_aot.tpu_devices({"v5e": "v5e:2x2", "v6e": "v6e:2x2"}.get(kind, f"{kind}:2x2x1"))[0]  # one host's chips
    print(f"{device.device_kind}: bf16 peak {peak / 1e12:.0f} TFLOP/s, HBM {bw / 1e9:.0f} GB/s; batch {args.batch}")
    print(f"{'case':<12} {'impl':<8} {'temp MiB':>9} {'GB acc.':>8} {'analytic GF':>11} {'roofline us':>11} "
          f"{'compiler us':>11} {'compile s':>9}")
    results = []
    for case in args.cases.split(","):
        tq, tk, h, d = CASES[case]
        flops = analytic_flops(args.batch, tq, tk, h, d)
        for impl in args.impls.split(","):
            try:
                compiled, secs = compile_case(device, args.batch, tq, tk, h, d, impl)
            except Exception as e:  # a kernel's shape limits: say which, go on
                print(f"{case:<12} {impl:<8} not compiled: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                continue
            mem = compiled.memory_analysis()
            cost = compiled.cost_analysis()
            cost = (cost[0] if isinstance(cost, list) else cost) or {}
            nbytes = float(cost.get("bytes accessed", 0.0))
            if impl == "chunked" and tq >= 2 * layers.QUERY_CHUNK:  # the lax.map body is counted once
                nbytes *= tq // layers.QUERY_CHUNK
            roof = max(flops / peak, nbytes / bw)
            opt = float(cost.get("optimal_seconds", -1.0))
            temp = mem.temp_size_in_bytes / 2 ** 20
            print(f"{case:<12} {impl:<8} {temp:>9.1f} {nbytes / 1e9:>8.2f} {flops / 1e9:>11.1f} {roof * 1e6:>11.0f} "
                  f"{(f'{opt * 1e6:.0f}' if opt > 0 else '-'):>11} {secs:>9.1f}", flush=True)
            results.append(f"{case}_{impl}_temp_mib={temp:.1f} {case}_{impl}_est_us={roof * 1e6:.0f}")
    print("RESULT " + " ".join(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
