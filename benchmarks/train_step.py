"""The DDSPO train step: JAX (the project's own step) vs a straightforward PyTorch step, side by side.

  python benchmarks/train_step.py                      # CPU: small SD-1.x-like UNet, float32, both frameworks
  python benchmarks/train_step.py --batch 8 --micro-batch 4 --steps 10 --size 32
  python benchmarks/train_step.py --gpu                # accelerator: SD-1.5 and SDXL, random weights, bf16
  python benchmarks/train_step.py --cpu-smoke          # the --gpu code path on tiny configs, on CPU

CPU comparison. One random diffusers `UNet2DConditionModel` is saved to a temporary pipeline folder; the JAX
side loads it exactly as `ddspo_jax/train.py` does (`load_backbone` -> `load_unet`, `make_mesh`,
`make_optimizer`, `create_state`, `make_train_step`) and the PyTorch side trains the same module. The PyTorch
step is written the way diffusers' Diffusion-DPO script (examples/research_projects/diffusion_dpo) computes
its step: latents and noisy latents stacked as [winners; losers] with the pair's noise and timestep repeated,
the scheduler's `add_noise`, a frozen reference UNet under `no_grad`, per-sample `F.mse_loss(...).mean(dims)`,
`-F.logsigmoid(...)`, gradient accumulation over micro-batches by `(loss / k).backward()`,
`clip_grad_norm_`, `AdamW.step()`. Only the objective differs from that script: DDSPO (paper Eq. 5) needs the
reference on [x_t^w|c, x_t^l|c, x_t^l|c-] (one batched no_grad call) and
  loss = -logsigmoid(-0.5 beta [d(ref_w, model_w) - (d(ref_neg_l, model_l) - d(ref_neg_l, ref_l))]).

Both start from identical weights; the first steps use identical timesteps and noise (drawn by the project's
`ddspo_jax.step.pair_noise` with the key the JAX step folds, and handed to PyTorch), and their losses are
printed side by side. At step 0 the model equals the reference, so both losses are log 2; the loss of the
second step (after one AdamW update) is the informative comparison. Timed steps alternate JAX / PyTorch so
that load from other processes on a shared machine hits both alike; times are medians after warm-up (the
JAX compile is reported separately).

GPU path (--gpu; runs only when jax.devices()[0].platform == 'gpu'): SD-1.5 (64x64 latents, 77x768 text) and
SDXL (128x128, 77x2048 + pooled embeddings and time ids) with random weights initialised under jit with
out_shardings, settings from configs/sd15.py and configs/sdxl.py (bf16 compute, float32 master weights, AdamW
/ Adafactor, SDXL's remat), printing pairs/s, peak memory and MFU (FLOPs from the compiled step's cost
analysis, with the analytic count from DESIGN.md as a cross-check: one forward 0.80 / 6.76 TFLOP per sample,
a DDSPO pair = 9 forward-equivalents).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ddspo_jax import parallel, schedules  # noqa: E402
from ddspo_jax import step as step_lib  # noqa: E402
from ddspo_jax.backbones import load_backbone  # noqa: E402
from ddspo_jax.backbones.sd import from_unet  # noqa: E402
from ddspo_jax.config import base_config, learning_rate, validate  # noqa: E402
from ddspo_jax.models.unet import UNet2DConditionModel, count_params  # noqa: E402

CONFIGS = ROOT / "ddspo_jax" / "models" / "configs"
TOKENS = 77

# A small SD-1.x-like UNet (the architecture of SD-1.5, narrower and shallower).
SMALL = dict(block_out_channels=[64, 128, 128], layers_per_block=1, norm_num_groups=32, cross_attention_dim=128,
             attention_head_dim=4, down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
             up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], sample_size=32)

# DESIGN.md: one UNet forward, TFLOP per sample (SD-1.5 at 64x64, SDXL at 128x128); a DDSPO pair is 9 of them.
ANALYTIC_FWD_TFLOP = {"sd15": 0.80, "sdxl": 6.76}
FWD_PER_PAIR = 9
PEAK = {"H200": 989e12, "H100": 989e12}  # dense bf16 FLOP/s per device (as the brief / train.py use)


# ------------------------------------------------------------------------------------------ helpers


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def table(headers, rows, aligns=None):
    """Markdown-style table with aligned columns; numbers right-aligned."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    aligns = aligns or ["<"] + [">"] * (len(headers) - 1)
    fmt = lambda r: "| " + " | ".join(f"{c:{a}{w}}" for c, a, w in zip(r, aligns, widths)) + " |"
    lines = [fmt(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in cells]
    return "\n".join(lines)


def bench_cfg(batch: int, micro: int, dtype: str = "float32", base=None):
    """The run's config: DDSPO with the paper's beta and lr rule, no warmup (so the first update is not 0)."""
    cfg = base if base is not None else base_config()
    cfg.train.objective = "ddspo"
    cfg.train.batch_size = batch
    cfg.train.micro_batch_per_device = micro if micro and micro != batch else 0  # one device on the CPU path
    cfg.model.dtype = dtype
    cfg.train.lr = cfg.train.beta / 2.048e8  # the paper text's rule: a visible first update for the loss check
    cfg.mesh.data, cfg.mesh.fsdp = -1, 1
    if base is None:
        cfg.train.warmup_steps = 0
    return validate(cfg)


def minor_faults() -> int:
    """The process's minor page faults so far (fresh pages the kernel had to zero and map)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def step_keys(key, n):
    """The keys the JAX step folds at steps 0..n-1 (step.py: fold_in(key, state['step']))."""
    return [jax.random.fold_in(key, i) for i in range(n)]


def make_batch(rng, batch, size, channels, ctx_dim):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    return {"x0_w": f(batch, size, size, channels), "x0_l": f(batch, size, size, channels),
            "cond_w": {"prompt_embeds": f(batch, TOKENS, ctx_dim)},
            "cond_l": {"prompt_embeds": f(batch, TOKENS, ctx_dim)}}


# ------------------------------------------------------------------------------------------ PyTorch


class TorchDDSPO:
    """The DDSPO step as a diffusers Diffusion-DPO-style PyTorch loop body (see the module docstring)."""

    def __init__(self, unet, cfg, lr: float):
        import torch
        from diffusers import DDPMScheduler

        self.torch = torch
        t = cfg.train
        self.unet = unet.train()
        self.ref = copy.deepcopy(unet).eval().requires_grad_(False)
        s = cfg.schedule
        self.scheduler = DDPMScheduler(num_train_timesteps=s.num_train_timesteps, beta_schedule=s.beta_schedule,
                                       beta_start=s.beta_start, beta_end=s.beta_end, prediction_type=s.prediction_type)
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=lr, betas=(t.adam_b1, t.adam_b2),
                                     weight_decay=t.weight_decay, eps=1e-8)
        self.beta, self.grad_clip = t.beta, t.grad_clip
        self.micro = t.micro_batch_per_device or t.batch_size
        self.T = s.num_train_timesteps

    @staticmethod
    def per_sample_mse(a, b):
        import torch.nn.functional as F
        d = F.mse_loss(a.float(), b.float(), reduction="none")
        return d.mean(dim=list(range(1, d.ndim)))

    def micro_loss(self, x0_w, x0_l, c, c_neg, t=None, noise=None):
        torch, F = self.torch, self.torch.nn.functional
        n = x0_w.shape[0]
        latents = torch.cat([x0_w, x0_l])
        if noise is None:  # as diffusers: one noise and one timestep per pair, repeated for both members
            noise = torch.randn_like(x0_w)
            t = torch.randint(0, self.T, (n,), dtype=torch.long)
        noise, t2 = noise.repeat(2, 1, 1, 1), t.repeat(2)
        noisy = self.scheduler.add_noise(latents, noise, t2)
        x_w, x_l = noisy.chunk(2)
        model_pred = self.unet(noisy, t2, torch.cat([c, c])).sample
        model_w, model_l = model_pred.chunk(2)
        with torch.no_grad():  # reference on [x_t^w|c, x_t^l|c, x_t^l|c-], one batched call
            ref = self.ref(torch.cat([x_w, x_l, x_l]), t.repeat(3), torch.cat([c, c, c_neg])).sample.detach()
            ref_w, ref_l, ref_neg_l = ref.chunk(3)
            ref_term_l = self.per_sample_mse(ref_l, ref_neg_l)
        inside = self.per_sample_mse(model_w, ref_w) - (self.per_sample_mse(model_l, ref_neg_l) - ref_term_l)
        return -F.logsigmoid(-0.5 * self.beta * inside).mean()

    def step(self, batch, t=None, noise=None):
        """One optimizer step over the batch (torch tensors, NCHW); returns the mean micro-batch loss."""
        torch = self.torch
        B = batch["x0_w"].shape[0]
        k = B // self.micro
        total = 0.0
        for j in range(k):
            sl = slice(j * self.micro, (j + 1) * self.micro)
            loss = self.micro_loss(batch["x0_w"][sl], batch["x0_l"][sl], batch["c"][sl], batch["c_neg"][sl],
                                   None if t is None else t[sl], None if noise is None else noise[sl])
            (loss / k).backward()
            total += loss.detach()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.unet.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(total) / k


def to_torch_batch(batch):
    import torch
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
    return {"x0_w": nchw(batch["x0_w"]), "x0_l": nchw(batch["x0_l"]),
            "c": torch.from_numpy(batch["cond_w"]["prompt_embeds"]), "c_neg": torch.from_numpy(batch["cond_l"]["prompt_embeds"])}


# ------------------------------------------------------------------------------------------ CPU comparison


def cpu_compare(args) -> None:
    import diffusers
    import torch

    B, size = args.batch, args.size
    micro = args.micro_batch or B
    if B % micro:
        raise SystemExit(f"--batch {B} must be a multiple of --micro-batch {micro}")
    down = 2 ** (len(SMALL["block_out_channels"]) - 1)
    if size % down:
        raise SystemExit(f"--size must be a multiple of {down} for this UNet")
    cfg = bench_cfg(B, micro, "float32")
    lr = learning_rate(cfg)

    torch.manual_seed(0)
    tunet = diffusers.UNet2DConditionModel(**{**SMALL, "sample_size": size})
    with tempfile.TemporaryDirectory() as d:
        tunet.save_pretrained(Path(d) / "unet")
        cfg.model.path = d
        backbone = load_backbone(cfg.model, cfg.schedule, text=False, vae=False)  # -> convert.load_unet

    # --- JAX, built as ddspo_jax/train.py builds it ---------------------------------------------------
    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    params_shape = jax.eval_shape(lambda: backbone.params)
    optimizer, _ = step_lib.make_optimizer(cfg, lr)
    ref_params = parallel.shard_tree(backbone.params, mesh)
    state = step_lib.create_state(ref_params, optimizer, mesh)
    train_step = step_lib.make_train_step(backbone.denoise, backbone.schedule, cfg, mesh, optimizer, params_shape)
    key = jax.device_put(jax.random.key(cfg.seed), parallel.NamedSharding(mesh, parallel.P()))

    rng = np.random.default_rng(0)
    host_batch = make_batch(rng, B, size, SMALL.get("in_channels", 4), SMALL["cross_attention_dim"])
    batch = parallel.put_batch(host_batch, mesh)  # for pair_noise below
    micro_batches = train_step.micro_batches(host_batch)  # placed once, reused by every timed step
    tbatch = to_torch_batch(host_batch)

    # --- PyTorch: the same module (the reference is a frozen copy) ------------------------------------
    tstep = TorchDDSPO(tunet, cfg, lr)

    # The t and noise of JAX steps 0 and 1, handed to PyTorch for the loss cross-check.
    ids = jnp.arange(B)
    check = []
    for k in step_keys(key, 2):
        t, nw, nl, _ = step_lib.pair_noise(backbone.schedule, cfg, k, ids, batch["x0_w"])
        assert cfg.train.share_noise  # the PyTorch step repeats one noise per pair, as diffusers does
        check.append((torch.from_numpy(np.asarray(t).astype(np.int64)),
                      torch.from_numpy(np.ascontiguousarray(np.asarray(nw).transpose(0, 3, 1, 2)))))

    t0 = time.perf_counter()
    state, m = train_step(state, ref_params, micro_batches, key)
    jax_losses = [float(jax.block_until_ready(m)["loss"])]
    first_call = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch_losses = [tstep.step(tbatch, *check[0])]
    torch_first = time.perf_counter() - t0
    state, m = train_step(state, ref_params, micro_batches, key)
    jax_losses.append(float(jax.block_until_ready(m)["loss"]))
    torch_losses.append(tstep.step(tbatch, *check[1]))

    for _ in range(max(args.warmup - 1, 0)):  # steps 0 and 1 above were the first warm-up
        state, m = train_step(state, ref_params, micro_batches, key)
        jax.block_until_ready((state, m))
        tstep.step(tbatch)

    jt, tt, jf, tf = [], [], [], []
    for _ in range(args.steps):  # alternate, so background load hits both alike
        f0, t0 = minor_faults(), time.perf_counter()
        state, m = train_step(state, ref_params, micro_batches, key)
        jax.block_until_ready((state, m))
        jt.append(time.perf_counter() - t0)
        f1, t0 = minor_faults(), time.perf_counter()
        tstep.step(tbatch)
        tt.append(time.perf_counter() - t0)
        jf.append(f1 - f0)
        tf.append(minor_faults() - f1)
    assert train_step.grad._cache_size() == 1 and train_step.update._cache_size() == 1, "the JAX step recompiled"

    j_ms, t_ms = 1e3 * median(jt), 1e3 * median(tt)
    print(f"CPU, small SD-1.x-like diffusers UNet ({count_params(backbone.params) / 1e6:.2f}M params), "
          f"{size}x{size}x4 latents, {TOKENS}x{SMALL['cross_attention_dim']} text, float32; objective ddspo, "
          f"beta {cfg.train.beta:g}, AdamW lr {lr:.3g}, grad clip {cfg.train.grad_clip:g}; "
          f"batch {B} pairs in {B // micro} micro-batch(es) of {micro}")
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}, mesh {dict(mesh.shape)}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); medians of {args.steps} alternating timed steps after "
          f"{max(args.warmup, 2)} warm-up steps; JAX first call (compile + 1 step) {first_call:.1f} s, "
          f"PyTorch first step {torch_first:.2f} s")
    if args.host_default:
        host = "host defaults (--host-default: asynchronous dispatch, glibc trims freed memory)"
    else:
        kept = parallel.cpu_compute_memory(jax.devices()[0].platform)  # make_mesh's rule (applied once, cached)
        host = "parallel.cpu_host_setup: synchronous CPU dispatch" + (", freed memory kept (mallopt)" if kept else "")
    print(f"process: {host}; minor page faults per step (median): JAX {median(jf):.0f}, PyTorch {median(tf):.0f}")
    rows = [["JAX (ddspo_jax.step)", f"{j_ms:.1f}", f"{min(jt) * 1e3:.1f}", f"{B / (j_ms / 1e3):.2f}",
             f"{jax_losses[0]:.6f}", f"{jax_losses[1]:.6f}"],
            ["PyTorch (diffusers DPO style)", f"{t_ms:.1f}", f"{min(tt) * 1e3:.1f}", f"{B / (t_ms / 1e3):.2f}",
             f"{torch_losses[0]:.6f}", f"{torch_losses[1]:.6f}"]]
    print(table(["implementation", "step ms (median)", "min ms", "pairs/s", "loss step 0", "loss step 1"], rows))
    print(f"ratio PyTorch / JAX step time: {t_ms / j_ms:.2f}x  "
          f"({'JAX faster' if t_ms > j_ms else 'PyTorch faster'})")
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(jax_losses, torch_losses)]
    at_log2 = all(abs(x - math.log(2)) < 1e-5 for x in (jax_losses[0], torch_losses[0]))
    print(f"loss agreement: step 0 rel diff {rel[0]:.2e}"
          + (" (both are log 2 = 0.693147: model == reference at step 0)" if at_log2 else "")
          + f"; step 1 (after one AdamW update, same t/noise) rel diff {rel[1]:.2e}")
    print(f"RESULT jax_ms={j_ms:.3f} torch_ms={t_ms:.3f} ratio={t_ms / j_ms:.4f} "
          f"jax_loss0={jax_losses[0]:.8f} torch_loss0={torch_losses[0]:.8f} "
          f"jax_loss1={jax_losses[1]:.8f} torch_loss1={torch_losses[1]:.8f}")


# ------------------------------------------------------------------------------------------ accelerator path


def load_config_file(name: str):
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", ROOT / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def tiny_variant(config: dict) -> dict:
    """The same architecture family (block types, SDXL's text_time embedding, linear projections), tiny."""
    n = len(config["block_out_channels"])
    out = {**config, "block_out_channels": [32, 64, 64, 64][:n], "layers_per_block": 1, "norm_num_groups": 8,
           "cross_attention_dim": 64, "sample_size": 16}
    if isinstance(config.get("attention_head_dim"), list):
        out["attention_head_dim"] = [2] * n
    else:
        out["attention_head_dim"] = 2
    if isinstance(config.get("transformer_layers_per_block"), list):
        out["transformer_layers_per_block"] = [1] * n
    if config.get("addition_embed_type") == "text_time":
        out["addition_time_embed_dim"] = 8
        out["projection_class_embeddings_input_dim"] = 32 + 6 * 8  # pooled text 32
    return out


def xla_flops(obj) -> float:
    cost = obj.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float((cost or {}).get("flops", float("nan")))


def accel_one(name, unet_config, hw, batch, micro, cfg_name, steps, warmup, smoke):
    """One random-weight model: compile the project's step, time it, report pairs/s, memory and MFU."""
    cfg = load_config_file(cfg_name)
    cfg = bench_cfg(batch, micro, cfg.model.dtype, base=cfg)
    model = UNet2DConditionModel.from_config(unet_config, dtype=jnp.bfloat16 if cfg.model.dtype == "bfloat16"
                                             else jnp.float32, param_dtype=jnp.float32,
                                             attention_impl=(cfg.model.attention or None),
                                             remat_policy=cfg.model.remat_policy)
    c = model.config
    family = "sdxl" if c.addition_embed_type == "text_time" else "sd"
    backbone = from_unet(model, schedules.from_config(cfg.schedule))
    mesh = parallel.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    params_shape = model.init_shapes()
    ref_params = jax.jit(lambda: model.init(jax.random.PRNGKey(0), *model.dummy_inputs())["params"],
                         out_shardings=parallel.tree_shardings(params_shape, mesh))()
    optimizer, _ = step_lib.make_optimizer(cfg, learning_rate(cfg))
    state = step_lib.create_state(ref_params, optimizer, mesh)  # float32 master weights
    cd = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32  # the reference in the compute dtype
    ref_params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(cd), p),
                         out_shardings=parallel.tree_shardings(params_shape, mesh))(ref_params)
    train_step = step_lib.make_train_step(backbone.denoise, backbone.schedule, cfg, mesh, optimizer, params_shape,
                                          ref_shape=jax.eval_shape(lambda: ref_params))

    ctx = c.cross_attention_dim[0]
    bsh = parallel.batch_sharding(mesh)
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    rec = jnp.bfloat16  # records store latents and embeddings as bf16 (data.record_dtype)
    mk = jax.jit(lambda k, shape: jax.random.normal(k, shape, rec), static_argnums=1, out_shardings=bsh)
    cond = lambda k: {"prompt_embeds": mk(k, (batch, TOKENS, ctx))}
    batch_ = {"x0_w": mk(keys[0], (batch, hw, hw, c.in_channels)), "x0_l": mk(keys[1], (batch, hw, hw, c.in_channels)),
              "cond_w": cond(keys[2]), "cond_l": cond(keys[3])}
    if family == "sdxl":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        ids = jnp.tile(jnp.array([[8 * hw, 8 * hw, 0, 0, 8 * hw, 8 * hw]], rec), (batch, 1))
        for which, k in (("cond_w", keys[3]), ("cond_l", keys[4])):
            batch_[which]["pooled_prompt_embeds"] = mk(k, (batch, pooled))
            batch_[which]["add_time_ids"] = jax.device_put(ids, bsh)
    key = jax.device_put(jax.random.key(0), parallel.NamedSharding(mesh, parallel.P()))
    micro_batches = [jax.tree.map(lambda x: x[j * train_step.micro:(j + 1) * train_step.micro], batch_)
                     for j in range(train_step.k)]
    micro_batches = [jax.device_put(mb, bsh) for mb in micro_batches]

    t0 = time.perf_counter()
    acc = train_step.zeros()
    compiled = train_step.grad.lower(acc, state["params"], ref_params, micro_batches[0], key, state["step"],
                                     jnp.int32(0)).compile()
    compiled_update = train_step.update.lower(state, acc).compile()
    compile_s = time.perf_counter() - t0
    k = train_step.k
    # One compiled program per micro-batch (no loop): the step's FLOPs are k of them plus the update.
    step_flops_raw = xla_flops(compiled)
    step_flops = step_flops_raw * k + xla_flops(compiled_update)
    mem = compiled.memory_analysis()
    # One forward of one sample, counted by XLA on the lowered (unoptimised) HLO: the per-sample unit.
    one = lambda a: a[:1]
    fwd = jax.jit(backbone.denoise).lower(ref_params, one(batch_["x0_w"]), jnp.zeros((1,), jnp.int32),
                                           jax.tree.map(one, batch_["cond_w"]))
    fwd_flops = xla_flops(fwd)

    for _ in range(warmup):
        state, m = train_step(state, ref_params, micro_batches, key)
        jax.block_until_ready((state, m))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = train_step(state, ref_params, micro_batches, key)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t0)
    loss = float(jax.device_get(m)["loss"])
    dt = median(times)
    dev = jax.devices()[0]
    peak = next((v for k, v in PEAK.items() if k in getattr(dev, "device_kind", "")), None)
    stats = dev.memory_stats() or {}
    analytic = ANALYTIC_FWD_TFLOP.get(name)
    pair_flops_an = FWD_PER_PAIR * (analytic * 1e12 if analytic else fwd_flops)
    out = dict(name=name, family=family, latents=f"{hw}x{hw}", params_M=count_params(ref_params) / 1e6,
               batch=batch, micro=train_step.micro, k=k, remat=cfg.model.remat_policy,
               opt=cfg.train.optimizer, compile_s=compile_s, step_flops_raw=step_flops_raw, step_s=dt, pairs_s=batch / dt,
               step_flops=step_flops, fwd_flops=fwd_flops, pair_flops_an=pair_flops_an,
               analytic_src="DESIGN.md" if analytic else "XLA forward x 9",
               fwd_equiv=step_flops / (batch * fwd_flops) if fwd_flops else float("nan"),
               peak_GiB=stats.get("peak_bytes_in_use", float("nan")) / 2**30,
               temp_GiB=getattr(mem, "temp_size_in_bytes", float("nan")) / 2**30 if mem else float("nan"),
               args_GiB=getattr(mem, "argument_size_in_bytes", float("nan")) / 2**30 if mem else float("nan"),
               mfu_xla=step_flops / dt / peak if peak else float("nan"),
               mfu_an=batch * pair_flops_an / dt / peak if peak else float("nan"),
               tflops_xla=step_flops / dt / 1e12, loss=loss, smoke=smoke)
    del state, ref_params, batch_
    return out


