"""The train step: per micro-batch, one `jax.jit` around a `shard_map` over the ("data", "fsdp") mesh that
adds the micro-batch's gradients into a donated fsdp-sharded float32 accumulator (the first micro-batch of a
step overwrites it); per step, one jitted optimizer update on the sharded state.

Per device, inside the shard_map (DESIGN.md "The step, in one picture"):
  1. parameters stay fsdp shards: the trainable (float32 master weights) and the frozen reference
     (`model.ref_dtype`, default the compute dtype) are separate trees; each model block gathers its own
     weights in the compute dtype when it runs and drops them after (parallel.Gather, models/layers.unit),
     so no device ever holds a whole tree; JAX transposes those all-gathers into reduce-scatters, so the
     gradients come back fsdp-sharded;
  2. per-pair t and noise from a key folded with the pair's *global* index (step, micro-batch, row), so the
     result does not depend on the mesh, the process count or the micro-batch split; the reference forwards
     as one batched call on the stacked inputs the objective needs, the trainable forward as one call on
     [x_t^w, x_t^l] under value_and_grad;
  3. gradients summed over "data" (and over "fsdp" for the few replicated leaves) into the accumulator.
Micro-batches are separate calls of one compiled function (not a lax.scan): only one micro-batch of the
global batch is on device at a time, and XLA:CPU's slow convolution layouts inside while loops are avoided
(measured by benchmarks/train_step.py). The update runs outside the shard_map on the globally sharded arrays
(Adafactor's factored statistics need whole matrices) and skips, on device, a step whose loss or gradient is
not finite, counting it in the state (no host sync; a `lax.cond`, so XLA copies no state leaf).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ddspo_jax import parallel, schedules
from ddspo_jax.errors import ConfigError
from ddspo_jax.losses import NEEDS_REF, NEEDS_REF_NEG, preference_loss
from ddspo_jax.optim import make_optimizer  # noqa: F401  (re-exported: step_lib.make_optimizer)

STEP_KEYS = ("x0_w", "x0_l", "cond_w", "cond_l")  # what the step reads from a loader batch
RAND_COND_KEYS = ("extra_cond_w", "extra_cond_l")  # ... and with data.rand_cond


def step_keys(cfg) -> tuple[str, ...]:
    return STEP_KEYS + (RAND_COND_KEYS if cfg.data.rand_cond != "none" else ())

# denoise(params, x_t [B,H,W,C], t_model [B], cond pytree with leading B, gather) -> prediction [B,H,W,C].
# `params` are the device's fsdp shards; `gather` (parallel.Gather) makes whole compute-dtype weights of them,
# per block for the UNet (models/layers.apply_sharded) or at once for small models (`gather(params)`).
# With train.cpp="pair" the reference denoiser is also called with `adapters=(None, None, "w", "l")`: the
# batch in that many equal groups, group g through the frozen pair's adapter g (None: the reference itself).
Denoise = Callable[[Any, jax.Array, jax.Array, Any, parallel.Gather], jax.Array]


def _cat(trees):
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, 0), *trees)


def pair_noise(schedule, cfg, key, ids, x0_w):
    """Per-pair (t, noise_w, noise_l, u) from `key` folded with each pair's global index (u: a uniform for
    the rand_cond choice)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)

    def one(k):
        kt, kw, kl, ku = jax.random.split(k, 4)
        t = schedules.sample_timesteps(schedule, kt, (), cfg.schedule)
        nw = jax.random.normal(kw, x0_w.shape[1:], jnp.float32)
        # sft_pair fits two adapters to two image sets: one t per pair, independent noise (the release)
        share = cfg.train.share_noise and cfg.train.objective != "sft_pair"
        nl = nw if share else jax.random.normal(kl, x0_w.shape[1:], jnp.float32)
        return t, nw, nl, jax.random.uniform(ku)

    return jax.vmap(one)(keys)


