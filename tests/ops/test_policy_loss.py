"""Tests for rlhf_jax.ops.policy_loss."""

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

B, T = 4, 5
floats = st.floats(-2.0, 2.0, allow_nan=False, width=32)
arrays = st.lists(floats, min_size=B * T, max_size=B * T).map(lambda v: np.asarray(v, np.float32).reshape(B, T))
lengths = st.lists(st.integers(0, T), min_size=B, max_size=B)


def np_ppo(logp, old, adv, eps_low, eps_high, dual=None):
    ratio = np.exp(np.clip(logp - old, -20, 20))
    loss = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps_low, 1 + eps_high))
    if dual is not None:
        loss = np.where(adv < 0, np.minimum(loss, -adv * dual), loss)
    return loss


def _grad_wrt_logp(**kw):
    def total(lp, old, adv, m):
        return ops.ppo_policy_loss(lp, old, adv, m, **kw).sum()

    return jax.jit(jax.grad(total))


_grad_plain = _grad_wrt_logp()
_grad_dual = _grad_wrt_logp(clip_eps_high=0.28, dual_clip=3.0)


class TestPpoPolicyLoss:
    def _data(self, seed=0):
        rng = np.random.default_rng(seed)
        logp = rng.normal(size=(B, T)).astype(np.float32)
        old = (logp + rng.normal(scale=0.4, size=(B, T))).astype(np.float32)
        adv = rng.normal(size=(B, T)).astype(np.float32)
        return logp, old, adv, ragged_mask([5, 3, 0, 2], T)

    @pytest.mark.parametrize("kw", [{}, {"clip_eps": 0.1, "clip_eps_high": 0.3}, {"clip_eps_high": 0.28, "dual_clip": 3.0}])
    def test_golden_vs_numpy(self, kw):
        logp, old, adv, m = self._data()
        out = assert_jit_matches(ops.ppo_policy_loss, logp, old, adv, m, **kw)
        chex.assert_shape(out, (B, T))
        eps = kw.get("clip_eps", 0.2)
        want = np_ppo(logp, old, adv, eps, kw.get("clip_eps_high") or eps, kw.get("dual_clip"))
        np.testing.assert_allclose(out, np.where(m, want, 0), rtol=1e-5, atol=1e-6)

    def test_hand_values(self):
        # ratio e^{ln 1.5} = 1.5, A = 1 -> clipped at 1.2 -> loss -1.2; A = -1 -> max(1.5, 1.2) = 1.5;
        # A = -1 with ratio 5 and dual clip 3 -> min(5, 3) = 3.
        logp = jnp.log(jnp.array([[1.5, 1.5, 5.0]]))
        out = ops.ppo_policy_loss(logp, jnp.zeros((1, 3)), jnp.array([[1.0, -1.0, -1.0]]), jnp.ones((1, 3)), dual_clip=3.0)
        np.testing.assert_allclose(out, [[-1.2, 1.5, 3.0]], rtol=1e-6)

    def test_unclipped_gradient_is_minus_a_rho(self):
        logp, old, adv = jnp.array([[-1.0]]), jnp.array([[-1.05]]), jnp.array([[2.0]])
        g = _grad_plain(logp, old, adv, jnp.ones((1, 1)))
        np.testing.assert_allclose(g, [[-2.0 * np.exp(0.05)]], rtol=1e-6)

    @FAST
    @given(logp=arrays, delta=arrays, lens=lengths)
    def test_zero_advantage_gives_zero_gradient(self, logp, delta, lens):
        m = ragged_mask(lens, T)
        for grad in (_grad_plain, _grad_dual):
            g = grad(logp, logp + 0.2 * delta, np.zeros((B, T), np.float32), m)
            np.testing.assert_array_equal(g, np.zeros((B, T)))

    @FAST
    @given(logp=arrays, adv=arrays, lens=lengths)
    def test_masked_tokens_get_zero_gradient_even_with_nonfinite_padding(self, logp, adv, lens):
        m = ragged_mask(lens, T)
        lp = np.where(m, logp, -np.inf).astype(np.float32)
        old = np.where(m, logp - 0.1, np.nan).astype(np.float32)
        a = np.where(m, adv, np.inf).astype(np.float32)
        for grad in (_grad_plain, _grad_dual):
            g = np.asarray(grad(lp, old, a, m))
            assert np.isfinite(g).all()
            assert (g[~m] == 0).all()

    def test_bad_dual_clip(self):
        with pytest.raises(ValueError, match="dual_clip"):
            ops.ppo_policy_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones((1, 1)), dual_clip=0.5)

    def test_one_trace_per_shape(self):
        f = TraceCounter(ops.ppo_policy_loss, clip_eps=0.2)
        for seed in range(3):
            f(*self._data(seed))
        assert f.traces == 1