def accel_run(args) -> None:
    dev = jax.devices()[0]
    if args.gpu and dev.platform != "gpu" and not args.cpu_smoke:
        print(f"--gpu: skipped (jax.devices()[0].platform is {dev.platform!r}, not 'gpu'); "
              "--cpu-smoke runs the same code path on tiny configs on CPU")
        return
    sd15 = json.loads((CONFIGS / "sd15_unet.json").read_text())
    sdxl = json.loads((CONFIGS / "sdxl_unet.json").read_text())
    if args.cpu_smoke:  # tiny variants of both architectures, 16x16 latents, a few pairs
        b = args.batch or 2
        runs = [("tiny-sd15", tiny_variant(sd15), 16, b, args.micro_batch or max(b // 2, 1), "sd15"),
                ("tiny-sdxl", tiny_variant(sdxl), 16, b, args.micro_batch or max(b // 2, 1), "sdxl")]
    else:
        runs = [("sd15", sd15, 64, args.batch or 32, args.micro_batch or 16, "sd15"),
                ("sdxl", sdxl, 128, args.batch or 16, args.micro_batch or 8, "sdxl")]
    print(f"device: {getattr(dev, 'device_kind', dev.platform)} ({dev.platform}) x {jax.device_count()}; random weights, "
          f"settings from configs/<model>.py (compute dtype, remat, optimizer), objective ddspo; medians of "
          f"{args.steps} steps after {args.warmup} warm-up")
    results = []
    for name, ucfg, hw, b, mb, cfg_name in runs:
        try:
            results.append(accel_one(name, ucfg, hw, b, mb, cfg_name, args.steps, args.warmup, args.cpu_smoke))
        except Exception as e:  # noqa: BLE001 (OOM on a small device: report and go on)
            print(f"{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}")
    if not results:
        return
    f = lambda v, p=1: "n/a" if v != v else f"{v:.{p}f}"
    rows = [[r["name"], r["latents"], f"{r['params_M']:.1f}", f"{r['batch']}/{r['micro']}", r["remat"], r["opt"],
             f(r["compile_s"]), f(1e3 * r["step_s"]), f(r["pairs_s"], 2), f"{r['tflops_xla']:.3g}",
             f(100 * r["mfu_xla"]), f(100 * r["mfu_an"]), f(r["fwd_equiv"], 2), f(r["peak_GiB"], 2),
             f(r["temp_GiB"], 2)] for r in results]
    print(table(["model", "latents", "params M", "batch/micro", "remat", "opt", "compile s", "step ms",
                 "pairs/s", "XLA TFLOP/s", "MFU % (XLA)", "MFU % (analytic)", "fwd-equiv/pair", "peak GiB",
                 "XLA temp GiB"], rows))
    for r in results:
        print(f"  {r['name']}: compiled step {r['step_flops'] / 1e12:.4g} TFLOP (cost_analysis {r['step_flops_raw'] / 1e12:.4g} "
              f"x {r['k']} micro-batch(es)); "
              f"analytic {r['batch']} pairs x {r['pair_flops_an'] / 1e12:.4g} TFLOP/pair ({r['analytic_src']}) = "
              f"{r['batch'] * r['pair_flops_an'] / 1e12:.3f} TFLOP; one forward/sample by XLA "
              f"{r['fwd_flops'] / 1e12:.4g} TFLOP; loss {r['loss']:.4f}")
    print("  MFU % (XLA) uses the compiled step's cost_analysis() FLOPs (remat recompute included); MFU % (analytic) "
          "counts 9 forward-equivalents per pair; peak = 989 TFLOP/s dense bf16 (H100/H200), n/a elsewhere; "
          "peak GiB is the device's peak_bytes_in_use so far in this process (n/a on CPU).")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=None, help="pairs per step (CPU default 4; GPU: sd15 32, sdxl 16)")
    ap.add_argument("--micro-batch", type=int, default=0, help="pairs per micro-batch (0: CPU no accumulation; "
                    "GPU sd15 16, sdxl 8)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps (the first includes the JAX compile)")
    ap.add_argument("--size", type=int, default=16, help="latent height = width for the CPU comparison")
    ap.add_argument("--gpu", action="store_true", help="SD-1.5 and SDXL with random weights on the accelerator")
    ap.add_argument("--cpu-smoke", action="store_true", help="run the --gpu code path on tiny configs on CPU")
    ap.add_argument("--host-default", action="store_true",
                    help="skip parallel.cpu_host_setup (JAX's asynchronous CPU dispatch, glibc's default "
                         "trimming): the process as a plain script would run it")
    args = ap.parse_args(argv)
    if not args.host_default:
        parallel.cpu_host_setup()  # as the commands do: CPU calls on this thread, freed memory kept (both frameworks)
    if args.gpu or args.cpu_smoke:
        accel_run(args)
    else:
        args.batch = args.batch or 4
        cpu_compare(args)


if __name__ == "__main__":
    main()
