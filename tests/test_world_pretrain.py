"""A few-step world-model pretrain: the VAE learns (its loss falls), the UNet phase runs, the folder is an
ordinary diffusers pipeline, batches are a pure function of (seed, phase, step) and a re-run resumes."""

from __future__ import annotations

import numpy as np
import pytest

from ddspo_jax.world import pretrain


@pytest.mark.slow  # ~2 min on 2 cores (three pretrain calls, each compiling the VAE and UNet steps)
def test_few_step_pretrain_resumes_and_writes_a_diffusers_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = pretrain.PretrainConfig(out=str(tmp_path / "model"), vae_steps=30, unet_steps=3, batch=4,
                                  checkpoint_every=10, captions=50)
    logs = []
    s = pretrain.pretrain(cfg, log=logs.append)
    assert s["vae_loss_last"] < 0.6 * s["vae_loss_first"], s
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model", safety_checker=None)
    assert pipe.unet.config.sample_size == 16 and pipe.vae.config.latent_channels == 4
    # the written scaling_factor is LDM's 1 / std of the trained VAE's latents, here from diffusers' encoder
    import torch

    from ddspo_jax.world.prompts import training_set

    metas = training_set(cfg.captions, cfg.seed, tuple(cfg.forms.split(",")))
    x = np.concatenate([pretrain.batch_of_scenes(cfg, 3, i, metas)[0] for i in range(4)])
    with torch.no_grad():
        z = pipe.vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2) * 2 - 1).latent_dist.mean.double()
    assert pipe.vae.config.scaling_factor == pytest.approx(1.0 / float(z.std(correction=0)), rel=1e-3)
    assert any(f"VAE scaling_factor {pipe.vae.config.scaling_factor:.6g}" in m for m in logs)
    from ddspo_jax.backbones import folder_generation_defaults  # the folder carries its CFG scale

    assert folder_generation_defaults(tmp_path / "model") == {"sampler": "ddim", "steps": 20,
                                                              "guidance": cfg.guidance}
    cfg.vae_steps, cfg.unet_steps = 30, 5  # the VAE phase is done; the UNet phase resumes at 3
    pretrain.pretrain(cfg, log=logs.append)
    assert any("pretrain vae: resumed at step 30" in m for m in logs) and any("unet: resumed at step 3" in m
                                                                                 for m in logs)
    # the resumed run equals one run straight to 5 steps, bit for bit (how the shipped model was made: its
    # 16000 UNet steps in resumed pieces of 8000 + 4000 + 4000)
    from safetensors.numpy import load_file

    straight = pretrain.PretrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "straight")})
    pretrain.pretrain(straight, log=lambda *_: None)
    for part in ("unet", "vae"):
        a = load_file(tmp_path / "model" / part / "diffusion_pytorch_model.safetensors")
        b = load_file(tmp_path / "straight" / part / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), part