def pair_forward(denoise: Denoise, schedule, cfg, params, ref_params, batch, ids, key, model_apply=None,
                 gathers=(None, None)):
    """Loss and metrics of one micro-batch; differentiable in `params` only.

    model_apply(params, ref_params, x, t, cond, gather_params, gather_ref) is the trainable forward; default
    denoise(params, ..., gather_params). LoRA passes one that merges its factors into the reference."""
    objective = cfg.train.objective
    g_params, g_ref = gathers
    x0_w = batch["x0_w"].astype(jnp.float32)
    x0_l = batch["x0_l"].astype(jnp.float32)
    t, nw, nl, u = pair_noise(schedule, cfg, key, ids, x0_w)
    x_w, x_l = schedule.add_noise(x0_w, nw, t), schedule.add_noise(x0_l, nl, t)
    tm = schedule.model_timestep(t)
    c, c_neg = batch["cond_w"], batch["cond_l"]
    if cfg.data.rand_cond != "none":  # the authors' rand_cond: per pair, p(t) decides on device
        c, c_neg, _ = apply_rand_cond(u, tm, schedule.num_train_timesteps, batch, cfg.data.rand_cond,
                                      cfg.data.rand_cond_lambda)
    n = x0_w.shape[0]

    # Reference: [x_t^w|c, x_t^l|c (, x_t^l|c-) | (, phi^w(x_t^w|c), phi^l(x_t^l|c))] as one call.
    ref_w = ref_l = ref_neg_l = cpp_w = cpp_l = None
    if objective in NEEDS_REF:
        xs, ts, cs, adapters = [x_w, x_l], [tm, tm], [c, c], None
        if objective in NEEDS_REF_NEG and cfg.train.cpp == "pair":
            xs, ts, cs, adapters = xs + [x_w, x_l], ts + [tm, tm], cs + [c, c], (None, None, "w", "l")
        elif objective in NEEDS_REF_NEG:
            xs, ts, cs = xs + [x_l], ts + [tm], cs + [c_neg]
        args = (ref_params, jnp.concatenate(xs), jnp.concatenate(ts), _cat(cs), g_ref)
        ref = denoise(*args) if adapters is None else denoise(*args, adapters=adapters)
        ref = jax.lax.stop_gradient(ref.astype(jnp.float32))
        ref_w, ref_l = ref[:n], ref[n:2 * n]
        if adapters is not None:
            cpp_w, cpp_l = ref[2 * n:3 * n], ref[3 * n:]
        elif objective in NEEDS_REF_NEG:
            ref_neg_l = ref[2 * n:]

    target_w = schedule.training_target(x0_w, nw, t)
    target_l = schedule.training_target(x0_l, nl, t)
    to_w = to_l = lambda pred: pred  # noqa: E731
    if cfg.schedule.precondition_outputs and schedule.kind != "flow":
        raise ConfigError("schedule.precondition_outputs: only for flow models (SD3, SANA); this model's "
                          f"schedule is {schedule.kind!r}")
    if cfg.schedule.precondition_outputs:  # the loss in x_0 space, as the release trains SD3: x_0 = x_t - s v
        x0_of = lambda x: lambda pred: None if pred is None else schedule.to_x0_eps(x, pred, t)[0]  # noqa: E731
        to_w, to_l = x0_of(x_w), x0_of(x_l)
        target_w, target_l = x0_w, x0_l
        ref_w, ref_l, ref_neg_l, cpp_w, cpp_l = to_w(ref_w), to_l(ref_l), to_l(ref_neg_l), to_w(cpp_w), to_l(cpp_l)
    weight = schedule.loss_weight(t, cfg.schedule.loss_weighting)
    x_model, t_model, c_model = jnp.concatenate([x_w, x_l]), jnp.concatenate([tm, tm]), _cat([c, c])

    def loss_fn(p):
        if model_apply is None:
            out = denoise(p, x_model, t_model, c_model, g_params)
        else:
            out = model_apply(p, ref_params, x_model, t_model, c_model, g_params, g_ref)
        out = out.astype(jnp.float32)
        return preference_loss(objective, model_w=to_w(out[:n]), model_l=to_l(out[n:]), ref_w=ref_w, ref_l=ref_l,
                               target_w=target_w, target_l=target_l, ref_neg_l=ref_neg_l, cpp_w=cpp_w,
                               cpp_l=cpp_l, beta=cfg.train.beta, dspo_weight=cfg.train.dspo_weight, weight=weight)

    return loss_fn


