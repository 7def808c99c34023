"""The one sampler: classifier-free-guided reverse diffusion as one jitted `lax.scan` (prepare and sample use it).

* Guidance: the conditional and unconditional passes are one batched denoiser call. The two halves are
  interleaved ([u0, c0, u1, c1, ...]) rather than concatenated, so when the batch axis is sharded every device
  already holds both halves of its own samples and the doubling needs no communication.
* The step loop is a `lax.scan` over per-step constants computed once on the host (numpy), so one compile
  serves every batch, and there is no Python in the loop.
* Samplers (each parity-tested against its diffusers scheduler in tests/test_sampling.py):
    ddim        DDIMScheduler, eta 0 (the tiny model's and many SD-1.x configs' scheduler)
    pndm        PNDMScheduler with skip_prk_steps (PLMS): SD-1.x's shipped default and the paper's SD sampler
    euler       EulerDiscreteScheduler (SDXL's default; "leading" spacing, steps_offset 1)
    flow_euler  FlowMatchEulerDiscreteScheduler (rectified flow, SANA-style schedules)
    flow_dpmpp_2m  DPMSolverMultistepScheduler(use_flow_sigmas, flow_prediction, dpmsolver++, order 2): SANA's
  each Backbone's `defaults` (reaching the sampler as arguments) names PNDM for SD-1.x (the paper's and the
  shipped pipelines' sampler), Euler for SDXL, DPM-Solver++ 2M for SANA;
  `prepare.sampler` / `sample --sampler` choose another.
* The schedule math lives in `schedules.py`; this module only sequences it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddspo_jax import parallel, schedules
from ddspo_jax.errors import ConfigError

SAMPLERS = ("ddim", "pndm", "euler", "flow_euler", "flow_dpmpp_2m")
FLOW_SAMPLERS = ("flow_euler", "flow_dpmpp_2m")

# denoise(params, x [N,H,W,C], t [N] (model timestep values), cond pytree with leading N) -> prediction
Denoise = Callable[[Any, jax.Array, jax.Array, Any], jax.Array]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-step constants of one sampler run: `xs` arrays with a leading step axis, scanned over."""

    sampler: str
    init_sigma: float  # initial latent = noise * init_sigma
    xs: dict[str, np.ndarray]

    @property
    def num_steps(self) -> int:
        return len(next(iter(self.xs.values())))

    @property
    def model_evals(self) -> int:
        return self.num_steps


_PLMS = (np.array([1.0, 0, 0, 0]), np.array([0.5, 0.5, 0, 0]), np.array([1.5, -0.5, 0, 0]),
         np.array([23.0, -16.0, 5.0, 0]) / 12.0, np.array([55.0, -59.0, 37.0, -9.0]) / 24.0)


