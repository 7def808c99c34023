"""Noise schedules as pure, jittable functions: forward noising, training targets, timestep
sampling and single sampler steps.

Two families behind one small interface (`add_noise`, `training_target`, `model_timestep`):
- `DDPMSchedule`: discrete T-step DDPM as SD-1.x/SDXL use it (`scaled_linear` betas 0.00085 -> 0.012),
  epsilon or v prediction;
- `FlowSchedule`: rectified flow as SANA uses it, x_t = (1 - s) x_0 + s * eps, velocity eps - x_0,
  with the shift s' = k s / (1 + (k - 1) s).
Each is checked against the matching diffusers scheduler in tests/test_schedules.py.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def _bcast(v, x):
    """Per-sample scalars [B] -> broadcastable against x [B, ...]."""
    return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim))


# ----------------------------------------------------------------------------------------- DDPM


@dataclasses.dataclass(frozen=True)
class DDPMSchedule:
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"
    kind = "ddpm"

    @property
    def alphas_cumprod(self) -> jnp.ndarray:
        # As diffusers: float32 betas, float32 cumulative product.
        T = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=np.float32) ** 2
        elif self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, T, dtype=np.float32)
        else:
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r} (scaled_linear | linear)")
        return jnp.asarray(np.cumprod(1.0 - betas, dtype=np.float32))

    def _ab(self, t, x):
        acp = self.alphas_cumprod[t]
        return _bcast(jnp.sqrt(acp), x).astype(x.dtype), _bcast(jnp.sqrt(1.0 - acp), x).astype(x.dtype)

    def add_noise(self, x0, noise, t):
        """q(x_t | x_0) = N(sqrt(acp_t) x_0, (1 - acp_t) I); t integer [B]."""
        a, s = self._ab(t, x0)
        return a * x0 + s * noise

    def training_target(self, x0, noise, t):
        """What the model is trained to predict: the noise, or v = sqrt(acp) eps - sqrt(1-acp) x_0."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            a, s = self._ab(t, x0)
            return a * noise - s * x0
        raise ValueError(f"unknown prediction_type {self.prediction_type!r} (epsilon | v_prediction)")

    def model_timestep(self, t):
        """The timestep value the denoiser is called with."""
        return t

    def to_x0_eps(self, x_t, pred, t):
        """Model output -> (predicted x_0, predicted noise)."""
        a, s = self._ab(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - s * pred) / a, pred
        return a * x_t - s * pred, a * pred + s * x_t

    # -- sampling ---------------------------------------------------------------------------
    def ddim_timesteps(self, num_steps: int, steps_offset: int = 1) -> np.ndarray:
        """diffusers' "leading" spacing (SD's scheduler config: steps_offset=1)."""
        ratio = self.num_train_timesteps // num_steps
        return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int32) + steps_offset

    def ddim_step(self, pred, t, t_prev, x_t, *, set_alpha_to_one: bool = False):
        """One deterministic DDIM step (eta = 0) from t to t_prev (t_prev < 0 means the end)."""
        acp = self.alphas_cumprod
        final = jnp.float32(1.0) if set_alpha_to_one else acp[0]
        a_prev = jnp.where(t_prev >= 0, acp[jnp.maximum(t_prev, 0)], final)
        x0, eps = self.to_x0_eps(x_t, pred, t)
        a_prev = _bcast(jnp.asarray(a_prev), x_t).astype(x_t.dtype)
        return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps

    def pndm_prev_sample(self, x_t, pred, t, t_prev, *, set_alpha_to_one: bool = False):
        """PNDM's transfer x_t -> x_{t_prev} (its eq. 9) for an (already multistep-combined) prediction."""
        acp = self.alphas_cumprod
        a = acp[t]
        a_prev = jnp.where(t_prev >= 0, acp[jnp.maximum(t_prev, 0)], jnp.float32(1.0) if set_alpha_to_one else acp[0])
        if self.prediction_type == "v_prediction":
            pred = jnp.sqrt(a) * pred + jnp.sqrt(1.0 - a) * x_t
        denom = a * jnp.sqrt(1.0 - a_prev) + jnp.sqrt(a * (1.0 - a) * a_prev)
        return jnp.sqrt(a_prev / a) * x_t - (a_prev - a) * pred / denom

    def euler_sigmas(self, num_steps: int, steps_offset: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps [S], sigmas [S+1]) as diffusers' EulerDiscreteScheduler with "leading" spacing (SDXL's
        config): sigma = sqrt((1 - acp) / acp) interpolated linearly at the timesteps, then a final 0."""
        ratio = self.num_train_timesteps // num_steps
        ts = (np.arange(num_steps) * ratio).round()[::-1].astype(np.float32) + steps_offset
        acp = np.asarray(self.alphas_cumprod)
        sig = np.interp(ts, np.arange(len(acp)), ((1 - acp) / acp) ** 0.5)
        return ts, np.append(sig, 0.0).astype(np.float32)

    def euler_step(self, pred, sigma, sigma_next, x):
        """One Euler step of the variance-exploding ODE in sigma (diffusers' EulerDiscreteScheduler, no churn).

        `x` is the sigma-scaled sample; the model saw x / sqrt(sigma^2 + 1)."""
        if self.prediction_type == "epsilon":
            derivative = pred
        else:  # v: x0 = -sigma/sqrt(sigma^2+1) v + x/(sigma^2+1)
            x0 = pred * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
            derivative = (x - x0) / sigma
        return x + derivative * (sigma_next - sigma)

    def sample_timesteps(self, key, shape, method: str = "uniform"):
        """Training timesteps: uniform over {0..T-1}, or p(t) ∝ 1 - t/(T-1) ("linear"),
        or p(t) ∝ 1/(1 + exp(-20 (t/T - 0.7))) ("sigmoid") as the authors' release offers."""
        T = self.num_train_timesteps
        if method == "uniform":
            return jax.random.randint(key, shape, 0, T)
        t = jnp.arange(T, dtype=jnp.float32)
        if method == "linear":
            logits = jnp.log(jnp.maximum(1.0 - t / (T - 1), 1e-30))
        elif method == "sigmoid":
            logits = -jnp.log1p(jnp.exp(-20.0 * (t / T - 0.7)))
        else:
            raise ValueError(f"DDPM timestep_sampling must be uniform | linear | sigmoid, got {method!r}")
        return jax.random.categorical(key, logits, shape=shape).astype(jnp.int32)

    def loss_weight(self, t, kind: str = "none"):
        if kind == "none":
            return jnp.ones(t.shape, jnp.float32)
        if kind == "linear":
            return t.astype(jnp.float32) / (self.num_train_timesteps - 1)
        raise ValueError(f"loss_weighting must be none | linear, got {kind!r}")


# ----------------------------------------------------------------------------------------- flow


def shift_sigma(s, shift: float):
    """SANA/SD3 timestep shift: s' = k s / (1 + (k - 1) s)."""
    return shift * s / (1.0 + (shift - 1.0) * s)


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow. `shift` shapes the sampling sigmas (SANA: 3.0); `train_shift` the training timesteps —
    1.0 (uniform sigma) by default, as the authors' release trains SANA: its adapter builds
    FlowMatchEulerDiscreteScheduler from SANA's scheduler config, whose `flow_shift` key it does not read."""

    num_train_timesteps: int = 1000
    shift: float = 3.0
    train_shift: float = 1.0
    kind = "flow"

    def add_noise(self, x0, noise, s):
        """x_s = (1 - s) x_0 + s eps, with s in [0, 1] per sample."""
        s = _bcast(s, x0).astype(x0.dtype)
        return (1.0 - s) * x0 + s * noise

    def training_target(self, x0, noise, s):
        """Velocity eps - x_0 (what SANA predicts)."""
        del s
        return noise - x0

    def model_timestep(self, s):
        return s * self.num_train_timesteps

    def to_x0_eps(self, x_t, v, s):
        s = _bcast(s, x_t).astype(x_t.dtype)
        return x_t - s * v, x_t + (1.0 - s) * v

    def sample_timesteps(self, key, shape, method: str = "uniform", *, logit_mean=0.0, logit_std=1.0,
                         mode_scale=1.29):
        """Continuous s in (0, 1): uniform, logit-normal u = sigmoid(N(m, s)) or SD3's "mode" density,
        then the training shift (`train_shift`; 1 leaves u as it is)."""
        if method == "uniform":
            u = jax.random.uniform(key, shape)
        elif method == "logit_normal":
            u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, shape))
        elif method == "mode":
            u = jax.random.uniform(key, shape)
            u = 1.0 - u - mode_scale * (jnp.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
        else:
            raise ValueError(f"flow timestep_sampling must be uniform | logit_normal | mode, got {method!r}")
        return shift_sigma(u, self.train_shift)

    def loss_weight(self, s, kind: str = "none"):
        if kind == "none":
            return jnp.ones(s.shape, jnp.float32)
        if kind == "linear":
            return s.astype(jnp.float32)
        raise ValueError(f"loss_weighting must be none | linear, got {kind!r}")

    def sigmas(self, num_steps: int) -> np.ndarray:
        """Sampling sigmas as diffusers' FlowMatchEulerDiscreteScheduler sets them (with the final 0).

        diffusers spaces them linearly from 1 to the *shifted* smallest training sigma and then shifts
        again; we follow it so that trajectories match the scheduler users know."""
        T = self.num_train_timesteps
        s_min = shift_sigma(np.float32(1.0 / T), self.shift)
        s = np.linspace(1.0, s_min, num_steps)
        s = shift_sigma(s, self.shift)
        return np.append(s, 0.0).astype(np.float32)

    def euler_step(self, v, s, s_next, x_t):
        """x_{s_next} = x_s + (s_next - s) v."""
        return x_t + _bcast(jnp.asarray(s_next - s), x_t).astype(x_t.dtype) * v


def from_config(cfg) -> DDPMSchedule | FlowSchedule:
    """Schedule from the `schedule` config section."""
    if cfg.kind == "ddpm":
        return DDPMSchedule(cfg.num_train_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end,
                            cfg.prediction_type)
    return FlowSchedule(cfg.num_train_timesteps, cfg.flow_shift, cfg.train_flow_shift)


def sample_timesteps(schedule, key, shape, cfg):
    """Training timesteps for either family from the `schedule` config section."""
    if schedule.kind == "ddpm":
        return schedule.sample_timesteps(key, shape, cfg.timestep_sampling)
    return schedule.sample_timesteps(key, shape, cfg.timestep_sampling, logit_mean=cfg.logit_mean,
                                     logit_std=cfg.logit_std, mode_scale=cfg.mode_scale)