def rand_cond_prob(t, T, kind: str = "sigmoid", lam: float = 20.0):
    """p(t) of replacing a pair's prompts by an extra prompt (the authors' rand_cond); jittable in t.

    sigmoid: 1 / (1 + exp(-lam (t/T - 0.7)))   (mostly the noisiest 30 % of steps)
    exponential: exp(-lam (1 - t/T))
    constant: 1 (the authors' "constant_1": always swap)
    `t` is the integer timestep in [0, T); `kind` is static.
    """
    x = jnp.asarray(t, jnp.float32) / T
    if kind == "sigmoid":
        return 1.0 / (1.0 + jnp.exp(-lam * (x - 0.7)))
    if kind == "exponential":
        return jnp.exp(-lam * (1.0 - x))
    if kind == "constant":
        return jnp.ones_like(x)
    raise ValueError(f"rand_cond kind must be 'sigmoid', 'exponential' or 'constant', got {kind!r}")


def apply_rand_cond(u, t, T, batch, kind: str = "sigmoid", lam: float = 20.0):
    """On device: per pair, with probability p(t), swap (cond_w, cond_l) for (extra_cond_w, extra_cond_l).

    `u` are per-pair uniforms in [0, 1) (the train step draws them from each pair's own key, so the choice
    does not depend on the mesh). The latents stay; swapped pairs get paired=False. Returns (cond_w,
    cond_l, paired). Jittable.
    """
    p = rand_cond_prob(t, T, kind, lam)
    swap = jnp.asarray(u) < p

    def pick(own, extra):
        m = swap.reshape(swap.shape + (1,) * (own.ndim - swap.ndim))
        return jnp.where(m, extra.astype(own.dtype), own)

    cond_w = jax.tree.map(pick, dict(batch["cond_w"]), dict(batch["extra_cond_w"]))
    cond_l = jax.tree.map(pick, dict(batch["cond_l"]), dict(batch["extra_cond_l"]))
    paired = jnp.logical_and(jnp.asarray(batch.get("paired", True)), jnp.logical_not(swap))
    return cond_w, cond_l, paired


def micro_batching(cfg, mesh) -> tuple[int, int]:
    """(micro-batches per step k, global pairs per micro-batch) from train.batch_size and
    train.micro_batch_per_device; errors name the keys."""
    B, per_dev, n = cfg.train.batch_size, cfg.train.micro_batch_per_device, mesh.size
    micro = B if per_dev == 0 else min(per_dev * n, B)  # at most per_dev pairs per device
    if micro % n:
        raise ConfigError(f"train.batch_size={B} is not divisible by the {n} devices of the mesh; set "
                         f"train.micro_batch_per_device or a batch size that is a multiple of {n}")
    if B % micro:
        raise ConfigError(f"train.batch_size={B} is not a multiple of train.micro_batch_per_device="
                         f"{per_dev} x {n} devices = {micro} pairs per micro-batch")
    return B // micro, micro


def num_micro_batches(cfg, mesh) -> int:
    return micro_batching(cfg, mesh)[0]