def make_plan(schedule, sampler: str, steps: int, *, steps_offset: int = 1) -> Plan:
    """The step constants of `sampler` with `steps` steps on `schedule` (a DDPMSchedule or FlowSchedule)."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"sampler {sampler!r} is not one of {SAMPLERS}")
    if steps < 1:
        raise ConfigError(f"sampler steps must be >= 1, got {steps}")
    flow = isinstance(schedule, schedules.FlowSchedule)
    if flow != (sampler in FLOW_SAMPLERS):
        raise ConfigError(f"sampler {sampler!r} does not fit a {'flow' if flow else 'DDPM'} schedule "
                         f"({' | '.join(FLOW_SAMPLERS) if flow else 'ddim | pndm | euler'})")
    T = schedule.num_train_timesteps
    if sampler == "ddim":
        ts = schedule.ddim_timesteps(steps, steps_offset)
        return Plan(sampler, 1.0, {"t": ts, "t_prev": (ts - T // steps).astype(np.int32)})
    if sampler == "pndm":
        # diffusers' PLMS: the first timestep is evaluated twice (x_t, then the Euler-predicted x_{t-r}
        # re-anchored at t), so there are steps + 1 evaluations.
        r = T // steps
        base = (np.arange(steps) * r).round().astype(np.int64) + steps_offset
        ts = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        t_from, t_to = ts.copy(), ts - r
        if steps > 1:
            t_from[1], t_to[1] = ts[1] + r, ts[1]
        coef = np.stack([_PLMS[min(i, 4)] for i in range(len(ts))])
        n = len(ts)
        flag = lambda idx: np.isin(np.arange(n), idx)  # noqa: E731
        return Plan(sampler, 1.0, {"t": ts.astype(np.int32), "t_from": t_from.astype(np.int32),
                                   "t_to": t_to.astype(np.int32), "coef": coef.astype(np.float32),
                                   "use_saved": flag([1] if steps > 1 else []), "save": flag([0]),
                                   "append": ~flag([1] if steps > 1 else [])})
    if sampler == "euler":
        ts, sig = schedule.euler_sigmas(steps, steps_offset)
        # "leading" spacing: diffusers' init_noise_sigma is sqrt(sigma_max^2 + 1)
        return Plan(sampler, float(np.sqrt(sig.max() ** 2 + 1)), {"t": ts, "sigma": sig[:-1], "sigma_next": sig[1:]})
    if sampler == "flow_dpmpp_2m":
        return Plan(sampler, 1.0, dpmpp_2m_flow_plan(schedule, steps))
    sig = schedule.sigmas(steps)
    return Plan(sampler, 1.0, {"t": (sig[:-1] * T).astype(np.float32), "s": sig[:-1], "s_next": sig[1:]})


def dpmpp_2m_flow_plan(schedule, steps: int) -> dict[str, np.ndarray]:
    """DPM-Solver++ 2M on flow sigmas (SANA's sampler), as diffusers' `DPMSolverMultistepScheduler(
    use_flow_sigmas=True, prediction_type="flow_prediction", algorithm_type="dpmsolver++", solver_order=2,
    final_sigmas_type="zero")` steps: sigmas shifted from linspace(1, 1/T) (the model sees int(1000 sigma), the
    scheduler's int64 timesteps), alpha = 1 - sigma, lambda = log(alpha / sigma); x0 = x - sigma v; first order
    on the first and the last step (lower_order_final), else the midpoint second-order update
      x' = (s'/s) x + b x0 + (b / 2r) (x0 - x0_prev),  b = -alpha' (exp(-h) - 1),  h = lambda' - lambda,
      r = (lambda - lambda_prev) / h.
    The per-step constants are computed in float32, as the scheduler computes them on its float32 sigmas."""
    T, k = schedule.num_train_timesteps, schedule.shift
    alphas = np.linspace(1, 1 / T, steps + 1)
    sig = 1.0 - alphas
    sig = np.flip(schedules.shift_sigma(sig, k))[:-1].copy()
    t = (sig * T).astype(np.int64)
    sig = np.concatenate([sig, [0.0]]).astype(np.float32)
    with np.errstate(divide="ignore"):
        lam = np.log(1.0 - sig) - np.log(sig)  # +inf at the final sigma 0
    a, b, c2 = (np.zeros(steps, np.float32) for _ in range(3))
    for i in range(steps):
        s, s1 = sig[i], sig[i + 1]
        h = lam[i + 1] - lam[i]
        a[i] = s1 / s
        b[i] = -(1.0 - s1) * np.expm1(-h)
        if 0 < i < steps - 1:  # second order: the previous x0 exists and this is not the final step
            r = (lam[i] - lam[i - 1]) / h
            c2[i] = 0.5 * b[i] / r
    return {"t": t.astype(np.float32), "s": sig[:-1], "a": a, "b": b, "c2": c2}


def _interleave(a, b):
    """[N, ...], [N, ...] -> [2N, ...] as a0, b0, a1, b1 (keeps each sample's pair on its device)."""
    return jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:])


def guided_prediction(denoise: Denoise, params, x, t, cond, uncond, guidance: float):
    """pred_u + g (pred_c - pred_u) from one batched call (one plain call when guidance == 1)."""
    n = x.shape[0]
    if guidance == 1.0:
        return denoise(params, x, jnp.full((n,), t, jnp.float32), cond).astype(jnp.float32)
    both = jax.tree.map(_interleave, uncond, cond)
    pred = denoise(params, _interleave(x, x), jnp.full((2 * n,), t, jnp.float32), both).astype(jnp.float32)
    pred = pred.reshape((n, 2) + pred.shape[1:])
    pu, pc = pred[:, 0], pred[:, 1]
    return pu + guidance * (pc - pu)


def sample_loop(denoise: Denoise, params, noise, cond, uncond, *, schedule, plan: Plan, guidance: float,
                set_alpha_to_one: bool = False):
    """Pure and jittable: initial noise [N,H,W,C] -> final latents (float32). `uncond` must have the same
    leading N as `cond` (tile the empty-prompt conditioning)."""
    x = noise.astype(jnp.float32) * plan.init_sigma
    model = functools.partial(guided_prediction, denoise, params, cond=cond, uncond=uncond, guidance=guidance)
    xs = {k: jnp.asarray(v) for k, v in plan.xs.items()}

    if plan.sampler == "ddim":
        def body(x, s):
            pred = model(x, s["t"])
            return schedule.ddim_step(pred, s["t"], s["t_prev"], x, set_alpha_to_one=set_alpha_to_one), None
        carry = x
    elif plan.sampler == "euler":
        def body(x, s):
            pred = model(x / jnp.sqrt(s["sigma"] ** 2 + 1), s["t"])
            return schedule.euler_step(pred, s["sigma"], s["sigma_next"], x), None
        carry = x
    elif plan.sampler == "flow_dpmpp_2m":
        def body(c, s):
            x, prev = c
            x0 = x - s["s"] * model(x, s["t"])
            return (s["a"] * x + s["b"] * x0 + s["c2"] * (x0 - prev), x0), None
        carry = (x, jnp.zeros_like(x))
    elif plan.sampler == "flow_euler":
        def body(x, s):
            return schedule.euler_step(model(x, s["t"]), s["s"], s["s_next"], x), None
        carry = x
    else:  # pndm
        def body(c, s):
            x, saved, hist = c  # hist: the last three appended predictions, oldest first
            e = model(x, s["t"])
            k = s["coef"]
            eps = k[0] * e + k[1] * hist[2] + k[2] * hist[1] + k[3] * hist[0]
            base = jnp.where(s["use_saved"], saved, x)
            x_new = schedule.pndm_prev_sample(base, eps, s["t_from"], s["t_to"], set_alpha_to_one=set_alpha_to_one)
            saved = jnp.where(s["save"], x, saved)
            hist = jnp.where(s["append"], jnp.concatenate([hist[1:], e[None]]), hist)
            return (x_new, saved, hist), None
        carry = (x, jnp.zeros_like(x), jnp.zeros((3,) + x.shape, x.dtype))
    out, _ = jax.lax.scan(body, carry, xs)
    return out[0] if plan.sampler in ("pndm", "flow_dpmpp_2m") else out


