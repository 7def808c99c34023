"""All preference objectives behind one signature.

Every objective sees the same per-pair predictions ([B, ...] arrays):
  model_w = f_theta(x_t^w, t, c)    model_l = f_theta(x_t^l, t, c)      (trainable)
  ref_w   = f_ref(x_t^w, t, c)      ref_l   = f_ref(x_t^l, t, c)        (frozen)
  ref_neg_l = f_ref(x_t^l, t, c-)   (only ddspo / dspo_cpp; it costs a fourth forward)
  target_w, target_l = the schedule's training targets (noise, or velocity for flow models).
  cpp_w, cpp_l = DD-CPP's trained pair phi^w(x_t^w, t, c), phi^l(x_t^l, t, c) (replace ref_w / ref_neg_l as
                 the CPP targets when given)

d(a, b) is the per-sample mean squared error over all non-batch axes, the Diffusion-DPO reference
trainer's convention, against which the paper's beta values (16000 SD/SDXL, 2000 SANA) are calibrated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

OBJECTIVES = ("ddspo", "dpo", "dspo", "dspo_cpp", "sft", "sft_pair")
NEEDS_REF_NEG = ("ddspo", "dspo_cpp")  # the CPP objectives: their targets come from a contrastive policy pair
NEEDS_REF = ("ddspo", "dpo", "dspo", "dspo_cpp", "sft")  # sft_pair never runs the frozen reference


def _f32(a):
    """At least float32 (bf16 predictions are upcast; float64 stays for gradient checks)."""
    return a.astype(jnp.promote_types(a.dtype, jnp.float32))


def sq_err(a, b):
    """d(a, b): mean of (a - b)^2 over all non-batch axes, in float32 -> [B]."""
    diff = _f32(a) - _f32(b)
    return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def _inside(model_w, model_l, ref_w, ref_l, tw, tl):
    """inside = [d(tw, model_w) - d(tw, ref_w)] - [d(tl, model_l) - d(tl, ref_l)] (paper Eq. 3 / Eq. 5)."""
    mw, rw = sq_err(tw, model_w), sq_err(tw, ref_w)
    ml, rl = sq_err(tl, model_l), sq_err(tl, ref_l)
    return (mw - rw) - (ml - rl), dict(model_err_w=mw, ref_err_w=rw, model_err_l=ml, ref_err_l=rl)


def preference_loss(objective: str, *, model_w, model_l, ref_w=None, ref_l=None, target_w, target_l,
                    ref_neg_l=None, cpp_w=None, cpp_l=None, beta: float = 1.0, dspo_weight: float | None = None,
                    weight=None):
    """(loss, metrics) for one objective; `weight` is an optional per-pair loss weight [B].

    ddspo     Eq. 5: TF-CPP targets from the reference: winner ref_w (its reference term vanishes), loser
              ref_neg_l = f_ref(x_t^l, t, c-); DD-CPP (cpp_w, cpp_l given): the trained pair's predictions,
              both on c, with the usual reference terms (the release's --lora_path).
    dpo       Diffusion-DPO (Eq. 3): targets are the schedule's training targets.
    dspo      Eq. 6/33 with A(t)=1: ((model_w - target_w) - w (1 - sigmoid(u)) (model_w - ref_w))^2 with
              u = -0.5 beta inside_dpo; gradients flow through every model term, u included.
    dspo_cpp  DSPO whose u uses the DDSPO targets; the score-matching term keeps target_w.
    sft       plain denoising MSE on the winners.
    sft_pair  DD-CPP's first stage: model_w / model_l are two adapters, each fitted to its own images with
              plain denoising MSE (winner adapter on x^w, loser adapter on x^l); the sum of both.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    sg = jax.lax.stop_gradient
    target_w, target_l = sg(target_w), sg(target_l)
    if objective == "sft_pair":
        err_w, err_l = sq_err(target_w, model_w), sq_err(target_l, model_l)
        w = jnp.ones_like(err_w) if weight is None else weight.astype(jnp.float32)
        loss = jnp.mean(w * (err_w + err_l))
        return loss, {"loss": loss, "model_err_w": jnp.mean(err_w), "model_err_l": jnp.mean(err_l)}
    if objective in NEEDS_REF_NEG and ref_neg_l is None and cpp_w is None:
        raise ValueError(f"objective {objective!r} needs ref_neg_l = f_ref(x_t^l, t, c-) or the pair cpp_w, cpp_l")
    ref_w, ref_l = sg(ref_w), sg(ref_l)

    if objective in NEEDS_REF_NEG and cpp_w is not None:
        tw, tl = sg(cpp_w), sg(cpp_l)
    elif objective in NEEDS_REF_NEG:
        tw, tl = ref_w, sg(ref_neg_l)
    else:
        tw, tl = target_w, target_l
    inside, errs = _inside(model_w, model_l, ref_w, ref_l, tw, tl)
    logit = -0.5 * beta * inside
    w = jnp.ones_like(inside) if weight is None else weight.astype(jnp.float32)

    if objective in ("ddspo", "dpo"):
        per_pair = -jax.nn.log_sigmoid(logit)
    elif objective in ("dspo", "dspo_cpp"):
        gamma = beta if dspo_weight is None else dspo_weight
        scale = gamma * (1.0 - jax.nn.sigmoid(logit))
        scale = jnp.reshape(scale, scale.shape + (1,) * (model_w.ndim - 1))
        resid = (_f32(model_w) - _f32(target_w)) - scale * (_f32(model_w) - _f32(ref_w))
        per_pair = jnp.mean(jnp.square(resid), axis=tuple(range(1, resid.ndim)))
    else:  # sft
        per_pair = sq_err(target_w, model_w)
    loss = jnp.mean(w * per_pair)

    metrics = {
        "loss": loss,
        "implicit_acc": jnp.mean((inside < 0).astype(jnp.float32)),
        "inside": jnp.mean(inside),
        **{k: jnp.mean(v) for k, v in errs.items()},
    }
    return loss, metrics

