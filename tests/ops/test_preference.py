"""Tests for rlhf_jax.ops.preference: SimPO, ORPO, KTO, Bradley–Terry (float64 numpy goldens)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import ops

from ._helpers import assert_jit_matches


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


C = np.array([-0.4, -1.2, -0.05, -2.0])
R = np.array([-0.9, -0.8, -3.0, -2.0])


class TestSimpoLoss:
    def test_golden(self):
        out = assert_jit_matches(ops.simpo_loss, jnp.asarray(C, jnp.float32), jnp.asarray(R, jnp.float32), beta=2.0, gamma=0.5)
        chex.assert_shape(out, (4,))
        np.testing.assert_allclose(out[0], -logsig(2.0 * (C - R) - 0.5), rtol=1e-5)
        np.testing.assert_allclose(out[1], 2.0 * C, rtol=1e-6)
        np.testing.assert_allclose(out[2], 2.0 * R, rtol=1e-6)

    def test_label_smoothing_float64(self):
        with jax.enable_x64(True):
            out = ops.simpo_loss(jnp.asarray(C), jnp.asarray(R), beta=2.5, gamma=1.0, label_smoothing=0.1)[0]
            x = 2.5 * (C - R) - 1.0
            np.testing.assert_allclose(out, -0.9 * logsig(x) - 0.1 * logsig(-x), rtol=1e-12)


class TestOrpoLoss:
    def test_golden_float64(self):
        with jax.enable_x64(True):
            nll = -C
            loss, cr, rr = ops.orpo_loss(jnp.asarray(C), jnp.asarray(R), beta=0.1, chosen_nll_B=jnp.asarray(nll))
            log_odds = (C - R) - (np.log1p(-np.exp(C)) - np.log1p(-np.exp(R)))
            np.testing.assert_allclose(loss, nll - 0.1 * logsig(log_odds), rtol=1e-12)
            np.testing.assert_allclose(ops.orpo_log_odds(jnp.asarray(C), jnp.asarray(R)), log_odds, rtol=1e-12)
            np.testing.assert_allclose(cr, 0.1 * C, rtol=1e-12)
            np.testing.assert_allclose(rr, 0.1 * R, rtol=1e-12)

    def test_near_zero_logp_is_finite(self):
        out = jax.jit(lambda c, r: ops.orpo_loss(c, r, beta=0.1))(jnp.array([-1e-7]), jnp.array([-5.0]))[0]
        assert np.isfinite(out).all()
        g = jax.grad(lambda c: ops.orpo_loss(c, jnp.array([-5.0]), beta=0.1)[0].sum())(jnp.array([-1e-3]))
        assert np.isfinite(g).all()


class TestKtoLoss:
    pol = np.array([-10.0, -12.0, -9.0, -20.0])
    ref = np.array([-10.5, -11.0, -9.5, -19.0])
    good = np.array([1, 0, 1, 0])

    def test_golden(self):
        out = assert_jit_matches(
            ops.kto_loss, jnp.asarray(self.pol), jnp.asarray(self.ref), jnp.asarray(self.good), kl=0.3,
            beta=0.1, desirable_weight=1.5, undesirable_weight=0.7, rtol=1e-5,
        )  # fmt: skip
        u = self.pol - self.ref
        want = np.where(self.good == 1, 1.5 * (1 - sig(0.1 * (u - 0.3))), 0.7 * (1 - sig(0.1 * (0.3 - u))))
        np.testing.assert_allclose(out[0], want, rtol=1e-5)
        np.testing.assert_allclose(out[1], 0.1 * u, rtol=1e-5)

    def test_negative_kl_clamped_and_no_gradient_through_kl(self):
        a = ops.kto_loss(jnp.asarray(self.pol), jnp.asarray(self.ref), jnp.asarray(self.good), kl=-2.0)[0]
        b = ops.kto_loss(jnp.asarray(self.pol), jnp.asarray(self.ref), jnp.asarray(self.good), kl=0.0)[0]
        np.testing.assert_allclose(a, b)
        g = jax.grad(lambda k: ops.kto_loss(jnp.asarray(self.pol), jnp.asarray(self.ref), jnp.asarray(self.good), kl=k)[0].sum())(0.5)
        assert float(g) == 0.0

    def test_apo_zero_unpaired(self):
        out = ops.kto_loss(jnp.asarray(self.pol), jnp.asarray(self.ref), jnp.asarray(self.good), kl=1.0, loss_type="apo_zero_unpaired")[0]
        u = self.pol - self.ref
        np.testing.assert_allclose(out, np.where(self.good == 1, 1 - sig(0.1 * u), sig(0.1 * u)), rtol=1e-6)

    def test_kl_baseline(self):
        out = ops.kto_kl_baseline(jnp.array([-3.0, -4.0]), jnp.array([-3.5, -3.0]))
        np.testing.assert_allclose(out, 0.0)  # mean = -0.25, clamped
        np.testing.assert_allclose(ops.kto_kl_baseline(jnp.array([-3.0, -4.0]), jnp.array([-3.5, -5.0])), 0.75)

    def test_bad_loss_type(self):
        with pytest.raises(ValueError, match="loss_type"):
            ops.kto_loss(jnp.zeros(2), jnp.zeros(2), jnp.ones(2), kl=0.0, loss_type="bco")


class TestBradleyTerryLoss:
    def test_golden_and_margin(self):
        c, r = jnp.array([1.0, -2.0, 30.0]), jnp.array([0.0, 1.0, -30.0])
        out = assert_jit_matches(ops.bradley_terry_loss, c, r)
        np.testing.assert_allclose(out, np.logaddexp(0, -(np.asarray(c) - np.asarray(r))), rtol=1e-6)
        m = jnp.array([0.5, 0.0, 1.0])
        np.testing.assert_allclose(
            ops.bradley_terry_loss(c, r, margin=m), np.logaddexp(0, -(np.asarray(c) - np.asarray(r) - np.asarray(m))), rtol=1e-6
        )

    def test_gradient_is_sigmoid(self):
        g = jax.grad(lambda c: ops.bradley_terry_loss(c, jnp.zeros(2)).sum())(jnp.array([0.0, 2.0]))
        np.testing.assert_allclose(g, -sig(-np.array([0.0, 2.0])), rtol=1e-6)

    def test_shape_error(self):
        with pytest.raises(ValueError, match="bradley_terry_loss"):
            ops.bradley_terry_loss(jnp.zeros(2), jnp.zeros(3))
