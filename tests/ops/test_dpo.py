"""Tests for rlhf_jax.ops.dpo: an independent float64 numpy re-derivation of TRL's DPOTrainer formulas."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import ops


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_scores(u, f, alpha):
    if f == "reverse_kl":
        return u
    if f == "forward_kl":
        return 1 - np.exp(-u)
    if f == "js_divergence":
        return np.log(2) + logsig(u)
    return (np.exp(np.minimum((alpha - 1) * u, 80.0)) - 1) / (alpha - 1)


def np_dpo(pc, pr, rc, rr, *, beta, loss_type, ls=0.0, lc=None, lr=None, f="reverse_kl", alpha=0.5, tau=0.05, delta=0.0):
    """TRL 1.x DPOTrainer._compute_loss, transcribed per loss type in float64 numpy."""
    uc, ur = pc - rc, pr - rr
    sc, sr = np_scores(uc, f, alpha), np_scores(ur, f, alpha)
    d = sc - sr
    x = beta * d
    if loss_type == "sigmoid":
        loss = -(1 - ls) * logsig(x) - ls * logsig(-x)
    elif loss_type == "hinge":
        loss = np.maximum(0.0, 1 - x)
    elif loss_type == "ipo":
        loss = (sc / np.maximum(lc, 1) - sr / np.maximum(lr, 1) - 1 / (2 * beta)) ** 2
    elif loss_type == "exo_pair":
        e = ls
        loss = sig(x) * (logsig(x) - np.log1p(-e)) + sig(-x) * (logsig(-x) - np.log(e))
    elif loss_type == "nca_pair":
        loss = -logsig(beta * uc) - 0.5 * logsig(-beta * uc) - 0.5 * logsig(-beta * ur)
    elif loss_type == "robust":
        loss = (-(1 - ls) * logsig(x) - (-ls * logsig(-x))) / (1 - 2 * ls)
    elif loss_type == "bco_pair":
        loss = -logsig(beta * uc - delta) - logsig(-(beta * ur - delta))
    elif loss_type == "sppo_hard":
        loss = (uc - 0.5 / beta) ** 2 + (ur + 0.5 / beta) ** 2
    elif loss_type == "aot":
        dd = np.sort(pc - pr) - np.sort(rc - rr)
        loss = -logsig(beta * dd) * (1 - ls) - logsig(-beta * dd) * ls
    elif loss_type == "aot_unpaired":
        dd = np.sort(uc) - np.sort(ur)
        loss = -logsig(beta * dd) * (1 - ls) - logsig(-beta * dd) * ls
    elif loss_type == "apo_zero":
        loss = (1 - sig(beta * uc)) + sig(beta * ur)
    elif loss_type == "apo_down":
        loss = sig(beta * uc) + (1 - sig(x))
    elif loss_type == "discopop":
        w = sig(x / tau)
        loss = -logsig(x) * (1 - w) + np.exp(-x) * w
    elif loss_type == "sigmoid_norm":
        loss = -logsig(beta * (sc / np.maximum(lc, 1) - sr / np.maximum(lr, 1)))
    else:
        raise AssertionError(loss_type)
    return loss, beta * uc, beta * ur


def _inputs(seed=0, b=6):
    rng = np.random.default_rng(seed)
    pc = -rng.uniform(5, 40, b)
    pr = -rng.uniform(5, 40, b)
    rc = pc + rng.normal(scale=1.5, size=b)
    rr = pr + rng.normal(scale=1.5, size=b)
    lc = rng.integers(0, 30, b).astype(np.float64)  # includes possible 0 -> clamped to 1
    lr = rng.integers(1, 30, b).astype(np.float64)
    return pc, pr, rc, rr, lc, lr


CASES = [(t, f) for t in ops.DPO_LOSS_TYPES for f in ("reverse_kl",)] + [
    (t, f) for t in ("sigmoid", "ipo", "hinge", "discopop", "sigmoid_norm") for f in ("forward_kl", "js_divergence", "alpha_divergence")
]


class TestDpoLoss:
    @pytest.mark.parametrize("loss_type,f", CASES)
    def test_matches_numpy_float64_rederivation(self, loss_type, f):
        pc, pr, rc, rr, lc, lr = _inputs()
        kw = dict(beta=0.1, loss_type=loss_type, label_smoothing=0.1 if loss_type in ("robust", "aot", "exo_pair") else 0.0,
                  f_divergence=f, alpha=0.3, bco_delta=0.05 if loss_type == "bco_pair" else 0.0)  # fmt: skip
        with jax.enable_x64(True):
            args = [jnp.asarray(a, jnp.float64) for a in (pc, pr, rc, rr)]
            out = ops.dpo_loss(*args, chosen_lengths_B=jnp.asarray(lc), rejected_lengths_B=jnp.asarray(lr), **kw)
            assert all(o.dtype == jnp.float64 for o in out)
        want = np_dpo(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, ls=kw["label_smoothing"], lc=lc, lr=lr, f=f, alpha=0.3,
                      delta=kw["bco_delta"])  # fmt: skip
        for got, exp in zip(out, want):
            np.testing.assert_allclose(np.asarray(got), exp, rtol=1e-10, atol=1e-12)

    @pytest.mark.parametrize("loss_type", ops.DPO_LOSS_TYPES)
    def test_float32_jit_matches_eager(self, loss_type):
        pc, pr, rc, rr, lc, lr = (jnp.asarray(a, jnp.float32) for a in _inputs(1))

        ls = 1e-3 if loss_type == "exo_pair" else 0.0  # exo_pair needs label_smoothing > 0 (as TRL)

        def f(a, b, c, d, e, g):
            return ops.dpo_loss(a, b, c, d, beta=0.2, loss_type=loss_type, chosen_lengths_B=e, rejected_lengths_B=g,
                                label_smoothing=ls)

        eager, jitted = f(pc, pr, rc, rr, lc, lr), jax.jit(f)(pc, pr, rc, rr, lc, lr)
        chex.assert_shape(eager, (6,))
        for a, b in zip(eager, jitted):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        want = np_dpo(*(np.asarray(x, np.float64) for x in (pc, pr, rc, rr)), beta=0.2, loss_type=loss_type,
                      lc=np.asarray(lc), lr=np.asarray(lr), ls=ls)[0]  # fmt: skip
        np.testing.assert_allclose(eager[0], want, rtol=1e-4, atol=1e-5)

    def test_sigmoid_hand_value_and_cdpo(self):
        # logits = beta * ((-1 - -2) - (-3 - -3)) = 0.5 ; loss = -log sigmoid(0.5)
        args = [jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-3.0])]
        loss, cr, rr = ops.dpo_loss(*args, beta=0.5)
        np.testing.assert_allclose(loss, [np.log1p(np.exp(-0.5))], rtol=1e-6)
        np.testing.assert_allclose([cr[0], rr[0]], [0.5, 0.0], atol=1e-7)
        smooth = ops.dpo_loss(*args, beta=0.5, label_smoothing=0.2)[0]
        np.testing.assert_allclose(smooth, [0.8 * np.log1p(np.exp(-0.5)) + 0.2 * np.log1p(np.exp(0.5))], rtol=1e-6)

    def test_aot_couples_the_batch(self):
        pc, pr, rc, rr, _, _ = (jnp.asarray(a, jnp.float32) for a in _inputs(2))
        full = ops.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="aot_unpaired")[0]
        half = ops.dpo_loss(pc[:3], pr[:3], rc[:3], rr[:3], beta=0.1, loss_type="aot_unpaired")[0]
        assert not np.allclose(np.sort(np.asarray(full))[:3], np.sort(np.asarray(half)))
        perm = np.array([3, 1, 5, 0, 2, 4])
        permuted = ops.dpo_loss(pc[perm], pr[perm], rc[perm], rr[perm], beta=0.1, loss_type="aot_unpaired")[0]
        np.testing.assert_allclose(np.mean(permuted), np.mean(full), rtol=1e-6)

    def test_rewards_are_stop_gradient_and_loss_differentiable(self):
        pc, pr, rc, rr, lc, lr = (jnp.asarray(a, jnp.float32) for a in _inputs(3))
        for loss_type in ops.DPO_LOSS_TYPES:
            kw = dict(beta=0.1, loss_type=loss_type, chosen_lengths_B=lc, rejected_lengths_B=lr,
                      label_smoothing=1e-3 if loss_type == "exo_pair" else 0.0)
            g_rew = jax.grad(lambda x: ops.dpo_loss(x, pr, rc, rr, **kw)[1].sum())(pc)  # noqa: B023
            np.testing.assert_array_equal(g_rew, np.zeros(6))
            g = jax.grad(lambda x: ops.dpo_loss(x, pr, rc, rr, **kw)[0].mean())(pc)  # noqa: B023
            assert np.isfinite(g).all() and np.abs(g).sum() > 0, loss_type

    def test_errors(self):
        z = jnp.zeros(2)
        with pytest.raises(ValueError, match="loss_type"):
            ops.dpo_loss(z, z, z, z, beta=0.1, loss_type="nope")
        with pytest.raises(ValueError, match="chosen_lengths_B"):
            ops.dpo_loss(z, z, z, z, beta=0.1, loss_type="ipo")
        with pytest.raises(ValueError, match="f_divergence"):
            ops.dpo_loss(z, z, z, z, beta=0.1, f_divergence="tv")
        with pytest.raises(ValueError, match="robust"):
            ops.dpo_loss(z, z, z, z, beta=0.1, loss_type="robust", label_smoothing=0.5)
        with pytest.raises(ValueError, match="same shape"):
            ops.dpo_loss(z, jnp.zeros(3), z, z, beta=0.1)

    def test_vmap_over_leading_axis(self):
        pc, pr, rc, rr, _, _ = (jnp.asarray(a, jnp.float32) for a in _inputs(4))
        f = jax.jit(jax.vmap(lambda *a: ops.dpo_loss(*a, beta=0.1)[0]))
        out = f(*(x.reshape(2, 3) for x in (pc, pr, rc, rr)))
        np.testing.assert_allclose(out.reshape(-1), ops.dpo_loss(pc, pr, rc, rr, beta=0.1)[0], rtol=1e-6)

    def test_alpha_one_is_reverse_kl(self):
        u = jnp.array([0.3, -2.0])
        np.testing.assert_allclose(ops.f_divergence_scores(u, f_divergence="alpha_divergence", alpha=1.0), u)