@pytest.mark.slow  # ~1 min: one short pretrain from the shipped model
def test_train_text_encoder_exports_a_trained_encoder_the_pipeline_uses(tmp_path):
    """--train-text-encoder: the UNet phase also trains the CLIP text encoder (from --init's), the folder
    holds the new encoder, and the pipeline's prompt embeddings come from it (diffusers reads it)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.numpy import load_file

    from ddspo_jax.configs.world import WORLD_MODEL

    cfg = pretrain.PretrainConfig(out=str(tmp_path / "model"), vae_steps=0, unet_steps=3, batch=4, captions=50,
                                  init=str(WORLD_MODEL), train_text_encoder=True, unet_lr=1e-2, warmup=0)
    pretrain.pretrain(cfg, log=lambda *_: None)
    old = load_file(WORLD_MODEL / "text_encoder" / "model.safetensors")
    new = load_file(tmp_path / "model" / "text_encoder" / "model.safetensors")
    assert old.keys() == new.keys() and any(not np.array_equal(old[k], new[k]) for k in old)  # it trained
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model", safety_checker=None)
    ref = StableDiffusionPipeline.from_pretrained(WORLD_MODEL, safety_checker=None)
    with torch.no_grad():
        a = pipe.encode_prompt(["a red circle"], "cpu", 1, False)[0]
        b = ref.encode_prompt(["a red circle"], "cpu", 1, False)[0]
    assert (a - b).abs().max() > 1e-4


def test_a_rerun_with_other_settings_starts_over_and_one_with_the_same_resumes(tmp_path):
    """The work folder keeps its checkpoints for the same settings (and more steps), and is cleared, with a
    line naming what changed, for other ones (restoring another model's checkpoints failed in Orbax before)."""
    out, logs = tmp_path / "model", []
    cfg = pretrain.PretrainConfig(out=str(out))
    work = pretrain._work_dir(out, cfg, logs.append)
    (work / "unet_ckpt").mkdir()
    cfg.unet_steps += 1000
    assert pretrain._work_dir(out, cfg, logs.append) == work and (work / "unet_ckpt").is_dir() and not logs
    cfg.unet_channels = "48,96"
    pretrain._work_dir(out, cfg, logs.append)
    assert not (work / "unet_ckpt").exists() and logs == [f"pretrain: {work} holds a run with other settings "
                                                          "(unet_channels); starting over"]
    (work / "run.json").unlink()  # a work folder from before run.json: starts over too
    (work / "vae_ckpt").mkdir()
    pretrain._work_dir(out, cfg, logs.append)
    assert not (work / "vae_ckpt").exists() and len(logs) == 2


def test_batches_are_a_pure_function_of_seed_phase_step():
    from ddspo_jax.world.prompts import training_set

    cfg = pretrain.PretrainConfig(out="", batch=3)
    metas = training_set(20)
    a, ca = pretrain.batch_of_scenes(cfg, 1, 7, metas)
    b, cb = pretrain.batch_of_scenes(cfg, 1, 7, metas)
    c, _ = pretrain.batch_of_scenes(cfg, 1, 8, metas)
    assert ca == cb and np.array_equal(a, b) and not np.array_equal(a, c)


def test_caption_fragments_replace_a_share_of_kept_captions_by_random_removals():
    """--caption-fragments: about that share of the non-dropped captions become DDSPO's random-removal
    fragments of themselves (words kept in order, 40-70 % gone); the dropout draw is the one the defaults make
    (the shipped model's run), and the defaults change no caption."""
    from ddspo_jax.data.perturb import random_removal

    caps = [f"a photo of two red circles and {i} blue squares" for i in range(64)]
    base = pretrain.PretrainConfig(out="", batch=64)
    frag = pretrain.PretrainConfig(out="", batch=64, caption_fragments=0.3)
    n_frag = 0
    for step in range(20):
        same, drop0 = pretrain.unet_captions(base, step, caps)
        out, drop = pretrain.unet_captions(frag, step, caps)
        assert same == caps and np.array_equal(drop0, np.random.default_rng([0, 2, step]).random(64) < 0.1)
        assert np.array_equal(drop, drop0)
        for j, (c, o) in enumerate(zip(caps, out)):
            if o != c:
                assert not drop[j] and o == random_removal(c, seed=0, index=step * 64 + j)
                words = c.split()
                assert 0.3 <= 1 - len(o.split()) / len(words) <= 0.75  # 40-70 % of 10 words, rounded
                n_frag += 1
    kept = 20 * 64 * 0.9
    assert 0.25 * kept < n_frag < 0.35 * kept


def test_ema_phase_returns_the_moving_average_of_the_iterates(tmp_path):
    """--ema: the phase returns e_i = d_i e_{i-1} + (1 - d_i) p_i with d_i = min(ema, (1 + i) / (10 + i)), the
    iterates p_i recomputed here with the phase's optimizer; without EMA it returns the last iterate."""
    import jax
    import jax.numpy as jnp
    import optax

    cfg = pretrain.PretrainConfig(out="", warmup=2, checkpoint_every=100, lr_floor=0.1)
    target = jnp.arange(3.0)
    loss = lambda p, b, k: jnp.sum((p["w"] - target * b) ** 2)  # noqa: E731
    batch = lambda i: 1.0 + i  # noqa: E731
    quiet = lambda m: None  # noqa: E731
    ema_p, _ = pretrain._run_phase("q", cfg, 6, {"w": jnp.zeros(3)}, loss, batch, tmp_path / "a", 0.1, quiet, ema=0.5)
    last, _ = pretrain._run_phase("q", cfg, 6, {"w": jnp.zeros(3)}, loss, batch, tmp_path / "b", 0.1, quiet)
    opt = pretrain._optimizer(0.1, 0, 6, 0.1)  # warmup = min(2, 6 // 10) = 0, as the phase computes it
    p, state, e = {"w": jnp.zeros(3)}, None, np.zeros(3)
    state = opt.init(p)
    for i in range(6):
        g = jax.grad(loss)(p, batch(i), None)
        u, state = opt.update(g, state, p)
        p = optax.apply_updates(p, u)
        d = min(0.5, (1 + i) / (10 + i))
        e = d * e + (1 - d) * np.asarray(p["w"])
    np.testing.assert_allclose(np.asarray(last["w"]), np.asarray(p["w"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ema_p["w"]), e, rtol=1e-6)
    assert not np.allclose(e, np.asarray(p["w"]))


@pytest.mark.parametrize("argv, words", [(["--forms", "compound,colourful"], "--forms 'compound,colourful'"),
                                         (["--init", "/no/such/model"], "--init '/no/such/model'"),
                                         (["--unet-channels", "48,x"], "--unet-channels '48,x'"),
                                         (["--min-snr", "-5"], "--min-snr -5.0"),
                                         (["--scene-noise", "1.5"], "--scene-noise 1.5"),
                                         (["--mismatch-kinds", "omit,blur"], "--mismatch-kinds 'omit,blur'")])
def test_bad_flags_are_one_line_naming_the_flag(argv, words, tmp_path, capsys):
    from ddspo_jax.world.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--out", str(tmp_path / "m")] + argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: ") and words in err and len(err.splitlines()) == 1, err


def test_unet_channels_builds_a_wider_unet_diffusers_loads(tmp_path):
    """--unet-channels re-makes the starting UNet at other widths: diffusers builds the same model from the
    written config (same parameter count) and loads the written weights without missing or unexpected keys."""
    import torch
    from diffusers import UNet2DConditionModel

    cfg = pretrain.PretrainConfig(out="", unet_channels="48,96")
    pretrain._build_base(tmp_path / "base", cfg)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "base" / "unet")
    assert list(unet.config.block_out_channels) == [48, 96]
    fresh = UNet2DConditionModel.from_config(unet.config)
    assert sum(p.numel() for p in unet.parameters()) == sum(p.numel() for p in fresh.parameters()) > 1.5e6
    out = unet(torch.zeros(1, 4, 16, 16), 10, torch.zeros(1, 77, 32)).sample
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()
    with pytest.raises(SystemExit, match="multiple of 8"):
        pretrain.world_unet_config(dict(unet.config), (40, 100))



