"""A few-step world-model pretrain: the VAE learns (its loss falls), the UNet phase runs, the folder is an
ordinary diffusers pipeline, batches are a pure function of (seed, phase, step) and a re-run resumes."""

from __future__ import annotations

import numpy as np
import pytest

from ddspo_jax.world import pretrain


@pytest.mark.slow  # ~1.5 min on 2 cores (two pretrain calls, each compiling the VAE and UNet steps)
def test_few_step_pretrain_resumes_and_writes_a_diffusers_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = pretrain.PretrainConfig(out=str(tmp_path / "model"), vae_steps=30, unet_steps=3, batch=4,
                                  checkpoint_every=10, captions=50)
    logs = []
    s = pretrain.pretrain(cfg, log=logs.append)
    assert s["vae_loss_last"] < 0.6 * s["vae_loss_first"], s
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "model", safety_checker=None)
    assert pipe.unet.config.sample_size == 16 and pipe.vae.config.latent_channels == 4
    cfg.vae_steps, cfg.unet_steps = 30, 5  # the VAE phase is done; the UNet phase resumes at 3
    pretrain.pretrain(cfg, log=logs.append)
    assert any("pretrain vae: resumed at step 30" in m for m in logs) and any("unet: resumed at step 3" in m
                                                                                 for m in logs)


def test_batches_are_a_pure_function_of_seed_phase_step():
    from ddspo_jax.world.prompts import training_set

    cfg = pretrain.PretrainConfig(out="", batch=3)
    metas = training_set(20)
    a, ca = pretrain.batch_of_scenes(cfg, 1, 7, metas)
    b, cb = pretrain.batch_of_scenes(cfg, 1, 7, metas)
    c, _ = pretrain.batch_of_scenes(cfg, 1, 8, metas)
    assert ca == cb and np.array_equal(a, b) and not np.array_equal(a, c)