def make_sampler(denoise: Denoise, schedule, *, sampler: str, steps: int, guidance: float, mesh=None,
                 steps_offset: int = 1, set_alpha_to_one: bool = False):
    """A jitted `f(params, noise, cond, uncond) -> latents` for one (sampler, steps, guidance).

    With `mesh`, one shard_map over its devices: the output is sharded over the batch like the inputs (place
    them with `shard_batch`; the batch a multiple of the mesh size)."""
    plan = make_plan(schedule, sampler, steps, steps_offset=steps_offset)
    fn = functools.partial(sample_loop, denoise, schedule=schedule, plan=plan, guidance=float(guidance),
                           set_alpha_to_one=set_alpha_to_one)
    if mesh is not None:  # per device (the batch split, weights replicated): a kernel GSPMD cannot partition
        # (Pallas' TPU flash attention, layers.attention) runs on each device's own rows
        fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(), parallel.BATCH, parallel.BATCH, parallel.BATCH),
                           out_specs=parallel.BATCH, check_vma=False)  # no collectives: rows are independent
    jitted = jax.jit(fn)
    jitted.plan = plan
    return jitted


def replicate(params, mesh):
    """Parameters replicated on every device of the mesh (sampling never shards weights)."""
    return jax.device_put(params, NamedSharding(mesh, P()))


def shard_batch(mesh, *trees):
    """Places host batches on the batch sharding (before the jit, so nothing is resharded inside).

    A mesh of this process's devices only (prepare's per-host sampling) takes the local batch as the whole
    batch; a global mesh assembles the global batch from every process's slice (parallel.put_batch)."""
    if all(d.process_index == jax.process_index() for d in mesh.devices.flat):
        return tuple(jax.device_put(t, parallel.batch_sharding(mesh)) for t in trees)
    return tuple(parallel.put_batch(t, mesh) for t in trees)


@functools.partial(jax.jit, static_argnames=("shape",))
def _noise(seed, indices, shape):
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), shape, jnp.float32))(indices)


def initial_noise(seed: int, indices, shape: tuple[int, ...]) -> np.ndarray:
    """Noise [len(indices), *shape] where row i depends only on (seed, indices[i]): results do not depend on
    how work is batched, sharded or resumed."""
    idx = np.asarray(indices, np.uint32)
    return np.asarray(_noise(jnp.uint32(seed), jnp.asarray(idx), tuple(int(s) for s in shape)))


# ------------------------------------------------------------------------ generation (prepare and sample)


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    return x if len(x) == n else np.concatenate([x, np.repeat(x[-1:], n - len(x), 0)])


class Generator:
    """Conditioning + initial noise -> latents with one compiled sampler, the batch padded to and sharded
    over the mesh's devices. Prepare (pairs) and sample (images) both generate through this."""

    def __init__(self, bb, settings: dict, mesh):
        self.bb, self.s, self.mesh = bb, settings, mesh
        self.sampler = make_sampler(bb.denoise, bb.schedule, sampler=settings["sampler"], steps=settings["steps"],
                                    guidance=settings["guidance"], mesh=mesh,
                                    steps_offset=settings["steps_offset"],
                                    set_alpha_to_one=settings["set_alpha_to_one"])
        self.uncond1 = bb.negative_cond(1)

    def noise(self, indices) -> np.ndarray:
        return initial_noise(self.s["seed"], indices, tuple(self.s["latent_shape"]))

    def __call__(self, params, cond: dict, noise: np.ndarray) -> np.ndarray:
        """Final latents [N, h, w, C] (float32, numpy); `params` already replicated (see `replicate`)."""
        n = len(noise)
        n_pad = -(-n // self.mesh.size) * self.mesh.size
        cond = {k: _pad(np.asarray(v), n_pad) for k, v in cond.items()}
        uncond = {k: np.repeat(v, n_pad, 0) for k, v in self.uncond1.items()}
        args = shard_batch(self.mesh, _pad(noise, n_pad), cond, uncond)
        return np.asarray(self.sampler(params, *args))[:n]