class TestPpoPolicyStats:
    def test_golden(self):
        logp = jnp.log(jnp.array([[1.5, 1.1, 0.5, 9.0]]))
        adv = jnp.array([[1.0, 1.0, 1.0, 1.0]])
        m = jnp.array([[1, 1, 1, 0]])
        s = assert_jit_matches(ops.ppo_policy_stats, logp, jnp.zeros((1, 4)), adv, m)
        assert isinstance(s, ops.PolicyStats)
        # clipped active where -A*clip(r) > -A*r: r=1.5 (clip to 1.2, -1.2 > -1.5); r=0.5 (clip 0.8: -0.8 < -0.5: no)
        np.testing.assert_allclose([s.clipped_sum, s.count, s.clip_fraction], [1.0, 3.0, 1 / 3], rtol=1e-6)
        r = np.array([1.5, 1.1, 0.5])
        np.testing.assert_allclose(s.approx_kl, np.mean(r - 1 - np.log(r)), rtol=1e-5)


class TestValueLoss:
    def test_golden(self):
        v = jnp.array([[1.0, 0.0, 2.0, 5.0]])
        old = jnp.array([[0.5, 0.5, 2.0, 0.0]])
        ret = jnp.array([[2.0, 0.0, 0.0, 0.0]])
        m = jnp.array([[1, 1, 1, 0]])
        out = assert_jit_matches(ops.value_loss, v, old, ret, m, clip_eps=0.2)
        # tok0: max((1-2)^2, (0.7-2)^2) = 1.69; tok1: max(0, 0.3^2) = 0.09; tok2: 4
        np.testing.assert_allclose(out, [[0.5 * 1.69, 0.5 * 0.09, 2.0, 0.0]], rtol=1e-5)
        clipped, count = ops.value_clip_fraction(v, old, ret, m, clip_eps=0.2)
        np.testing.assert_allclose([clipped, count], [2.0, 3.0])


_MODES = [("token-mean", None), ("seq-mean-token-mean", None), ("seq-mean-token-sum", None), ("constant", 8.0)]
_agg = {mode: jax.jit(functools.partial(ops.aggregate, mode=mode, constant=c)) for mode, c in _MODES}


class TestAggregate:
    loss = np.array([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [9.0, 9.0, 9.0], [0.5, 0.5, 0.5]], np.float32)
    mask = ragged_mask([3, 1, 0, 2], 3)

    @pytest.mark.parametrize(
        "mode,constant,want_sum,want_count",
        [
            ("token-mean", None, 11.0, 6.0),
            ("seq-mean-token-mean", None, 2.0 + 4.0 + 0.5, 3.0),
            ("seq-mean-token-sum", None, 11.0, 3.0),
            ("constant", 8.0, 11.0, 24.0),
        ],
    )
    def test_golden(self, mode, constant, want_sum, want_count):
        s, c = assert_jit_matches(ops.aggregate, self.loss, self.mask, mode=mode, constant=constant)
        np.testing.assert_allclose([s, c], [want_sum, want_count], rtol=1e-6)

    @FAST
    @given(loss=arrays, lens=lengths, cut=st.integers(0, B), cut2=st.integers(0, B))
    def test_split_invariance_every_mode(self, loss, lens, cut, cut2):
        """Sums and counts add across any split of the rows: Σsum/Σcount equals the full-batch value."""
        m = ragged_mask(lens, T)
        a, b = sorted((cut, cut2))
        for mode, _ in _MODES:
            full_s, full_c = _agg[mode](loss, m)
            parts = [ops.aggregate(loss[i:j], m[i:j], mode=mode, constant=dict(_MODES)[mode]) for i, j in ((0, a), (a, b), (b, B))]
            np.testing.assert_allclose(sum(float(p[0]) for p in parts), full_s, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(sum(float(p[1]) for p in parts), full_c, rtol=1e-6)

    def test_padding_rows_count_zero_and_nan_padding_ignored(self):
        loss = np.where(self.mask, self.loss, np.nan).astype(np.float32)
        for mode, c in _MODES:
            np.testing.assert_allclose(_agg[mode](loss, self.mask), _agg[mode](self.loss, self.mask), rtol=1e-6)

    def test_errors(self):
        with pytest.raises(ValueError, match="mode"):
            ops.aggregate(self.loss, self.mask, mode="mean")
        with pytest.raises(ValueError, match="constant"):
            ops.aggregate(self.loss, self.mask, mode="constant")
