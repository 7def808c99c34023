"""Every objective against independent float64 NumPy math; golden cases; gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from ddspo_jax.losses import OBJECTIVES, preference_loss


def np_d(a, b):
    return ((np.float64(a) - np.float64(b)) ** 2).reshape(len(a), -1).mean(1)


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_reference(objective, p, beta, gamma=None, weight=None):
    """Independent float64 implementation of the issue's equations."""
    mw, ml, rw, rl, tw, tl, rn = (np.float64(p[k]) for k in
                                  ("model_w", "model_l", "ref_w", "ref_l", "target_w", "target_l", "ref_neg_l"))
    def inside(tw_, tl_):
        return (np_d(tw_, mw) - np_d(tw_, rw)) - (np_d(tl_, ml) - np_d(tl_, rl))
    w = np.ones(len(mw)) if weight is None else np.float64(weight)
    if objective == "dpo":
        ins = inside(tw, tl)
        return np.mean(w * -np_log_sigmoid(-0.5 * beta * ins)), ins
    if objective == "ddspo":
        ins = inside(rw, rn)
        return np.mean(w * -np_log_sigmoid(-0.5 * beta * ins)), ins
    if objective in ("dspo", "dspo_cpp"):
        ins = inside(tw, tl) if objective == "dspo" else inside(rw, rn)
        u = -0.5 * beta * ins
        g = beta if gamma is None else gamma
        s = (g * (1.0 - 1.0 / (1.0 + np.exp(-u))))[:, None, None, None]
        per = (((mw - tw) - s * (mw - rw)) ** 2).reshape(len(mw), -1).mean(1)
        return np.mean(w * per), ins
    if objective == "sft":
        return np.mean(w * np_d(tw, mw)), inside(tw, tl)
    if objective == "sft_pair":
        return np.mean(w * (np_d(tw, mw) + np_d(tl, ml))), None


def make_preds(seed=0, B=6, shape=(4, 4, 3), scale=0.1):
    rng = np.random.default_rng(seed)
    base = {k: rng.standard_normal((B, *shape)).astype(np.float32) for k in ("target_w", "target_l")}
    p = dict(base)
    # predictions near the targets, as trained models are
    for k, t in (("model_w", "target_w"), ("ref_w", "target_w"), ("model_l", "target_l"), ("ref_l", "target_l"),
                 ("ref_neg_l", "target_l")):
        p[k] = (base[t] + scale * rng.standard_normal((B, *shape))).astype(np.float32)
    return p


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("beta", [1.0, 50.0])
def test_matches_float64_numpy(objective, beta):
    p = make_preds(seed=hash(objective) % 1000)
    weight = np.linspace(0.1, 1.0, 6).astype(np.float32)
    for wgt in (None, weight):
        kw = dict(p)
        if objective not in ("ddspo", "dspo_cpp"):
            kw["ref_neg_l"] = None
        loss, m = preference_loss(objective, **{k: None if v is None else jnp.asarray(v) for k, v in kw.items()},
                                  beta=beta, weight=None if wgt is None else jnp.asarray(wgt))
        want, ins = np_reference(objective, p, beta, weight=wgt)
        np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-7)
        assert float(m["loss"]) == float(loss)
        if ins is None:  # sft_pair: two adapters' own errors, no preference
            continue
        np.testing.assert_allclose(float(m["inside"]), ins.mean(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(float(m["implicit_acc"]), np.mean(ins < 0), atol=1e-7)
        assert float(m["loss"]) == float(loss)


@pytest.mark.parametrize("objective", ["ddspo", "dspo_cpp"])
def test_dd_cpp_targets_from_the_trained_pair(objective):
    """With the pair's predictions (cpp_w, cpp_l) the CPP targets are theirs, with the reference terms
    d(cpp, ref) as usual (the release's dpo_loss with its --lora_path targets); float64 by hand."""
    p = make_preds(seed=8)
    rng = np.random.default_rng(9)
    cw = (p["target_w"] + 0.1 * rng.standard_normal(p["target_w"].shape)).astype(np.float32)
    cl = (p["target_l"] + 0.1 * rng.standard_normal(p["target_l"].shape)).astype(np.float32)
    loss, m = preference_loss(objective, **{k: jnp.asarray(v) for k, v in p.items()}, cpp_w=jnp.asarray(cw),
                              cpp_l=jnp.asarray(cl), beta=50.0)
    ins = (np_d(cw, p["model_w"]) - np_d(cw, p["ref_w"])) - (np_d(cl, p["model_l"]) - np_d(cl, p["ref_l"]))
    if objective == "ddspo":
        want = np.mean(-np_log_sigmoid(-0.5 * 50.0 * ins))
    else:
        s_ = (50.0 * (1.0 - 1.0 / (1.0 + np.exp(0.5 * 50.0 * ins))))[:, None, None, None]
        mw, tw, rw = (np.float64(p[k]) for k in ("model_w", "target_w", "ref_w"))
        want = np.mean((((mw - tw) - s_ * (mw - rw)) ** 2).reshape(len(mw), -1).mean(1))
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)
    np.testing.assert_allclose(float(m["inside"]), ins.mean(), rtol=1e-4)


def test_dspo_weight_separate_from_beta():
    p = make_preds(seed=3)
    jp = {k: jnp.asarray(v) for k, v in p.items()}
    loss, _ = preference_loss("dspo", **jp, beta=40.0, dspo_weight=0.5)
    want, _ = np_reference("dspo", p, 40.0, gamma=0.5)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)