class TrainStep:
    """`grad` per micro-batch into a donated sharded accumulator, `update` per step; `__call__` does both.

    state = {"params", "opt_state", "step", "skipped", "bad_run"} (skipped: non-finite steps so far; bad_run:
    how many of the latest steps in a row); a micro-batch = {"x0_w", "x0_l", "cond_w", "cond_l"} (the
    loader's names) as global arrays split over all devices along the pair axis (parallel.put_batch)."""

    def __init__(self, denoise: Denoise, schedule, cfg, mesh, optimizer, params_shape, *, ref_shape=None,
                 model_apply=None):
        self.cfg, self.mesh, self.optimizer = cfg, mesh, optimizer
        self.k, self.micro = micro_batching(cfg, mesh)
        fsdp_n, n_dev, k = mesh.shape["fsdp"], mesh.size, self.k
        ref_shape = params_shape if ref_shape is None else ref_shape
        specs, ref_specs = parallel.tree_specs(params_shape, mesh), parallel.tree_specs(ref_shape, mesh)
        compute = jnp.dtype(cfg.model.dtype)
        axes = parallel.fsdp_axes(params_shape, fsdp_n)
        gathers = (parallel.Gather(axes, compute), parallel.Gather(parallel.fsdp_axes(ref_shape, fsdp_n), compute))
        sharded = jax.tree_util.tree_map_with_path(lambda p, x: axes[parallel.key_path(p)] is not None,
                                                   params_shape)

        def local(acc, params, ref_params, batch, key, step, j):
            b = batch["x0_w"].shape[0]
            dev = jax.lax.axis_index("data") * fsdp_n + jax.lax.axis_index("fsdp")
            ids = j * (b * n_dev) + dev * b + jnp.arange(b)
            key = jax.random.fold_in(key, step)
            loss_fn = pair_forward(denoise, schedule, cfg, params, ref_params, batch, ids, key, model_apply,
                                   gathers)
            (_, m), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
            # gathered leaves: already reduce-scattered over fsdp (the all-gather's transpose)
            g = jax.tree.map(lambda x, s: _psum(x.astype(jnp.float32), ("data",) if s else parallel.AXES, mesh),
                             g, sharded)
            m = jax.tree.map(lambda x: _psum(x, parallel.AXES, mesh) / n_dev, m)
            # The first micro-batch overwrites the accumulator, so no step has to zero it (a select fuses
            # into the add; the unselected branch may hold the last step's values, non-finite ones too).
            return jax.tree.map(lambda a, x: jnp.where(j == 0, x, a + x), acc, {"grads": g, "metrics": m})

        metric_shape = jax.eval_shape(lambda: _metric_names(cfg))
        acc_specs = {"grads": specs, "metrics": jax.tree.map(lambda _: P(), metric_shape)}
        grads_fn = jax.shard_map(local, mesh=mesh, in_specs=(acc_specs, specs, ref_specs, parallel.BATCH, P(), P(), P()),
                                 out_specs=acc_specs, check_vma=False)
        rep = NamedSharding(mesh, P())
        self.acc_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), acc_specs)
        self.acc_shape = {"grads": jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), params_shape),
                          "metrics": metric_shape}
        param_sh, ref_sh = parallel.tree_shardings(params_shape, mesh), parallel.tree_shardings(ref_shape, mesh)
        self.grad = jax.jit(grads_fn, donate_argnums=(0,), compiler_options=parallel.compiler_options(mesh),
                            in_shardings=(self.acc_shardings, param_sh, ref_sh, parallel.batch_sharding(mesh), rep,
                                          rep, rep),
                            out_shardings=self.acc_shardings)

        def update(state, acc):
            grads = jax.tree.map(lambda g: g / (n_dev * k), acc["grads"])
            metrics = jax.tree.map(lambda x: x / k, acc["metrics"])
            gnorm = optax.tree.norm(grads)
            ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(gnorm)

            def apply(s):
                updates, opt_state = optimizer.update(grads, s["opt_state"], s["params"])
                return optax.apply_updates(s["params"], updates), opt_state

            # A non-finite step keeps the old state. As a cond, not a select of old and new trees: the select
            # read every donated leaf twice and made XLA copy params, moments and accumulator first (the
            # copies were 31 of the CPU update's 48 ms).
            params, opt_state = jax.lax.cond(ok, apply, lambda s: (s["params"], s["opt_state"]), state)
            new = {"params": params, "opt_state": opt_state,
                   "step": state["step"] + 1, "skipped": state["skipped"] + (~ok).astype(jnp.int32),
                   "bad_run": jnp.where(ok, 0, state["bad_run"] + 1)}
            metrics = dict(metrics, grad_norm=gnorm, skipped=(~ok).astype(jnp.float32))
            return new, metrics

        self.state_shape = jax.eval_shape(lambda p: init_state(p, optimizer), params_shape)
        self.state_shardings = state_shardings(self.state_shape, mesh)
        self.update = jax.jit(update, donate_argnums=(0,), in_shardings=(self.state_shardings, self.acc_shardings),
                              out_shardings=(self.state_shardings, rep))
        self._zeros = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self.acc_shape),
                              out_shardings=self.acc_shardings)
        self._acc = None

    def zeros(self):
        """An accumulator on its shardings, allocated once: the update only reads it, and the next step's first
        micro-batch overwrites it."""
        return self._zeros()

    def micro_batches(self, batch) -> list:
        """A host global batch (single process) -> k micro-batches placed on the mesh."""
        rows = lambda j: jax.tree.map(lambda x: x[j * self.micro:(j + 1) * self.micro], batch)  # noqa: E731
        return [parallel.put_batch(rows(j), self.mesh) for j in range(self.k)]

    def __call__(self, state, ref_params, batch, key):
        """One optimizer step. `batch`: a host global batch, or the k micro-batches already on the mesh."""
        micro = self.micro_batches(batch) if isinstance(batch, dict) else list(batch)
        if len(micro) != self.k:
            raise ValueError(f"expected {self.k} micro-batches, got {len(micro)}")
        acc = self.zeros() if self._acc is None else self._acc
        self._acc = None
        for j, mb in enumerate(micro):
            acc = self.grad(acc, state["params"], ref_params, mb, key, state["step"], jnp.int32(j))
        state, metrics = self.update(state, acc)
        self._acc = acc
        return state, metrics

    def _cache_size(self) -> int:
        return self.grad._cache_size() + self.update._cache_size()


