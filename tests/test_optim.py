"""The optimizers against the PyTorch originals the authors ran: transformers.Adafactor and torch AdamW.

Parameters live in Flax layout here and in PyTorch layout there (linear (in, out) vs (out, in), conv HWIO vs
OIHW); the same gradients are fed to both for several steps and the parameters compared."""

import numpy as np
import pytest

from ddspo_jax.config import base_config
from ddspo_jax.optim import make_optimizer, torch_factor_axes


def _tensors(rng):
    """Flax-layout params and their PyTorch-layout twins: linear, conv, bias, a 1x1 conv."""
    flax = {"lin": rng.standard_normal((12, 7)).astype(np.float32),          # torch (7, 12)
            "conv": rng.standard_normal((3, 3, 4, 6)).astype(np.float32),    # torch (6, 4, 3, 3)
            "conv1": rng.standard_normal((1, 1, 5, 3)).astype(np.float32),   # torch (3, 5, 1, 1)
            "bias": rng.standard_normal((7,)).astype(np.float32)}
    return flax


def _to_torch(name, x):
    return x.T if x.ndim == 2 else (x.transpose(3, 2, 0, 1) if x.ndim == 4 else x)


def _run(optimizer_name, steps=6, warmup=2, lr=3e-2, wd=1e-2, clip=1.0):
    import jax
    import optax
    import torch
    import transformers

    rng = np.random.default_rng(0)
    params = _tensors(rng)
    grads = [{k: (rng.standard_normal(v.shape) * (0.1 + i)).astype(np.float32) for k, v in params.items()}
             for i in range(steps)]
    cfg = base_config()
    cfg.train.optimizer, cfg.train.warmup_steps, cfg.train.weight_decay, cfg.train.grad_clip = (
        optimizer_name, warmup, wd, clip)
    opt, _ = make_optimizer(cfg, lr)
    p = jax.tree.map(jax.numpy.asarray, params)
    state = opt.init(p)
    update = jax.jit(opt.update)
    ours = []
    for g in grads:
        u, state = update(jax.tree.map(jax.numpy.asarray, g), state, p)
        p = optax.apply_updates(p, u)
        ours.append(jax.tree.map(np.asarray, p))

    tp = {k: torch.nn.Parameter(torch.tensor(_to_torch(k, v).copy())) for k, v in params.items()}
    if optimizer_name == "adafactor":
        topt = transformers.Adafactor(list(tp.values()), lr=lr, scale_parameter=False, relative_step=False,
                                      warmup_init=False, clip_threshold=clip, weight_decay=wd)
    else:
        topt = torch.optim.AdamW(list(tp.values()), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(topt, lambda s: s / max(1, warmup) if s < warmup else 1.0)
    theirs = []
    for g in grads:
        for k, v in tp.items():
            v.grad = torch.tensor(_to_torch(k, g[k]).copy())
        if optimizer_name == "adamw" and clip > 0:
            torch.nn.utils.clip_grad_norm_(list(tp.values()), clip)
        topt.step()
        sched.step()
        now = {k: v.detach().numpy().copy() for k, v in tp.items()}
        theirs.append({k: _to_torch(k, v) if v.ndim != 4 else v.transpose(2, 3, 1, 0) for k, v in now.items()})
    # _to_torch on 2-D is its own inverse (transpose); 4-D is mapped back explicitly above
    return params, ours, theirs


@pytest.mark.parametrize("name", ["adafactor", "adamw"])
def test_matches_pytorch_original(name):
    start, ours, theirs = _run(name)
    for step, (a, b) in enumerate(zip(ours, theirs)):
        for k in a:
            moved = np.abs(b[k] - start[k]).max()
            if step == 0:  # warm-up: the first update has lr 0 in both (torch LambdaLR at step 0)
                assert moved == 0.0 and np.abs(a[k] - start[k]).max() == 0.0
                continue
            # tolerance ~1e-3 of the total update so far
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-3 * moved + 1e-7, err_msg=f"{name} {k} step {step}")


def test_adafactor_is_not_optax_default():
    """The point of hf_adafactor: optax.adafactor's defaults (parameter scaling, no decay) give another update."""
    import jax
    import optax

    from ddspo_jax.optim import hf_adafactor

    rng = np.random.default_rng(1)
    p = {"w": jax.numpy.asarray(0.05 * rng.standard_normal((256, 130)).astype(np.float32))}  # weight-like scale
    g = {"w": jax.numpy.asarray(rng.standard_normal((256, 130)).astype(np.float32))}
    ours, _ = hf_adafactor(1e-2).update(g, hf_adafactor(1e-2).init(p), p)
    default, _ = optax.adafactor(1e-2).update(g, optax.adafactor(1e-2).init(p), p)
    rel = float(jax.numpy.abs(ours["w"] - default["w"]).max() / jax.numpy.abs(ours["w"]).max())
    assert rel > 0.03


def test_factor_axes_follow_the_torch_layout():
    z = np.zeros
    assert torch_factor_axes(z((5,))) is None
    assert torch_factor_axes(z((12, 7))) == (0, 1)      # torch (7, 12): dim -1 = in = our 0
    assert torch_factor_axes(z((3, 3, 4, 6))) == (1, 0)  # torch OIHW: dim -1 = W = our 1, dim -2 = H = our 0
