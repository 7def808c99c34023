"""Schedules against diffusers' schedulers (float32, tight tolerance) and sampler densities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from ddspo_jax import schedules
from ddspo_jax.config import base_config

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_add_noise_matches_diffusers(beta_schedule):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((5, 8, 8, 4)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([0, 1, 250, 600, 999])
    kw = dict(SD, beta_schedule=beta_schedule)
    ours = schedules.DDPMSchedule(**kw)
    theirs = DDPMScheduler(**kw)
    np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), theirs.alphas_cumprod.numpy(), rtol=5e-6)
    got = jax.jit(ours.add_noise)(x0, noise, t)
    want = nhwc(theirs.add_noise(nchw(x0), nchw(noise), torch.from_numpy(t)))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    vel = ours.training_target(x0, noise, t)
    np.testing.assert_array_equal(np.asarray(vel), noise)
    v_ours = schedules.DDPMSchedule(**kw, prediction_type="v_prediction").training_target(x0, noise, t)
    v_want = nhwc(theirs.get_velocity(nchw(x0), nchw(noise), torch.from_numpy(t)))
    np.testing.assert_allclose(np.asarray(v_ours), v_want, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_trajectory_matches_diffusers(prediction_type):
    """A few full DDIM steps with a fixed fake model: same trajectory as DDIMScheduler.step."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
    theirs = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                           prediction_type=prediction_type)
    theirs.set_timesteps(10)
    ours = schedules.DDPMSchedule(**SD, prediction_type=prediction_type)
    ts = ours.ddim_timesteps(10)
    np.testing.assert_array_equal(ts, theirs.timesteps.numpy())
    step = jax.jit(ours.ddim_step)
    x_t, x_ref = jnp.asarray(x), nchw(x)
    for i, t in enumerate(ts):
        fake = np.tanh(np.asarray(x_t)) * 0.7  # any deterministic function of x
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        x_t = step(jnp.asarray(fake), jnp.full((2,), t), jnp.full((2,), t_prev), x_t)
        x_ref = theirs.step(nchw(fake), int(t), x_ref).prev_sample
        np.testing.assert_allclose(np.asarray(x_t), nhwc(x_ref), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matches_diffusers(shift):
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    ours = schedules.FlowSchedule(1000, shift)
    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    theirs.set_timesteps(20)
    np.testing.assert_allclose(ours.sigmas(20), theirs.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    # forward noising: scale_noise(x0, t, noise) at the scheduler's own timesteps
    for i in (0, 7, 19):
        t = theirs.timesteps[i]
        s = np.full((3,), ours.sigmas(20)[i], np.float32)
        want = nhwc(theirs.scale_noise(nchw(x0), t[None], nchw(noise)))
        np.testing.assert_allclose(np.asarray(ours.add_noise(x0, noise, s)), want, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ours.model_timestep(s)), float(t), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(ours.training_target(x0, noise, None)), noise - x0)
    # Euler trajectory
    sig = ours.sigmas(20)
    x_t, x_ref = jnp.asarray(noise), nchw(noise)
    theirs.set_timesteps(20)
    for i, t in enumerate(theirs.timesteps[:5]):
        v = np.sin(np.asarray(x_t))
        x_t = ours.euler_step(jnp.asarray(v), sig[i], sig[i + 1], x_t)
        x_ref = theirs.step(nchw(v), t, x_ref).prev_sample
        np.testing.assert_allclose(np.asarray(x_t), nhwc(x_ref), atol=1e-6)


def test_x0_eps_roundtrip():
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((4, 2, 2, 1)).astype(np.float32)
    noise = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([10, 200, 500, 900])
    for pt in ("epsilon", "v_prediction"):
        s = schedules.DDPMSchedule(prediction_type=pt)
        xt = s.add_noise(x0, noise, t)
        px0, peps = s.to_x0_eps(xt, s.training_target(x0, noise, t), t)
        np.testing.assert_allclose(np.asarray(px0), x0, atol=2e-4)
        np.testing.assert_allclose(np.asarray(peps), noise, atol=2e-5)
    f = schedules.FlowSchedule()
    sig = np.array([0.1, 0.3, 0.6, 0.9], np.float32)
    px0, peps = f.to_x0_eps(f.add_noise(x0, noise, sig), noise - x0, sig)
    np.testing.assert_allclose(np.asarray(px0), x0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(peps), noise, atol=1e-5)


def _empirical(samples, T):
    return np.bincount(np.asarray(samples), minlength=T) / samples.size


@pytest.mark.parametrize("method", ["uniform", "linear", "sigmoid"])
def test_ddpm_timestep_densities(method):
    T = 10
    s = schedules.DDPMSchedule(num_train_timesteps=T)
    got = _empirical(s.sample_timesteps(jax.random.key(0), (200_000,), method), T)
    t = np.arange(T)
    p = {"uniform": np.ones(T), "linear": 1 - t / (T - 1), "sigmoid": 1 / (1 + np.exp(-20 * (t / T - 0.7)))}[method]
    np.testing.assert_allclose(got, p / p.sum(), atol=5e-3)


def test_flow_timestep_sampling():
    f = schedules.FlowSchedule(shift=1.0)
    key = jax.random.key(0)
    u = np.asarray(f.sample_timesteps(key, (100_000,), "uniform"))
    assert abs(u.mean() - 0.5) < 0.01 and u.min() >= 0 and u.max() <= 1
    ln = np.asarray(f.sample_timesteps(key, (100_000,), "logit_normal", logit_mean=1.0, logit_std=0.5))
    z = np.log(ln / (1 - ln))
    assert abs(z.mean() - 1.0) < 0.01 and abs(z.std() - 0.5) < 0.01
    mode = np.asarray(f.sample_timesteps(key, (100_000,), "mode", mode_scale=1.29))
    assert mode.min() >= 0 and mode.max() <= 1
    # the shift moves mass to high noise: the median of shifted uniform is 3*0.5/(1+2*0.5) = 0.75
    shifted = np.asarray(schedules.FlowSchedule(train_shift=3.0).sample_timesteps(key, (100_000,), "uniform"))
    assert abs(np.median(shifted) - 0.75) < 0.01
    # the sampling shift (3.0, SANA's) leaves training timesteps uniform, as the release trains
    plain = np.asarray(schedules.FlowSchedule(shift=3.0).sample_timesteps(key, (100_000,), "uniform"))
    assert abs(np.median(plain) - 0.5) < 0.01
    with pytest.raises(ValueError, match="flow timestep_sampling"):
        f.sample_timesteps(key, (2,), "sigmoid")


def test_loss_weighting_and_from_config():
    cfg = base_config()
    s = schedules.from_config(cfg.schedule)
    assert isinstance(s, schedules.DDPMSchedule) and s.prediction_type == "epsilon"
    np.testing.assert_allclose(np.asarray(s.loss_weight(jnp.array([0, 999]), "linear")), [0.0, 1.0])
    cfg.schedule.kind = "flow"
    cfg.schedule.timestep_sampling = "logit_normal"
    f = schedules.from_config(cfg.schedule)
    assert isinstance(f, schedules.FlowSchedule) and f.shift == 3.0 and f.train_shift == 1.0
    t = schedules.sample_timesteps(f, jax.random.key(1), (8,), cfg.schedule)
    assert t.shape == (8,)