@pytest.mark.parametrize("objective", ["ddspo", "dpo"])
def test_model_equal_ref_gives_log2(objective):
    p = make_preds(seed=1)
    p["model_w"], p["model_l"] = p["ref_w"], p["ref_l"]
    jp = {k: jnp.asarray(v) for k, v in p.items()}
    loss, m = preference_loss(objective, **jp, beta=16000.0)
    assert float(loss) == pytest.approx(np.log(2.0), abs=1e-7)
    assert float(m["implicit_acc"]) == 0.0  # inside == 0 is not "correct"


def test_dspo_sign_closer_to_winner_lowers_loss():
    """A model moved from the reference towards the winner's target scores a lower DSPO loss."""
    p = make_preds(seed=2, scale=0.5)
    p["model_l"] = p["ref_l"]
    base = dict(p, model_w=p["ref_w"])
    better = dict(p, model_w=p["ref_w"] + 0.5 * (p["target_w"] - p["ref_w"]))
    l0, _ = preference_loss("dspo", **{k: jnp.asarray(v) for k, v in base.items()}, beta=100.0)
    l1, m = preference_loss("dspo", **{k: jnp.asarray(v) for k, v in better.items()}, beta=100.0)
    assert float(l1) < float(l0)
    assert float(m["implicit_acc"]) == 1.0


def test_cpp_logit_direction():
    """DDSPO/DSPO+CPP: moving the losing prediction away from f_ref(x_t^l, c-) counts as correct."""
    p = make_preds(seed=6, scale=0.5)
    p["model_w"] = p["ref_w"]
    p["model_l"] = p["ref_l"] + 0.5 * (p["ref_l"] - p["ref_neg_l"])
    for obj in ("ddspo", "dspo_cpp"):
        _, m = preference_loss(obj, **{k: jnp.asarray(v) for k, v in p.items()}, beta=100.0)
        assert float(m["inside"]) < 0 and float(m["implicit_acc"]) == 1.0
    l_far, _ = preference_loss("ddspo", **{k: jnp.asarray(v) for k, v in p.items()}, beta=100.0)
    assert float(l_far) < np.log(2.0)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_gradients_finite_differences(objective):
    p = make_preds(seed=4, B=3, shape=(2, 2, 1), scale=0.3)
    with jax.enable_x64(True):
        jp = {k: jnp.asarray(v, jnp.float64) for k, v in p.items()}
        f = lambda mw, ml: preference_loss(objective, **dict(jp, model_w=mw, model_l=ml), beta=3.0)[0]
        check_grads(f, (jp["model_w"], jp["model_l"]), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_ddspo_gradient_flows_only_into_model():
    p = {k: jnp.asarray(v) for k, v in make_preds(seed=5).items()}
    names = list(p)
    g = jax.grad(lambda q: preference_loss("ddspo", **q, beta=10.0)[0])(p)
    for k in names:
        nonzero = bool(jnp.any(g[k] != 0))
        assert nonzero == k.startswith("model_"), k


def test_ddspo_requires_ref_neg():
    p = {k: jnp.asarray(v) for k, v in make_preds().items()}
    p["ref_neg_l"] = None
    with pytest.raises(ValueError, match="ref_neg_l"):
        preference_loss("ddspo", **p, beta=1.0)
    with pytest.raises(ValueError, match="unknown objective"):
        preference_loss("dpo2", **p, beta=1.0)

