"""Sampler parity with the diffusers schedulers (same trajectory in float32), guidance batching, sharding and
noise determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddspo_jax import parallel, sampling, schedules

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SD_SCHED = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading")
N, H, W, C, L, D = 4, 6, 6, 4, 5, 8


def fake_model(lib):
    """A deterministic, nonlinear stand-in denoiser written for both torch and jax (NHWC)."""
    def f(x, t, cond):
        c = cond.mean(axis=(1, 2)) if lib is jnp else cond.mean(dim=(1, 2))
        c = c.reshape((-1, 1, 1, 1))
        t = t.reshape((-1, 1, 1, 1)).astype(jnp.float32) if lib is jnp else t.reshape(-1, 1, 1, 1).float()
        return lib.tanh(0.7 * x + c) * lib.cos(t / 300.0) + 0.3 * x
    return f


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((N, H, W, C)).astype(np.float32)
    cond = rng.standard_normal((N, L, D)).astype(np.float32)
    uncond = np.repeat(rng.standard_normal((1, L, D)).astype(np.float32), N, 0)
    return noise, cond, uncond


def _diffusers_loop(scheduler, steps, noise, cond, uncond, guidance):
    f = fake_model(torch)
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(noise) * getattr(scheduler, "init_noise_sigma", 1.0)  # flow: none (1)
    c, u = torch.from_numpy(cond), torch.from_numpy(uncond)
    for t in scheduler.timesteps:
        xin = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        tt = torch.full((N,), float(t))
        pu, pc = f(xin, tt, u), f(xin, tt, c)
        x = scheduler.step(pu + guidance * (pc - pu), t, x).prev_sample
    return x.numpy(), len(scheduler.timesteps)


def _ours(schedule, sampler, steps, noise, cond, uncond, guidance):
    f = fake_model(jnp)
    run = sampling.make_sampler(lambda p, x, t, c: f(x, t, c), schedule, sampler=sampler, steps=steps,
                                guidance=guidance)
    return np.asarray(run(None, noise, cond, uncond)), run.plan


CASES = [
    ("ddim", lambda: diffusers.DDIMScheduler(**SD_SCHED), schedules.DDPMSchedule()),
    ("pndm", lambda: diffusers.PNDMScheduler(**{k: v for k, v in SD_SCHED.items() if k != "clip_sample"},
                                             skip_prk_steps=True), schedules.DDPMSchedule()),
    ("euler", lambda: diffusers.EulerDiscreteScheduler(**{k: v for k, v in SD_SCHED.items()
                                                          if k not in ("clip_sample", "set_alpha_to_one")}),
     schedules.DDPMSchedule()),
    ("flow_euler", lambda: diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
     schedules.FlowSchedule(1000, 3.0)),
    # SANA's sampler (the paper's App.: 20 steps, CFG 4.5), as SanaPipeline configures it
    ("flow_dpmpp_2m", lambda: diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0, algorithm_type="dpmsolver++",
        solver_order=2, num_train_timesteps=1000), schedules.FlowSchedule(1000, 3.0)),
]


@pytest.mark.parametrize("steps", [1, 3, 6])
@pytest.mark.parametrize("name,make,schedule", CASES, ids=[c[0] for c in CASES])
def test_parity_with_diffusers(name, make, schedule, steps):
    noise, cond, uncond = _inputs(steps)
    want, evals = _diffusers_loop(make(), steps, noise, cond, uncond, guidance=5.0)
    got, plan = _ours(schedule, name, steps, noise, cond, uncond, guidance=5.0)
    assert plan.model_evals == evals
    diff = float(np.abs(got - want).max())
    print(f"{name} steps={steps}: max abs diff {diff:.3g} (max |x| {np.abs(want).max():.3g})")
    assert diff <= 1e-5 * max(1.0, float(np.abs(want).max()))


def test_v_prediction_parity():
    noise, cond, uncond = _inputs(7)
    for name, cls in (("ddim", diffusers.DDIMScheduler), ("euler", diffusers.EulerDiscreteScheduler)):
        kw = {k: v for k, v in SD_SCHED.items() if name == "ddim" or k not in ("clip_sample", "set_alpha_to_one")}
        want, _ = _diffusers_loop(cls(**kw, prediction_type="v_prediction"), 4, noise, cond, uncond, 3.0)
        got, _ = _ours(schedules.DDPMSchedule(prediction_type="v_prediction"), name, 4, noise, cond, uncond, 3.0)
        assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max()), name


def test_one_batched_call_and_guidance_one():
    calls = []

    def denoise(p, x, t, c):
        calls.append(x.shape[0])
        return fake_model(jnp)(x, t, c)

    noise, cond, uncond = _inputs()
    x, t = jnp.asarray(noise), jnp.float32(500.0)
    got = sampling.guided_prediction(denoise, None, x, t, jnp.asarray(cond), jnp.asarray(uncond), 7.5)
    f = fake_model(jnp)
    pu, pc = f(x, jnp.full((N,), t), uncond), f(x, jnp.full((N,), t), cond)
    np.testing.assert_allclose(got, pu + 7.5 * (pc - pu), rtol=1e-6, atol=1e-6)
    assert calls == [2 * N]
    sampling.guided_prediction(denoise, None, x, t, jnp.asarray(cond), jnp.asarray(uncond), 1.0)
    assert calls[-1] == N  # no unconditional pass without guidance


@pytest.mark.parametrize("sampler,sched", [("ddim", "ddpm"), ("pndm", "ddpm"), ("euler", "ddpm"),
                                           ("flow_dpmpp_2m", "flow"), ("flow_euler", "flow")])
def test_sharded_equals_unsharded(sampler, sched):
    """The sampler on a mesh (a shard_map over the batch) gives the single-device result, every sampler (the
    multistep ones carry history through the scan)."""
    schedule = schedules.DDPMSchedule() if sched == "ddpm" else schedules.FlowSchedule()
    mesh = parallel.make_mesh()
    assert mesh.size == len(jax.devices())
    f = fake_model(jnp)
    denoise = lambda p, x, t, c: f(x, t, c) * p["scale"]  # noqa: E731
    n = 2 * mesh.size
    rng = np.random.default_rng(3)
    noise = rng.standard_normal((n, H, W, C)).astype(np.float32)
    cond = {"prompt_embeds": rng.standard_normal((n, L, D)).astype(np.float32)}
    uncond = {"prompt_embeds": np.zeros((n, L, D), np.float32)}
    params = {"scale": np.float32(0.9)}
    wrap = lambda p, x, t, c: denoise(p, x, t, c["prompt_embeds"])  # noqa: E731
    plain = sampling.make_sampler(wrap, schedule, sampler=sampler, steps=3, guidance=4.0)
    sharded = sampling.make_sampler(wrap, schedule, sampler=sampler, steps=3, guidance=4.0, mesh=mesh)
    args = sampling.shard_batch(mesh, noise, cond, uncond)
    out = sharded(sampling.replicate(params, mesh), *args)
    assert out.sharding.is_equivalent_to(parallel.batch_sharding(mesh), out.ndim)
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain(params, noise, cond, uncond)), rtol=1e-6, atol=1e-6)


def test_noise_depends_only_on_seed_and_index():
    a = sampling.initial_noise(5, [0, 1, 2, 3, 4, 5], (4, 4, 2))
    b = sampling.initial_noise(5, [3, 4, 5], (4, 4, 2))
    np.testing.assert_array_equal(a[3:], b)
    assert not np.allclose(a[0], a[1])
    assert not np.allclose(a, sampling.initial_noise(6, range(6), (4, 4, 2)))


def test_bad_sampler_settings():
    with pytest.raises(ValueError, match="not one of"):
        sampling.make_plan(schedules.DDPMSchedule(), "heun", 4)
    with pytest.raises(ValueError, match="flow"):
        sampling.make_plan(schedules.FlowSchedule(), "ddim", 4)
    with pytest.raises(ValueError, match="steps"):
        sampling.make_plan(schedules.DDPMSchedule(), "ddim", 0)


def test_tiny_unet_ddim_matches_diffusers_pipeline_loop(tmp_path):
    """The real denoiser path: tiny SD UNet (JAX) vs the same weights in diffusers, 2 DDIM steps with CFG."""
    from ddspo_jax.backbones import schedule_from_folder
    from ddspo_jax.backbones.sd import SD1Backbone
    from ddspo_jax.convert import load_unet
    from ddspo_jax.backbones import ensure_tiny_model

    folder = ensure_tiny_model(tmp_path / "tiny")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    unet, params = load_unet(folder)
    bb = SD1Backbone(folder, unet, params, schedule_from_folder(folder, None))
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    cond = rng.standard_normal((2, 77, 32)).astype(np.float32)
    uncond = np.repeat(rng.standard_normal((1, 77, 32)).astype(np.float32), 2, 0)
    run = sampling.make_sampler(bb.denoise, bb.schedule, sampler="ddim", steps=2, guidance=7.5)
    got = np.asarray(run(params, noise, {"prompt_embeds": cond}, {"prompt_embeds": uncond}))
    sch = pipe.scheduler
    sch.set_timesteps(2)
    x = torch.from_numpy(noise).permute(0, 3, 1, 2)
    emb = torch.from_numpy(np.concatenate([uncond, cond]))
    with torch.no_grad():
        for t in sch.timesteps:
            pred = pipe.unet(torch.cat([x, x]), t, emb).sample
            pu, pc = pred.chunk(2)
            x = sch.step(pu + 7.5 * (pc - pu), t, x).prev_sample
    want = x.permute(0, 2, 3, 1).numpy()
    diff = float(np.abs(got - want).max())
    print(f"tiny unet ddim: max abs diff {diff:.3g} (max |x| {np.abs(want).max():.3g})")
    assert diff <= 1e-4 * max(1.0, float(np.abs(want).max()))
