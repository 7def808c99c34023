"""The shard_map train step: mesh equality, accumulation equality, donation, one compile."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddspo_jax import parallel, schedules, step as step_lib
from ddspo_jax.config import base_config


class TinyDenoiser(nn.Module):
    """A small conditional conv net standing in for the UNet (same call signature)."""

    @nn.compact
    def __call__(self, x, t, hidden):
        h = nn.Conv(16, (3, 3))(x)
        temb = nn.Dense(16)(jnp.sin(t[:, None] / 100.0 * jnp.arange(1, 9)))
        cemb = nn.Dense(16)(hidden.mean(1))
        h = nn.silu(h + temb[:, None, None] + cemb[:, None, None])
        return nn.Conv(x.shape[-1], (3, 3))(h)


def denoise_fn(model):
    return lambda p, x, t, cond, gather: model.apply({"params": gather(p)}, x, t, cond["hidden"])


def make_cfg(objective="ddspo", batch=16, micro=0):
    """micro: pairs per device per micro-batch (0: no accumulation)."""
    cfg = base_config()
    cfg.train.objective = objective
    cfg.train.beta = 500.0
    cfg.train.batch_size = batch
    cfg.train.micro_batch_per_device = micro
    cfg.model.dtype = "float32"
    cfg.train.warmup_steps = 0
    cfg.train.lr = 1e-3
    return cfg


def make_batch(B=16, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    return {"x0_w": f(B, 8, 8, 4), "x0_l": f(B, 8, 8, 4), "cond_w": {"hidden": f(B, 5, 8)},
            "cond_l": {"hidden": f(B, 5, 8)}}


@pytest.fixture(scope="module")
def setup():
    model = TinyDenoiser()
    b = make_batch()
    params = model.init(jax.random.key(0), b["x0_w"][:1], jnp.zeros(1), b["cond_w"]["hidden"][:1])["params"]
    return model, params, b


def run_steps(setup, cfg, data, fsdp, devices=None, n_steps=2):
    model, params, batch = setup
    mesh = parallel.make_mesh(data, fsdp, devices)
    sched = schedules.from_config(cfg.schedule)
    opt, _ = step_lib.make_optimizer(cfg, cfg.train.lr)
    shape = jax.eval_shape(lambda: params)
    train_step = step_lib.make_train_step(denoise_fn(model), sched, cfg, mesh, opt, shape)
    ref = parallel.shard_tree(params, mesh)
    state = step_lib.create_state(ref, opt, mesh)
    metrics = []
    for i in range(n_steps):
        state, m = train_step(state, ref, make_batch(seed=i), jax.random.key(7))
        metrics.append(jax.device_get(m))
    # the reference survives the donated state and is unchanged
    np.testing.assert_array_equal(jax.device_get(ref["Conv_0"]["kernel"]), params["Conv_0"]["kernel"])
    assert train_step.grad._cache_size() == 1 and train_step.update._cache_size() == 1
    return jax.device_get(state["params"]), metrics


def assert_same(a, b, rtol=2e-5, atol=2e-6):
    pa, ma = a
    pb, mb = b
    for i, (x, y) in enumerate(zip(ma, mb)):
        for k in x:
            if i == 0 and k == "implicit_acc":
                continue  # model == ref at step 0: inside is 0 up to roundoff, its sign is noise
            np.testing.assert_allclose(x[k], y[k], rtol=rtol, atol=atol, err_msg=k)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), pa, pb)


@pytest.mark.parametrize("objective", ["ddspo", "dpo"])
def test_meshes_equal_single_device(setup, objective):
    cfg = make_cfg(objective)
    single = run_steps(setup, cfg, 1, 1, devices=jax.devices()[:1])
    assert single[1][0]["loss"] == pytest.approx(np.log(2.0), abs=1e-4)  # model == ref at step 0 (up to fusion roundoff)
    assert single[1][1]["loss"] != pytest.approx(np.log(2.0), abs=1e-4)  # and it learned something
    for data, fsdp in ((8, 1), (2, 4), (1, 8)):
        assert_same(single, run_steps(setup, cfg, data, fsdp))


def test_fsdp_actually_shards(setup):
    model, params, _ = setup
    mesh = parallel.make_mesh(2, 4)
    sharded = parallel.shard_tree(params, mesh)
    k = sharded["Conv_0"]["kernel"]  # (3, 3, 4, 16): the 16 axis is split over fsdp
    assert k.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert k.addressable_shards[0].data.shape == (3, 3, 4, 4)


@pytest.mark.parametrize("objective", ["ddspo", "dspo"])
def test_accumulation_equals_big_batch(setup, objective):
    big = run_steps(setup, make_cfg(objective, micro=0), 2, 4)
    acc = run_steps(setup, make_cfg(objective, micro=1), 2, 4)  # 2 micro-batches of 8 pairs
    assert_same(big, acc)


@pytest.mark.parametrize("objective", ["dspo_cpp", "sft"])
def test_other_objectives_run(setup, objective):
    params, metrics = run_steps(setup, make_cfg(objective), 8, 1, n_steps=1)
    assert np.isfinite(metrics[0]["loss"]) and np.isfinite(metrics[0]["grad_norm"])


def test_bad_batch_split(setup):
    cfg = make_cfg(batch=40, micro=3)  # 40 pairs, micro-batches of 3 x 8 = 24
    with pytest.raises(ValueError, match="micro_batch_per_device"):
        step_lib.num_micro_batches(cfg, parallel.make_mesh(8, 1))
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        step_lib.num_micro_batches(make_cfg(batch=12), parallel.make_mesh(8, 1))
    with pytest.raises(ValueError, match="needs 6 devices"):
        parallel.make_mesh(3, 2)


def test_lora_step_trains_only_factors_and_meshes_agree(setup):
    from ddspo_jax import lora

    model, params, _ = setup
    dense_params = {"to_q": {"kernel": params["Dense_1"]["kernel"]}}  # exercise target discovery
    assert lora.target_paths(dense_params) == [("to_q", "kernel")]
    # LoRA on the tiny net's Dense layers (they stand in for attention projections here)
    targets = ("Dense_0", "Dense_1")
    factors = lora.init(params, 2, jax.random.key(1), targets=targets)
    assert set(factors) == {"Dense_0", "Dense_1"}
    merged = lora.merge(params, factors, alpha=2.0)  # B = 0: merging changes nothing
    jax.tree.map(np.testing.assert_array_equal, merged, params)

    cfg = make_cfg("ddspo")
    denoise = denoise_fn(model)
    apply = lambda p, ref, x, t, c, gp, gr: model.apply({"params": lora.merge(gr(ref), gp(p), 2.0)}, x, t,
                                                        c["hidden"])
    results = []
    for data, fsdp, devs in ((1, 1, jax.devices()[:1]), (2, 4, None)):
        mesh = parallel.make_mesh(data, fsdp, devs)
        opt, _ = step_lib.make_optimizer(cfg, cfg.train.lr)
        train_step = step_lib.make_train_step(denoise, schedules.from_config(cfg.schedule), cfg, mesh, opt,
                                              jax.eval_shape(lambda: factors), ref_shape=jax.eval_shape(lambda: params),
                                              model_apply=apply)
        ref = parallel.shard_tree(params, mesh)
        state = step_lib.create_state(parallel.shard_tree(factors, mesh), opt, mesh)
        ms = []
        for i in range(2):
            state, m = train_step(state, ref, make_batch(seed=i), jax.random.key(3))
            ms.append(jax.device_get(m))
        assert ms[0]["loss"] == pytest.approx(np.log(2.0), abs=1e-4)
        out = jax.device_get(state["params"])
        assert np.abs(out["Dense_0"]["b"]).max() > 0  # B moved off zero
        results.append((out, ms))
    assert_same(results[0], results[1])


def test_rand_cond_swaps_prompts_on_device(setup):
    """rand_cond "constant" (p = 1) trains exactly as if the extra prompts were the pair's own."""
    model, params, _ = setup
    rng = np.random.default_rng(5)
    extra = {"extra_cond_w": {"hidden": rng.standard_normal((16, 5, 8)).astype(np.float32)},
             "extra_cond_l": {"hidden": rng.standard_normal((16, 5, 8)).astype(np.float32)}}

    def one_step(cfg, batch):
        mesh = parallel.make_mesh(2, 4)
        opt, _ = step_lib.make_optimizer(cfg, cfg.train.lr)
        train_step = step_lib.make_train_step(denoise_fn(model), schedules.from_config(cfg.schedule), cfg, mesh,
                                              opt, jax.eval_shape(lambda: params))
        ref = parallel.shard_tree(params, mesh)
        state = step_lib.create_state(ref, opt, mesh)
        batch = {k: batch[k] for k in step_lib.step_keys(cfg)}
        state, m = train_step(state, ref, batch, jax.random.key(3))
        return jax.device_get((state["params"], m))

    cfg = make_cfg("ddspo")
    cfg.data.rand_cond = "constant"
    swapped = one_step(cfg, dict(make_batch(), **extra))
    plain = one_step(make_cfg("ddspo"), dict(make_batch(), cond_w=extra["extra_cond_w"], cond_l=extra["extra_cond_l"]))
    own = one_step(make_cfg("ddspo"), make_batch())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), swapped, plain)
    assert not np.allclose(swapped[1]["loss"], own[1]["loss"]) or not np.allclose(
        swapped[0]["Conv_0"]["kernel"], own[0]["Conv_0"]["kernel"])


