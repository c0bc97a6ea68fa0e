"""Tests for rlhf_jax.ops.kl."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rlhf_jax import ops

from ._helpers import FAST, TraceCounter, assert_jit_matches, ragged_mask

B, T = 3, 6
floats = st.floats(-5.0, 5.0, allow_nan=False, width=32)
arrays_BxT = st.lists(floats, min_size=B * T, max_size=B * T).map(lambda v: np.asarray(v, np.float32).reshape(B, T))
lengths = st.lists(st.integers(0, T), min_size=B, max_size=B)

_kl = {k: jax.jit(functools.partial(ops.kl_estimate, kind=k)) for k in ops.kl.KL_KINDS}
_shaped = jax.jit(functools.partial(ops.kl_shaped_rewards, kl_coef=0.1, kind="k3"))


class TestKlEstimate:
    def test_golden(self):
        logp = jnp.array([-1.0, -2.0, -0.5])
        ref = jnp.array([-1.5, -1.0, -0.5])
        r = np.array([-0.5, 1.0, 0.0])
        np.testing.assert_allclose(assert_jit_matches(ops.kl_estimate, logp, ref, kind="k1"), -r, rtol=1e-6)
        np.testing.assert_allclose(ops.kl_estimate(logp, ref, kind="k2"), r**2 / 2, rtol=1e-6)
        np.testing.assert_allclose(ops.kl_estimate(logp, ref, kind="k3"), np.expm1(r) - r, rtol=1e-6)

    def test_unknown_kind(self):
        with pytest.raises(ValueError, match="k4"):
            ops.kl_estimate(jnp.zeros(2), jnp.zeros(2), kind="k4")

    @FAST
    @given(a=arrays_BxT, b=arrays_BxT)
    def test_k2_k3_non_negative(self, a, b):
        assert (np.asarray(_kl["k2"](a, b)) >= 0).all()
        assert (np.asarray(_kl["k3"](a, b)) >= -1e-6).all()

    def test_second_order_agreement(self):
        r = np.linspace(-1e-2, 1e-2, 21)
        logp = jnp.zeros_like(r)
        k2, k3 = _kl["k2"](logp, jnp.asarray(r)), _kl["k3"](logp, jnp.asarray(r))
        # k3 = r^2/2 + r^3/6 + ..., k2 = r^2/2: difference is third order
        np.testing.assert_allclose(k3, k2, atol=np.abs(r).max() ** 3)

    def test_expectations_match_exact_kl(self):
        """Under y ~ pi, E[k1] = E[k3] = KL(pi || ref) exactly (sum over a categorical)."""
        with jax.enable_x64(True):
            rng = np.random.default_rng(0)
            p, q = rng.dirichlet(np.ones(7)), rng.dirichlet(np.ones(7))
            logp, ref = jnp.log(jnp.asarray(p)), jnp.log(jnp.asarray(q))
            exact = float(np.sum(p * np.log(p / q)))
            for kind in ("k1", "k3"):
                est = float(jnp.sum(jnp.asarray(p) * ops.kl_estimate(logp, ref, kind=kind)))
                np.testing.assert_allclose(est, exact, rtol=1e-10)

    def test_float64_kept(self):
        with jax.enable_x64(True):
            out = ops.kl_estimate(jnp.zeros(3, jnp.float64), jnp.ones(3, jnp.float64), kind="k3")
            assert out.dtype == jnp.float64


class TestKlShapedRewards:
    def test_golden(self):
        logp = jnp.array([[-1.0, -1.0, -1.0], [-2.0, -1.0, 0.0]])
        ref = jnp.array([[-1.5, -0.5, 9.0], [-2.0, 0.0, 0.0]])
        mask = jnp.array([[1, 1, 0], [1, 1, 1]])
        score = jnp.array([2.0, -1.0])
        out = assert_jit_matches(ops.kl_shaped_rewards, score, logp, ref, mask, kl_coef=0.1)
        chex.assert_shape(out, (2, 3))
        # k1 = logp - ref
        want = np.array([[-0.1 * 0.5, -0.1 * -0.5 + 2.0, 0.0], [0.0, -0.1 * -1.0, -1.0]])
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-7)

    def test_traced_coef_and_one_trace(self):
        f = TraceCounter(lambda s, a, b, m, c: ops.kl_shaped_rewards(s, a, b, m, kl_coef=c))
        m = jnp.asarray(ragged_mask([1, 3], 3))
        for coef in (0.1, 0.2, 0.3):
            out = f(jnp.ones(2), jnp.zeros((2, 3)), jnp.ones((2, 3)), m, jnp.float32(coef))
            np.testing.assert_allclose(out.sum(), 2.0 + coef * 4, rtol=1e-6)  # k1 = logp - ref = -1 per token
        assert f.traces == 1

    def test_empty_row_gets_nothing(self):
        out = ops.kl_shaped_rewards(jnp.array([5.0]), jnp.zeros((1, 3)), jnp.zeros((1, 3)), jnp.zeros((1, 3)), kl_coef=0.1)
        np.testing.assert_array_equal(out, np.zeros((1, 3)))

    def test_score_shape_error(self):
        with pytest.raises(ValueError, match="score_B"):
            ops.kl_shaped_rewards(jnp.zeros(3), jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.ones((2, 4)), kl_coef=0.1)

    @FAST
    @given(a=arrays_BxT, b=arrays_BxT, junk=arrays_BxT, lens=lengths)
    def test_padding_invariance(self, a, b, junk, lens):
        mask = ragged_mask(lens, T)
        score = np.arange(B, dtype=np.float32)
        clean = _shaped(score, np.where(mask, a, 0), np.where(mask, b, 0), mask)
        dirty = _shaped(score, np.where(mask, a, junk), np.where(mask, b, junk * 3), mask)
        np.testing.assert_array_equal(clean, dirty)
        assert (np.asarray(clean)[~mask] == 0).all()


class TestKlInLoss:
    def test_without_old_is_estimator(self):
        a, b = jnp.array([[-1.0, -2.0]]), jnp.array([[-1.5, -1.0]])
        np.testing.assert_allclose(ops.kl_in_loss(a, b, kind="k2"), ops.kl_estimate(a, b, kind="k2"))

    def test_importance_weight_value(self):
        logp, ref, old = jnp.array([-1.0]), jnp.array([-1.5]), jnp.array([-1.2])
        out = assert_jit_matches(ops.kl_in_loss, logp, ref, kind="k3", old_logp_BxT=old)
        r = -0.5
        np.testing.assert_allclose(out, [np.exp(0.2) * (np.expm1(r) - r)], rtol=1e-6)

    def test_on_policy_gradient_is_k1(self):
        """With old = stop_grad(logp), d/dlogp [rho * k3] = -r: the unbiased KL gradient (not k3's)."""
        ref = jnp.array([-1.5, -0.2, -3.0])
        logp0 = jnp.array([-1.0, -1.0, -1.0])

        def f(lp):
            return ops.kl_in_loss(lp, ref, kind="k3", old_logp_BxT=jax.lax.stop_gradient(lp)).sum()

        g = jax.grad(f)(logp0)
        np.testing.assert_allclose(g, -(ref - logp0), rtol=1e-6)