@pytest.mark.parametrize("gamma", [5.0, 1.0])
def test_min_snr_weights_equal_diffusers_training_recipe(gamma):
    """--min-snr: the per-timestep weights equal diffusers' own recipe (training_utils.compute_snr on the world
    model's DDPM scheduler, then min(SNR, gamma) / SNR as its text-to-image script weights epsilon), and gamma 0
    is the plain loss."""
    from pathlib import Path

    import torch
    from diffusers import DDIMScheduler
    from diffusers.training_utils import compute_snr

    folder = Path(pretrain.__file__).parent / "model" / "scheduler"
    sched = DDIMScheduler.from_pretrained(folder)
    t = torch.arange(sched.config.num_train_timesteps)
    snr = compute_snr(sched, t)
    want = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr
    got = pretrain.min_snr_weights(sched.alphas_cumprod.numpy(), gamma)
    np.testing.assert_allclose(got, want.double().numpy(), rtol=1e-5)
    assert got[0] < 0.01 and got[-1] == 1.0  # nearly clean steps weigh little, noisy ones fully
    assert np.array_equal(pretrain.min_snr_weights(sched.alphas_cumprod.numpy(), 0.0), np.ones(len(t)))


def test_scene_noise_draws_that_share_of_unet_scenes_for_a_mismatched_caption(monkeypatch):
    """--scene-noise: about that share of the UNet phase's scenes are rendered for scenes.mismatch's copy of
    the caption's metadata while the caption is kept; the VAE phase and the defaults draw exactly the scenes
    they drew before (whether and how to mismatch is drawn from a stream of its own)."""
    from ddspo_jax.world import scenes
    from ddspo_jax.world.prompts import training_set

    metas = training_set(40)
    seen = []
    real = scenes.render_for
    monkeypatch.setattr(scenes, "render_for", lambda meta, rng, res: (seen.append(meta), real(meta, rng, res))[1])
    base = pretrain.PretrainConfig(out="", batch=32)
    noisy = pretrain.PretrainConfig(out="", batch=32, scene_noise=0.3)
    mismatched = 0
    for step in range(10):
        seen.clear()
        a, ca = pretrain.batch_of_scenes(base, 1, step, metas)
        assert not any("mismatch" in m for m in seen)
        seen.clear()
        b, cb = pretrain.batch_of_scenes(noisy, 1, step, metas)
        assert cb == [m["prompt"] for m in seen]  # each scene keeps its caption, mismatched or not
        mismatched += sum("mismatch" in m for m in seen)
        v0, _ = pretrain.batch_of_scenes(base, 0, step, metas)
        v1, _ = pretrain.batch_of_scenes(noisy, 0, step, metas)
        assert np.array_equal(v0, v1)
    allowing = 0.95  # training captions almost all allow a mismatch (a single uncoloured object is not one)
    assert 0.2 * 320 * allowing < mismatched < 0.4 * 320, mismatched