def test_skipped_step_keeps_state_and_leaves_no_residue(setup):
    """A non-finite micro-batch skips the update on device (state unchanged, counted), and the next step's
    first micro-batch overwrites the accumulator that still holds the NaNs: that step equals the same step
    run from a clean state. The update copies no state leaf (a select of old and new trees made XLA copy
    params, moments and accumulator first)."""
    model, params, _ = setup
    cfg = make_cfg(batch=16, micro=8)  # two micro-batches
    mesh = parallel.make_mesh(1, 1, jax.devices()[:1])
    opt, _ = step_lib.make_optimizer(cfg, cfg.train.lr)
    shape = jax.eval_shape(lambda: params)
    train_step = step_lib.make_train_step(denoise_fn(model), schedules.from_config(cfg.schedule), cfg, mesh, opt,
                                          shape)
    ref = parallel.shard_tree(params, mesh)
    bad = make_batch(seed=0)
    bad["x0_w"][3] = np.nan
    state, m = train_step(step_lib.create_state(ref, opt, mesh), ref, bad, jax.random.key(7))
    m = jax.device_get(m)
    assert m["skipped"] == 1 and not np.isfinite(m["loss"])
    assert int(state["skipped"]) == 1 and int(state["step"]) == 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), params)
    state, m = train_step(state, ref, make_batch(seed=1), jax.random.key(7))

    fresh_step = step_lib.make_train_step(denoise_fn(model), schedules.from_config(cfg.schedule), cfg, mesh, opt,
                                          shape)
    fresh = step_lib.create_state(ref, opt, mesh)
    fresh = dict(fresh, step=fresh["step"] + 1)  # same key folding; the skip kept the initial opt state
    fresh, m2 = fresh_step(fresh, ref, make_batch(seed=1), jax.random.key(7))
    assert jax.device_get(m)["skipped"] == 0
    np.testing.assert_allclose(float(m["loss"]), float(m2["loss"]), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 jax.device_get(state["params"]), jax.device_get(fresh["params"]))

    acc = train_step.zeros()
    text = train_step.update.lower(state, acc).compile().as_text()
    assert text.count(" copy(") < len(jax.tree.leaves(params)), "the update copies state leaves"



