"""How much latent noise a world model's VAE tolerates: held-out scenes encoded, noised, decoded, judged.

  python benchmarks/world_latents.py [--model ddspo_jax/world/model] [--every 3] [--sigmas 0,0.1,0.2,0.3,0.5]

Ground-truth scenes of the held-out prompts (every `--every`-th line of world_eval.jsonl, rendered with seed 0)
are encoded to their posterior means, scaled by the VAE's scaling_factor, perturbed by Gaussian noise of
sigma times the latents' std (so VAEs with different factors compare at the same relative noise) and decoded; the scene world's judge scores the decodes against the prompt's metadata. A UNet's sample is never
exact, so a VAE whose decodes fall apart at small sigma leaves it little room (README, "What limits the world
model": the KL-weight table). The last line: RESULT recon_mse=... acc_<sigma>=... (MSE in [0, 1] pixels).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(model: str, every: int = 3, sigmas=(0.0, 0.1, 0.2, 0.3, 0.5), seed: int = 0) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections

    from ddspo_jax.backbones import load_backbone
    from ddspo_jax.config import base_config
    from ddspo_jax.world import judge, prompts, scenes

    metas = prompts.read_jsonl(ROOT / "ddspo_jax" / "configs" / "prompts" / "world_eval.jsonl")[::every]
    rng = np.random.default_rng(seed)
    images = np.stack([scenes.render_for(m, rng)[0] for m in metas])
    mcfg = ml_collections.ConfigDict(base_config().model.to_dict())
    mcfg.path, mcfg.dtype = model, "float32"
    bb = load_backbone(mcfg, base_config().schedule, text=False, vae=True, log=None)
    vae, params, scale = bb.vae, bb.vae_params, bb.vae.config.scaling_factor
    encode = jax.jit(lambda x: vae.apply({"params": params}, x * 2.0 - 1.0, method="moments")[0] * scale)
    decode = jax.jit(lambda z: (jnp.clip(vae.apply({"params": params}, z, method="decode"), -1, 1) + 1) / 2)
    z = np.concatenate([np.asarray(encode(jnp.asarray(images[i:i + 32]))) for i in range(0, len(images), 32)])
    noise = np.random.default_rng(seed + 1).standard_normal(z.shape).astype(np.float32) * float(z.std())
    out = {"scenes": len(metas), "latent_std": float(z.std())}
    for s in sigmas:
        dec = np.concatenate([np.asarray(decode(jnp.asarray(z[i:i + 32] + s * noise[i:i + 32])))
                              for i in range(0, len(z), 32)])
        if s == 0:
            out["recon_mse"] = float(np.mean((dec - images) ** 2))
        out[f"acc_{s:g}"] = float(np.mean([judge.judge(dec[i], m)[0] for i, m in enumerate(metas)]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "ddspo_jax" / "world" / "model"), help="world-model folder")
    ap.add_argument("--every", type=int, default=3, help="every n-th held-out prompt (default 3: 152 scenes)")
    ap.add_argument("--sigmas", default="0,0.1,0.2,0.3,0.5", help="latent noise levels, in units of the latents' std")
    args = ap.parse_args(argv)
    try:
        sigmas = tuple(float(s) for s in args.sigmas.split(","))
    except ValueError:
        raise SystemExit(f"--sigmas {args.sigmas!r}: not comma-separated numbers")
    r = measure(args.model, args.every, sigmas)
    print(f"{args.model}: {r['scenes']} held-out scenes, scaled latent std {r['latent_std']:.3f}, "
          f"reconstruction MSE {r['recon_mse']:.2e}")
    for s in sigmas:
        print(f"  sigma {s:<5g} judged correct {r[f'acc_{s:g}']:.3f}")
    print("RESULT " + " ".join(f"{k}={v:.6g}" for k, v in r.items() if k not in ("scenes", "latent_std")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
