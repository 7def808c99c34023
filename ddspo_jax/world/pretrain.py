"""Pre-trains the scene world's text-to-image model with the project's own code: the VAE, then the UNet.

  python -m ddspo_jax.world pretrain --out world_model [--vae-steps N] [--unet-steps N] [--batch B]
  python -m ddspo_jax.world pretrain --out ddspo_jax/world/model     # the default recipe

The shipped model (ddspo_jax/world/model) is this command with its defaults: VAE 800 steps (KL weight 1e-4),
UNet 16000 steps, batch 16, 4000 training captions of all five forms, seed 0 (about 10 + 77 minutes on 2 CPU
cores; its VAE phase was resumed once); a resumed run equals a straight one bit for bit
(tests/test_world_pretrain.py). The folder also gets `ddspo_generation.json`: DDIM 20 steps and --guidance
(5.0: chosen on training captions, docs/world/world_model.md), what every command then samples it with.

The architecture is the embedded tiny SD pipeline's (ddspo_jax/backbones/tiny.py: UNet, CLIP text encoder and
tokenizer, f4 VAE at 64x64, DDIM scheduler). The text encoder stays as the tiny builder makes it — random and
frozen: a fixed random transformer keeps the words of a caption distinguishable, the UNet's cross-attention
learns to read them, and nothing about the text side needs training or shipping beyond the builder's
deterministic bytes. Training data are rendered on the fly (world.scenes) from the training captions
(world.prompts.training_set, its five forms drawn uniformly), so the evaluation prompts stay held out.

  VAE   reconstruction MSE + 1e-4 KL (--vae-kl; SD's 1e-6 left a latent space that noise breaks), AdamW
  UNet  DDPM epsilon MSE on the frozen VAE's posterior-mean latents, 10 % empty captions (for CFG), AdamW;
        the latents scaled to unit variance first (the VAE's scaling_factor, LDM's rule: `latent_scale`)

Options measured but off by default (docs/world/world_model.md): --ema (export an EMA of the UNet's weights),
--lr-floor (cosine decay), --init (continue from an earlier world model),
--unet-channels with --min-snr (a 4x wider UNet with Min-SNR-gamma weights, trained from scratch, did not score
higher). What raised the score was training longer with the smoother latent space (--vae-kl 1e-4; 8000 UNet
steps: 0.188 overall, 16000: 0.290 at CFG 7.5, 0.296 at CFG 5), then colourless captions (the fifth form,
"plain": 0.268 -> 0.399 with four images per prompt).

Deterministic (every batch is a pure function of (seed, phase, step)); each phase checkpoints with Orbax every
`--checkpoint-every` steps and a re-run resumes; the result is an ordinary diffusers pipeline folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from ddspo_jax.config import base_config
from ddspo_jax.data.perturb import random_removal
from ddspo_jax.world import prompts as world_prompts, scenes

# The package's JAX-importing modules are imported inside the functions that use them: `--help` and a
# mistyped argument answer in ~0.4 s instead of ~4 s (JAX, Flax, Orbax start-up, measured on 2 cores);
# tests/test_structure.py checks that every function-local import is one of those.


@dataclasses.dataclass
class PretrainConfig:
    out: str
    vae_steps: int = 800
    unet_steps: int = 16000
    batch: int = 16
    vae_lr: float = 1e-3
    vae_kl: float = 1e-4      # weight of the VAE's KL term (SD's 1e-6 left a latent space noise breaks)
    unet_lr: float = 5e-4
    warmup: int = 200
    lr_floor: float = 1.0     # cosine decay to lr_floor x lr (1.0: constant after warmup, as shipped)
    ema: float = 0.0          # > 0: export an EMA of the UNet's weights
    caption_dropout: float = 0.1
    caption_fragments: float = 0.0  # fraction of captions replaced by a random-removal fragment (docs/world)
    scene_noise: float = 0.0  # fraction of UNet scenes that differ from their caption (scenes.mismatch; docs/world)
    mismatch_kinds: str = ",".join(scenes.MISMATCHES)  # which mismatches --scene-noise draws
    train_text_encoder: bool = False  # train the CLIP text encoder with the UNet (shipped: random and frozen)
    checkpoint_every: int = 500
    captions: int = 4000
    seed: int = 0
    resolution: int = 64
    init: str = ""
    forms: str = ",".join(world_prompts.DEFAULT_FORMS)
    unet_channels: str = "32,64"  # the UNet's block_out_channels (the tiny builder's: 32,64)
    min_snr: float = 0.0      # > 0: Min-SNR-gamma loss weights min(SNR, gamma) / SNR (Hang et al. 2023)
    latent_scale: float = 0.0  # the VAE's scaling_factor; 0: 1 / std of its latents when trained here (LDM)
    guidance: float = 5.0     # the CFG scale written to the folder's ddspo_generation.json (docs/world)


# The world model's generation settings (its folder's ddspo_generation.json): its own DDIM scheduler at 20 steps
# (as good as SD's PNDM 25 on training captions at CFG 5, and cheaper) and --guidance.
WORLD_GENERATION = {"_why": "the world model's sampler and CFG scale, chosen on training captions "
                            "(docs/world/world_model.md)", "sampler": "ddim", "steps": 20}


def batch_of_scenes(cfg: PretrainConfig, phase: int, step: int, metas: list[dict]):
    """(images [B, R, R, 3] in [0, 1], captions) for one step: a pure function of (seed, phase, step). The
    caption form (world.prompts.training_set's tags) is drawn uniformly first, so the few distinct counting
    captions are seen as often as the many compound ones. With `scene_noise`, that share of the UNet's scenes
    (phase 1) is drawn for a mismatched copy of the caption's metadata (scenes.mismatch) while the caption is
    kept: the model then learns, as a web-trained model does, p(x | c) with misaligned modes in it."""
    rng = np.random.default_rng([cfg.seed, phase, step])
    by_tag: dict[str, list[dict]] = {}
    for m in metas:
        by_tag.setdefault(m["tag"], []).append(m)
    tags = sorted(by_tag)
    images, captions = [], []
    # the mismatch draws come from their own stream, so the defaults' batches stay the shipped model's
    noise = np.random.default_rng([cfg.seed, phase, step, 1]) if cfg.scene_noise and phase == 1 else None
    kinds = tuple(cfg.mismatch_kinds.split(","))
    for _ in range(cfg.batch):
        group = by_tag[tags[int(rng.integers(len(tags)))]]
        meta = group[int(rng.integers(len(group)))]
        if noise is not None and noise.random() < cfg.scene_noise:
            meta = scenes.mismatch(meta, noise, kinds)
        img, _ = scenes.render_for(meta, rng, cfg.resolution)
        images.append(img)
        captions.append(meta["prompt"])
    return np.stack(images), captions


def unet_captions(cfg: PretrainConfig, step: int, captions: list[str]) -> tuple[list[str], np.ndarray]:
    """The UNet step's captions and which of them are dropped to the empty prompt (CFG): a pure function of
    (seed, step). With `caption_fragments`, that share of the kept captions loses 40-70 % of its words
    (DDSPO's random removal), so the model learns what a fragment leaves open; the draws for the defaults are
    those of the shipped model's run (the fragment draw comes after them)."""
    rng = np.random.default_rng([cfg.seed, 2, step])
    drop = rng.random(len(captions)) < cfg.caption_dropout
    if cfg.caption_fragments:
        frag = (rng.random(len(captions)) < cfg.caption_fragments) & ~drop
        captions = [random_removal(c, seed=cfg.seed, index=step * cfg.batch + j) if f else c
                    for j, (c, f) in enumerate(zip(captions, frag))]
    return captions, drop


def _optimizer(lr: float, warmup: int, steps: int, floor: float):
    """AdamW, linear warmup, then cosine decay to `floor` x lr at the last step (floor 1.0: constant, as the
    shipped model was trained; a decay to 0.1 with an EMA did not raise its held-out score, README)."""
    import optax

    warmup = max(warmup, 1)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), lr * floor)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=1e-2))