@pytest.mark.parametrize("objective", ["ddspo", "dpo", "sft"])
def test_precondition_outputs_puts_the_loss_in_x0_space(setup, objective):
    """schedule.precondition_outputs (the release's SD3): every prediction v becomes x_0 = x_t - sigma v and
    the target x_0 itself, written out here in float64 from the same t, noise and predictions."""
    model, params, b = setup
    ref_params = jax.tree.map(lambda p: p * 0.9, params)  # the reference differs from the model
    cfg = make_cfg(objective, batch=4)
    cfg.schedule.kind, cfg.schedule.timestep_sampling = "flow", "logit_normal"
    cfg.schedule.precondition_outputs = True
    sched = schedules.from_config(cfg.schedule)
    batch = {k: jax.tree.map(lambda a: jnp.asarray(a[:4]), v) for k, v in b.items()}
    key, ids = jax.random.key(5), jnp.arange(4)
    denoise = lambda p, x, t, cond, g=None: model.apply({"params": p}, x, t, cond["hidden"])  # noqa: E731
    loss, _ = step_lib.pair_forward(denoise, sched, cfg, params, ref_params, batch, ids, key)(params)

    t, nw, nl, _ = step_lib.pair_noise(sched, cfg, key, ids, batch["x0_w"])
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    s = f64(t)[:, None, None, None]
    x0w, x0l = f64(batch["x0_w"]), f64(batch["x0_l"])
    xw, xl = (1 - s) * x0w + s * f64(nw), (1 - s) * x0l + s * f64(nl)
    v = lambda p, x, c: f64(model.apply({"params": p}, jnp.asarray(x, jnp.float32), t * 1000.0, c))  # noqa: E731
    to_x0 = lambda x, pred: x - s * pred  # noqa: E731
    cw, cl = batch["cond_w"]["hidden"], batch["cond_l"]["hidden"]
    mw, ml = to_x0(xw, v(params, xw, cw)), to_x0(xl, v(params, xl, cw))
    rw, rl = to_x0(xw, v(ref_params, xw, cw)), to_x0(xl, v(ref_params, xl, cw))
    mse = lambda a, c: ((a - c) ** 2).mean(axis=(1, 2, 3))  # noqa: E731
    if objective == "sft":
        want = mse(mw, x0w).mean()
    else:
        if objective == "ddspo":
            rneg = to_x0(xl, v(ref_params, xl, cl))
            inside = mse(mw, rw) - (mse(ml, rneg) - mse(rl, rneg))
        else:
            inside = (mse(mw, x0w) - mse(rw, x0w)) - (mse(ml, x0l) - mse(rl, x0l))
        want = np.mean(np.log1p(np.exp(0.5 * cfg.train.beta * inside)))  # -log sigmoid(-0.5 beta inside)
    np.testing.assert_allclose(float(loss), want, rtol=2e-4)
    cfg.schedule.precondition_outputs = False  # and it is not the velocity-space loss
    plain, _ = step_lib.pair_forward(denoise, sched, cfg, params, ref_params, batch, ids, key)(params)
    assert abs(float(plain) - want) > 1e-3 * abs(want)
