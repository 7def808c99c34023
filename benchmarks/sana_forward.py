"""Flax SANA transformer vs PyTorch diffusers' SanaTransformer2DModel: forward and forward+backward, side by side.

  python benchmarks/sana_forward.py                  # CPU: a small SANA-like config, both frameworks
  python benchmarks/sana_forward.py --accelerator    # GPU/TPU: Sana_600M at 1024px (32x32 latents, 1024
                                                     # tokens), bf16, Flax only: ms, TFLOP/s, peak memory

The CPU run converts the same random diffusers weights into Flax, checks the outputs agree, then times both
on identical inputs (medians of --iters runs after compilation / warm-up). Last line: RESULT ... ratios
(torch ms / flax ms; > 1 means Flax is faster).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ddspo_jax.models.unet import count_params  # noqa: E402
from unet_forward import _median_ms  # noqa: E402  (the same timing as the UNet table)

# SANA's block structure (linear self-attention, masked cross-attention, Mix-FFN), CPU-sized.
SMALL = dict(in_channels=32, out_channels=32, num_attention_heads=8, attention_head_dim=32, num_layers=4,
             num_cross_attention_heads=8, cross_attention_head_dim=32, cross_attention_dim=256,
             caption_channels=256, mlp_ratio=2.5, sample_size=16, patch_size=1)


def _inputs(b: int, s: int, c: dict, tokens: int):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, s, s, c["in_channels"])).astype(np.float32)
    t = rng.uniform(0, 1000, (b,)).astype(np.float32)
    ctx = rng.standard_normal((b, tokens, c["caption_channels"])).astype(np.float32)
    mask = (np.arange(tokens)[None] < rng.integers(tokens // 4, tokens + 1, (b, 1))).astype(np.int32)
    return x, t, ctx, mask


def cpu_compare(args) -> dict:
    import diffusers
    import torch

    from ddspo_jax.convert import load_sana

    torch.manual_seed(0)
    tm = diffusers.SanaTransformer2DModel(**SMALL).eval()
    with tempfile.TemporaryDirectory() as d:
        tm.save_pretrained(d)
        model, params = load_sana(d)
    x, t, ctx, mask = _inputs(args.batch, SMALL["sample_size"], SMALL, args.tokens)
    tx, tt, tc, tmask = (torch.tensor(x.transpose(0, 3, 1, 2)), torch.tensor(t), torch.tensor(ctx),
                         torch.tensor(mask))
    fwd = jax.jit(lambda p, x, t, c, m: model.apply({"params": p}, x, t, c, m))
    loss = lambda p, x, t, c, m: jnp.mean(jnp.square(model.apply({"params": p}, x, t, c, m)))  # noqa: E731
    grad = jax.jit(jax.grad(loss))
    with torch.no_grad():
        ref = tm(tx, encoder_hidden_states=tc, timestep=tt, encoder_attention_mask=tmask).sample.numpy()
    err = float(np.abs(np.asarray(fwd(params, x, t, ctx, mask)) - ref.transpose(0, 2, 3, 1)).max())

    def torch_fwd():
        with torch.no_grad():
            tm(tx, encoder_hidden_states=tc, timestep=tt, encoder_attention_mask=tmask)

    def torch_fwd_bwd():
        tm.zero_grad(set_to_none=True)
        tm(tx, encoder_hidden_states=tc, timestep=tt, encoder_attention_mask=tmask).sample.pow(2).mean().backward()

    rows = [("forward", _median_ms(lambda: fwd(params, x, t, ctx, mask).block_until_ready(), args.iters),
             _median_ms(torch_fwd, args.iters)),
            ("forward+backward", _median_ms(lambda: jax.block_until_ready(grad(params, x, t, ctx, mask)), args.iters),
             _median_ms(torch_fwd_bwd, args.iters))]
    s = SMALL["sample_size"]
    print(f"CPU, small SANA-like transformer ({count_params(params) / 1e6:.1f}M params, {SMALL['num_layers']} blocks), "
          f"batch {args.batch}, {s}x{s} latents ({s * s} tokens), {args.tokens} caption tokens; jax {jax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads); max |flax - torch| = {err:.2e}")
    print(f"| {'pass':<18} | {'flax ms':>9} | {'torch ms':>9} | {'torch/flax':>10} |")
    print(f"|{'-' * 20}|{'-' * 11}|{'-' * 11}|{'-' * 12}|")
    for name, fj, ft in rows:
        print(f"| {name:<18} | {fj:9.1f} | {ft:9.1f} | {ft / fj:10.2f} |")
    result = {"forward_ratio": rows[0][2] / rows[0][1], "fwd_bwd_ratio": rows[1][2] / rows[1][1], "max_err": err}
    print("RESULT " + " ".join(f"{k}={v:.3g}" for k, v in result.items()))
    return result


def accel_run(args) -> dict:
    """Sana_600M (or --config) at 1024px in bf16 on the default device: forward and forward+backward (block
    remat), ms, TFLOP/s by XLA's cost analysis, peak memory."""
    from ddspo_jax.models.sana import SanaConfig, SanaTransformer2DModel

    cfg = SanaConfig.named(args.config)
    model = SanaTransformer2DModel(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat_policy=args.remat)
    c = {"in_channels": cfg.in_channels, "caption_channels": cfg.caption_channels}
    x, t, ctx, mask = _inputs(args.batch, cfg.sample_size, c, 300)
    params = jax.jit(lambda: model.init(jax.random.key(0), x[:1], t[:1], ctx[:1], mask[:1])["params"])()
    fwd = jax.jit(lambda p, x, t, c, m: model.apply({"params": p}, x, t, c, m))
    loss = lambda p, x, t, c, m: jnp.mean(jnp.square(model.apply({"params": p}, x, t, c, m).astype(jnp.float32)))  # noqa: E731
    grad = jax.jit(jax.grad(loss))
    out = {}
    for name, fn in (("forward", fwd), ("fwd_bwd", grad)):
        compiled = fn.lower(params, x, t, ctx, mask).compile()
        flops = float((compiled.cost_analysis() or {}).get("flops", 0.0))
        ms = _median_ms(lambda: jax.block_until_ready(compiled(params, x, t, ctx, mask)), args.iters)
        mem = compiled.memory_analysis()
        peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2 ** 30
        out[name] = dict(ms=ms, tflops=flops / ms / 1e9, peak_gib=peak)
        print(f"{args.config} {name}: batch {args.batch}, {ms:.1f} ms, {flops / ms / 1e9:.1f} TFLOP/s, "
              f"{peak:.2f} GiB ({jax.devices()[0].device_kind})")
    print("RESULT " + " ".join(f"{n}_{k}={v:.3g}" for n, r in out.items() for k, v in r.items()))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=40, help="caption tokens (CPU run)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--accelerator", action="store_true", help="the real config in bf16 on the default device")
    ap.add_argument("--config", default="sana_600m_1024", help="models/configs/<name>.json for --accelerator")
    ap.add_argument("--remat", default="block", help="remat policy for --accelerator")
    args = ap.parse_args(argv)
    accel_run(args) if args.accelerator else cpu_compare(args)


if __name__ == "__main__":
    main()