def _psum(x, axes, mesh):
    """psum over the named mesh axes that have more than one device (none: x itself). XLA:CPU still runs an
    all-reduce over one device as a copy of every gradient (1-3 ms of the CPU benchmark's step)."""
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    return jax.lax.psum(x, axes) if axes else x


def _metric_names(cfg):
    """Zero scalars named like the objective's metrics (the accumulator's metric part)."""
    z = jnp.zeros((1, 1), jnp.float32)
    _, m = jax.eval_shape(lambda: preference_loss(cfg.train.objective, model_w=z, model_l=z, ref_w=z, ref_l=z,
                                                  target_w=z, target_l=z, ref_neg_l=z, beta=1.0))
    return {k: jnp.zeros((), jnp.float32) for k in m}


def make_train_step(denoise: Denoise, schedule, cfg, mesh, optimizer, params_shape, *, ref_shape=None,
                    model_apply=None) -> TrainStep:
    """The train step for `denoise` on `mesh` (see TrainStep); `ref_shape` is the reference's tree when it
    differs from the trainable one (LoRA, token-ids records), `model_apply` then says how they combine."""
    return TrainStep(denoise, schedule, cfg, mesh, optimizer, params_shape, ref_shape=ref_shape,
                     model_apply=model_apply)


def init_state(params, optimizer):
    zero = jnp.zeros((), jnp.int32)
    return {"params": params, "opt_state": optimizer.init(params), "step": zero, "skipped": zero, "bad_run": zero}


def state_shardings(state_shape, mesh):
    """Params and optimizer state sharded by the same per-array rule; scalars replicated."""
    return parallel.tree_shardings(state_shape, mesh)


def create_state(params, optimizer, mesh):
    """Train state placed on its shardings (params copied: the reference keeps its own buffers)."""
    shape = jax.eval_shape(lambda p: init_state(p, optimizer), params)
    return jax.jit(lambda p: init_state(p, optimizer), out_shardings=state_shardings(shape, mesh))(params)