def _run_phase(name: str, cfg: PretrainConfig, steps: int, params, loss_fn, make_batch, ckpt_dir: Path, lr: float,
               log, ema: float = 0.0):
    """AdamW on `loss_fn(params, batch, key)` for `steps` steps with Orbax checkpoints; resumes from ckpt_dir.
    With `ema` > 0 it also keeps an exponential moving average of the parameters (decay warmed up as
    min(ema, (1 + i) / (10 + i)), the usual diffusion recipe) and returns that instead of the last iterate."""
    import jax
    import jax.numpy as jnp
    import optax
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    opt = _optimizer(lr, min(cfg.warmup, steps // 10), steps, cfg.lr_floor)
    state = {"params": params, "opt": opt.init(params)}
    if ema:
        state["ema"] = params
    mngr = ocp.CheckpointManager(ckpt_dir.absolute(), options=ocp.CheckpointManagerOptions(max_to_keep=2))
    start = mngr.latest_step() or 0
    if start:
        state = mngr.restore(start, args=ocp.args.StandardRestore(state))
        log(f"pretrain {name}: resumed at step {start} from {ckpt_dir}")

    @jax.jit
    def step(state, batch, key, i):
        loss, g = jax.value_and_grad(loss_fn)(state["params"], batch, key)
        updates, o = opt.update(g, state["opt"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt": o}
        if ema:
            decay = jnp.minimum(ema, (1.0 + i) / (10.0 + i))
            new["ema"] = optax.incremental_update(new["params"], state["ema"], 1.0 - decay)
        return new, loss

    losses = []  # device scalars, read every 20 steps: no host sync per step, so the next batch renders meanwhile
    root = jax.random.fold_in(jax.random.key(cfg.seed), len(name))  # "vae" / "unet": distinct streams
    bar = tqdm(total=steps, initial=start, desc=f"pretrain {name}", unit="step")
    for i in range(start, steps):
        state, loss = step(state, make_batch(i), jax.random.fold_in(root, i), i)
        losses.append(loss)
        bar.update(1)
        if i % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(np.asarray(losses[-20:])):.4f}")
        if (i + 1) % cfg.checkpoint_every == 0 or i + 1 == steps:
            mngr.save(i + 1, args=ocp.args.StandardSave(state))
    bar.close()
    mngr.wait_until_finished()
    mngr.close()
    return state["ema" if ema else "params"], [float(x) for x in losses]


def latent_scale(cfg: PretrainConfig, vae, vae_params, metas, current: float, batches: int = 4) -> float:
    """The VAE's scaling_factor: --latent-scale if given; else, when this run trained the VAE, 1 / std of its
    posterior-mean latents over `batches` batches of scenes (phase 3's stream), LDM's rule (Rombach et al.
    2022, Sec. 4.3.2 and App. G: unit-variance latents, so the noise schedule's signal-to-noise ratios mean
    what they do for SD); else the starting VAE's (--init with --vae-steps 0 keeps the factor its UNet was
    trained at). The builder's 0.18215 is SD's factor for SD's VAE: this VAE's latents, scaled by it, vary
    with a std of ~0.2 per channel, so at every timestep the UNet saw ~25x less signal than SD's does."""
    import jax
    import jax.numpy as jnp

    if cfg.latent_scale > 0:
        return float(cfg.latent_scale)
    if cfg.vae_steps == 0:
        return float(current)
    moments = jax.jit(lambda p, x: vae.apply({"params": p}, x * 2.0 - 1.0, method="moments")[0])
    z = np.concatenate([np.asarray(moments(vae_params, jnp.asarray(batch_of_scenes(cfg, 3, i, metas)[0])))
                        for i in range(batches)])
    return float(f"{1.0 / float(np.std(z.astype(np.float64))):.5g}")


def min_snr_weights(alphas_cumprod: np.ndarray, gamma: float) -> np.ndarray:
    """Per-timestep weights of the epsilon loss: min(SNR_t, gamma) / SNR_t with SNR_t = abar_t / (1 - abar_t)
    (Min-SNR-gamma, Hang et al. 2023, Eq. 7 for epsilon prediction), so the nearly clean timesteps, which
    dominate the plain loss's gradients and shape only fine detail, stop crowding out the noisy ones that decide
    a scene's composition; gamma 0 gives ones (the plain DDPM loss)."""
    acp = np.asarray(alphas_cumprod, np.float64)
    if gamma == 0:
        return np.ones_like(acp)
    snr = acp / (1.0 - acp)
    return np.minimum(snr, gamma) / snr


def world_unet_config(base_config: dict, channels: tuple[int, ...]) -> dict:
    """The tiny builder's UNet config with other block widths (same levels, heads, cross-attention)."""
    if len(channels) != len(base_config["block_out_channels"]) or any(c % base_config["norm_num_groups"] for c in channels):
        raise SystemExit(f"--unet-channels {','.join(map(str, channels))}: need {len(base_config['block_out_channels'])} "
                         f"widths, each a multiple of {base_config['norm_num_groups']} (the GroupNorm groups)")
    return {**base_config, "block_out_channels": list(channels)}


def _work_dir(out: Path, cfg: PretrainConfig, log) -> Path:
    """The run's working folder (starting pipeline + Orbax checkpoints), `.<out>.work` beside `out`. A re-run
    with the same settings resumes from it (more --vae-steps/--unet-steps continue it); one with other
    settings (or a newer tiny builder) starts over instead of restoring checkpoints of another model (an Orbax
    tree-mismatch traceback before)."""
    from ddspo_jax.backbones.tiny import TINY_VERSION

    work = out.parent / f".{out.name}.work"
    # may change between a run and its resumption (guidance is only written to the folder)
    free = ("out", "checkpoint_every", "vae_steps", "unet_steps", "guidance")
    stamp = {**{k: v for k, v in dataclasses.asdict(cfg).items() if k not in free}, "tiny_version": TINY_VERSION}
    try:
        old = json.loads((work / "run.json").read_text())
    except (OSError, ValueError):
        old = None
    if work.exists() and old != stamp:
        changed = sorted(k for k in stamp if old is None or old.get(k) != stamp[k])
        log(f"pretrain: {work} holds a run with other settings ({', '.join(changed)}); starting over")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "run.json").write_text(json.dumps(stamp, sort_keys=True) + "\n")
    return work


def _build_base(base: Path, cfg: PretrainConfig) -> None:
    """The starting pipeline: the tiny builder's, its UNet re-made at --unet-channels (seeded the same way).
    Reused when finished; the width check catches a build killed between the two steps."""
    from ddspo_jax.convert import export_unet
    from ddspo_jax.convert.common import read_config
    from ddspo_jax.models.unet import UNet2DConditionModel
    from ddspo_jax.backbones import build_tiny_model
    from ddspo_jax.backbones.tiny import fill_params

    channels = tuple(int(c) for c in cfg.unet_channels.split(","))
    if (base / "model_index.json").is_file() and tuple(read_config(base / "unet")["block_out_channels"]) == channels:
        return
    shutil.rmtree(base, ignore_errors=True)
    build_tiny_model(base, "sd", seed=cfg.seed)
    ucfg = read_config(base / "unet")
    if tuple(ucfg["block_out_channels"]) != channels:
        ucfg = world_unet_config(ucfg, channels)
        export_unet(ucfg, fill_params(UNet2DConditionModel.from_config(ucfg).init_shapes(), cfg.seed), base / "unet")


def pretrain(cfg: PretrainConfig, log=print) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections

    from ddspo_jax.backbones import GENERATION_FILE, load_backbone
    from ddspo_jax.convert import export_clip_text, export_unet, export_vae
    from ddspo_jax.convert.common import read_config
    from ddspo_jax import parallel

    parallel.cpu_compute_memory(jax.default_backend())  # no mesh here; on CPU after cpu_host_setup: keep freed memory
    out = Path(cfg.out)
    work = _work_dir(out, cfg, log)
    base = Path(cfg.init) if cfg.init else work / "base"  # --init: continue from an earlier world model
    if not cfg.init:
        _build_base(base, cfg)
    metas = world_prompts.training_set(cfg.captions, cfg.seed, tuple(cfg.forms.split(",")))
    mcfg = ml_collections.ConfigDict(base_config().model.to_dict())
    mcfg.path, mcfg.dtype = str(base), "float32"
    bb = load_backbone(mcfg, base_config().schedule, text=True, vae=True, log=None)
    vae, scale = bb.vae, bb.vae.config.scaling_factor

    def vae_loss(p, images, key):
        x = images * 2.0 - 1.0
        mean, logvar = vae.apply({"params": p}, x, method="moments")
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        recon = vae.apply({"params": p}, z * scale, method="decode")
        kl = 0.5 * jnp.mean(jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
        return jnp.mean((recon - x) ** 2) + cfg.vae_kl * kl

    vae_params, vae_losses = _run_phase(
        "vae", cfg, cfg.vae_steps, bb.vae_params, vae_loss, lambda i: jnp.asarray(batch_of_scenes(cfg, 0, i, metas)[0]),
        work / "vae_ckpt", cfg.vae_lr, log)
    bb.vae_params = vae_params
    new_scale = latent_scale(cfg, vae, vae_params, metas, scale)
    log(f"pretrain: VAE scaling_factor {new_scale:.6g} (the starting pipeline's: {scale:.6g})")
    empty = bb.negative_cond(1)["prompt_embeds"][0]
    encode = jax.jit(lambda p, x: vae.apply({"params": p}, x * 2.0 - 1.0, method="encode") * (new_scale / scale))
    sched = bb.schedule

    text_model, empty_ids = bb.encoder.models[0], bb.encoder.tokenize([""])[0][0]

    def unet_batch(i):
        images, captions = batch_of_scenes(cfg, 1, i, metas)
        captions, drop = unet_captions(cfg, i, captions)
        z = encode(vae_params, jnp.asarray(images))
        if cfg.train_text_encoder:  # token ids; the loss runs the encoder it trains
            ids = np.where(drop[:, None], empty_ids, bb.encoder.tokenize(captions)[0][0])
            return {"z": z, "ids": jnp.asarray(ids)}
        emb = np.where(drop[:, None, None], empty[None], bb.encode(captions)["prompt_embeds"])
        return {"z": z, "c": jnp.asarray(emb)}

    weights = jnp.asarray(min_snr_weights(np.asarray(sched.alphas_cumprod), cfg.min_snr), jnp.float32)

    def unet_loss(p, b, key):
        kt, kn = jax.random.split(key)
        t = jax.random.randint(kt, (b["z"].shape[0],), 0, sched.num_train_timesteps)
        noise = jax.random.normal(kn, b["z"].shape)
        c = b.get("c")
        if cfg.train_text_encoder:
            p, c = p["unet"], text_model.apply({"params": p["text"]}, b["ids"])["last_hidden_state"]
        pred = bb.denoise(p, sched.add_noise(b["z"], noise, t), sched.model_timestep(t), {"prompt_embeds": c})
        if not cfg.min_snr:  # the shipped model's exact loss expression, so the defaults rebuild it bit for bit
            return jnp.mean((pred - noise) ** 2)
        return jnp.mean(weights[t] * jnp.mean((pred - noise) ** 2, axis=(1, 2, 3)))

    start = {"unet": bb.params, "text": bb.encoder.params[0]} if cfg.train_text_encoder else bb.params
    unet_params, unet_losses = _run_phase("unet", cfg, cfg.unet_steps, start, unet_loss, unet_batch,
                                          work / "unet_ckpt", cfg.unet_lr, log, ema=cfg.ema)
    text_params = None
    if cfg.train_text_encoder:
        unet_params, text_params = unet_params["unet"], unet_params["text"]
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp, ignore=shutil.ignore_patterns("ddspo_tiny.json"))
    export_vae({**read_config(base / "vae"), "scaling_factor": new_scale}, jax.tree.map(np.asarray, vae_params),
               tmp / "vae")
    export_unet(read_config(base / "unet"), jax.tree.map(np.asarray, unet_params), tmp / "unet")
    if text_params is not None:
        export_clip_text(read_config(base / "text_encoder"), jax.tree.map(np.asarray, text_params),
                         tmp / "text_encoder")
    (tmp / GENERATION_FILE).write_text(json.dumps(WORLD_GENERATION | {"guidance": cfg.guidance}, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    summary = {"out": str(out), "vae_steps": cfg.vae_steps, "unet_steps": cfg.unet_steps,
               "vae_loss_first": float(np.mean(vae_losses[:20])) if vae_losses else None,
               "vae_loss_last": float(np.mean(vae_losses[-20:])) if vae_losses else None,
               "unet_loss_first": float(np.mean(unet_losses[:20])) if unet_losses else None,
               "unet_loss_last": float(np.mean(unet_losses[-20:])) if unet_losses else None}
    log(f"pretrain: world model written to {out} ({summary})")
    return summary


_HELP = {
    "vae_steps": "VAE training steps (0: keep the VAE as built, or --init's)",
    "unet_steps": "UNet training steps",
    "batch": "scenes per step",
    "vae_kl": "weight of the VAE's KL term (larger: noisier posteriors, a decoder robust to latent noise)",
    "vae_lr": "VAE AdamW peak lr", "unet_lr": "UNet AdamW peak lr",
    "warmup": "linear warmup steps (at most a tenth of a phase)",
    "lr_floor": "cosine decay after warmup to lr_floor x lr at the last step (1.0: constant)",
    "ema": "UNet weight EMA decay exported instead of the last iterate (0: off)",
    "caption_dropout": "fraction of empty captions (classifier-free guidance)",
    "caption_fragments": "fraction of captions with 40-70 %% of their words removed (DDSPO's c-: trained on, "
                         "f(c-) predicts what the fragment leaves open instead of an out-of-distribution guess)",
    "scene_noise": "fraction of the UNet's training scenes that differ from their caption in one respect (an "
                   "object left out, a colour changed or exchanged, a relation mirrored), as web alt-text differs "
                   "from its image",
    "mismatch_kinds": "comma-separated mismatches --scene-noise draws from (omit, recolour, swap_colours, flip; "
                      "omit alone: a model that leaves objects out, as SD does)",
    "train_text_encoder": "train the (random) CLIP text encoder jointly with the UNet at --unet-lr (default: "
                          "frozen, as the shipped model)",
    "checkpoint_every": "steps between Orbax checkpoints (a re-run resumes from the latest)",
    "captions": "training captions drawn (world.prompts.training_set)",
    "seed": "seed of the captions, scenes, noise and the tiny builder's initial weights",
    "resolution": "scene pixels (the VAE is f4)",
    "forms": "comma-separated caption forms (world.prompts.FORMS) drawn for the captions",
    "min_snr": "Min-SNR-gamma weighting of the UNet's epsilon loss (0: off, the plain DDPM loss)",
    "unet_channels": "the UNet's block widths, comma-separated (the tiny builder's 32,64; more is slower)",
    "latent_scale": "the VAE's scaling_factor (0: 1/std of its latents when this run trains the VAE, as LDM; "
                    "else the starting VAE's)",
    "guidance": "the CFG scale the folder recommends (ddspo_generation.json; its family's default is SD's 7.5)",
    "init": "a world-model folder to start both phases from instead of the tiny builder's random weights",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = PretrainConfig(out="")
    p.add_argument("--out", required=True, help="the diffusers pipeline folder to write")
    for f in dataclasses.fields(PretrainConfig):
        if f.name != "out":
            v = getattr(d, f.name)
            if isinstance(v, bool):  # a switch: --train-text-encoder
                p.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", help=_HELP[f.name])
                continue
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(v), default=v,
                           help=f"{_HELP[f.name]} (default {v!r})")


def _check_names(flag: str, value: str, allowed) -> None:
    """A comma-separated flag whose every name must be one of `allowed`: one line naming the flag if not."""
    bad = [x for x in value.split(",") if x not in allowed]
    if bad:
        raise SystemExit(f"--{flag} {value!r}: {', '.join(b or 'empty' for b in bad)} not among {', '.join(allowed)}")


def from_args(args) -> PretrainConfig:
    """The config, with the flags a user can get wrong checked here (one clear line, not a traceback)."""
    _check_names("forms", args.forms, world_prompts.FORMS)
    _check_names("mismatch-kinds", args.mismatch_kinds, scenes.MISMATCHES)
    try:
        widths = [int(c) for c in args.unet_channels.split(",")]
    except ValueError:
        widths = []
    if not widths or min(widths) <= 0:
        raise SystemExit(f"--unet-channels {args.unet_channels!r}: not comma-separated positive integers")
    if args.min_snr < 0:
        raise SystemExit(f"--min-snr {args.min_snr!r}: gamma must be >= 0 (0: the plain DDPM loss)")
    for name in ("vae_steps", "unet_steps", "warmup", "captions", "seed"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 0")
    for name in ("caption_dropout", "caption_fragments", "scene_noise"):
        if not 0 <= getattr(args, name) <= 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: a fraction, must be in [0, 1]")
    for name in ("batch", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.resolution < 16 or args.resolution % 8:
        raise SystemExit(f"--resolution {args.resolution}: must be a multiple of 8, at least 16 (the VAE downsamples)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise SystemExit(f"--out {args.out} is an existing file; name a folder")
    if args.init and not (Path(args.init) / "model_index.json").is_file():
        raise SystemExit(f"--init {args.init!r} is not a world-model folder (no model_index.json there)")
    return PretrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PretrainConfig)})
