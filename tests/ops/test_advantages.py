"""Tests for rlhf_jax.ops.advantages."""

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

B, T = 4, 7


def gae_oracle(rewards, values, lengths, gamma, lam):
    """Plain Python loop, float64, one row at a time over its real prefix."""
    adv = np.zeros_like(rewards, np.float64)
    for b, n in enumerate(lengths):
        last = 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    ret = np.where(ragged_mask(lengths, rewards.shape[1]), adv + values, 0.0)
    return adv, ret


def _data(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, T)).astype(np.float32), rng.normal(size=(B, T)).astype(np.float32)


_gae = {gl: jax.jit(functools.partial(ops.gae, gamma=gl[0], lam=gl[1])) for gl in [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0)]}
floats = st.floats(-3, 3, allow_nan=False, width=32)
arrays = st.lists(floats, min_size=B * T, max_size=B * T).map(lambda v: np.asarray(v, np.float32).reshape(B, T))
lengths = st.lists(st.integers(0, T), min_size=B, max_size=B)


class TestGae:
    @pytest.mark.parametrize("gamma,lam", list(_gae))
    def test_matches_python_loop_on_ragged_masks(self, gamma, lam):
        r, v = _data(0)
        lens = [7, 3, 0, 1]
        adv, ret = _gae[(gamma, lam)](r, v, ragged_mask(lens, T))
        chex.assert_shape((adv, ret), (B, T))
        want_adv, want_ret = gae_oracle(r, v, lens, gamma, lam)
        np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)

    def test_gamma_lambda_one_is_reward_to_go_minus_value(self):
        r, v = _data(1)
        lens = [7, 5, 2, 6]
        mask = ragged_mask(lens, T)
        adv, ret = assert_jit_matches(ops.gae, r, v, mask, gamma=1.0, lam=1.0, rtol=1e-5, atol=1e-5)
        rtg = np.where(mask, np.cumsum(np.where(mask, r, 0)[:, ::-1], axis=1)[:, ::-1], 0)
        np.testing.assert_allclose(adv, np.where(mask, rtg - v, 0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, rtg, rtol=1e-5, atol=1e-5)

    @FAST
    @given(r=arrays, v=arrays, junk=arrays, lens=lengths)
    def test_padding_invariance(self, r, v, junk, lens):
        mask = ragged_mask(lens, T)
        f = _gae[(0.99, 0.9)]
        clean = f(np.where(mask, r, 0), np.where(mask, v, 0), mask)
        dirty = f(np.where(mask, r, junk), np.where(mask, v, -junk), mask)
        np.testing.assert_array_equal(clean[0], dirty[0])
        np.testing.assert_array_equal(clean[1], dirty[1])
        assert (np.asarray(clean[0])[~mask] == 0).all()

    def test_extra_trailing_padding_changes_nothing(self):
        r, v = _data(2)
        mask = ragged_mask([7, 3, 4, 1], T)
        a1, r1 = _gae[(0.99, 0.9)](r, v, mask)
        pad = lambda x: np.concatenate([x, np.full((B, 3), 5.0, x.dtype)], 1)  # noqa: E731
        a2, r2 = ops.gae(pad(r), pad(v), np.concatenate([mask, np.zeros((B, 3), bool)], 1), gamma=0.99, lam=0.9)
        np.testing.assert_allclose(a2[:, :T], a1, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(r2[:, :T], r1, rtol=1e-6, atol=1e-6)

    def test_one_trace_per_shape(self):
        f = TraceCounter(ops.gae, gamma=1.0, lam=0.95)
        for seed in range(3):
            r, v = _data(seed)
            f(r, v, ragged_mask([1, 2, 3, 4], T))
        assert f.traces == 1

    def test_vmap_over_leading_axis(self):
        r, v = _data(4)
        mask = ragged_mask([7, 3, 4, 1], T)
        f = jax.jit(jax.vmap(functools.partial(ops.gae, gamma=0.99, lam=0.9)))
        adv, _ = f(r.reshape(2, 2, T), v.reshape(2, 2, T), mask.reshape(2, 2, T))
        np.testing.assert_allclose(adv.reshape(B, T), _gae[(0.99, 0.9)](r, v, mask)[0], rtol=1e-6, atol=1e-6)

    def test_float64(self):
        with jax.enable_x64(True):
            r, v = (x.astype(np.float64) for x in _data(3))
            lens = [7, 2, 5, 0]
            adv, _ = ops.gae(jnp.asarray(r), jnp.asarray(v), ragged_mask(lens, T), gamma=0.9, lam=0.8)
            assert adv.dtype == jnp.float64
            np.testing.assert_allclose(adv, gae_oracle(r, v, lens, 0.9, 0.8)[0], rtol=1e-12)


class TestDiscountedReturns:
    def test_golden(self):
        r = np.array([[1.0, 2.0, 4.0, 8.0]], np.float32)
        out = ops.discounted_returns(r, np.array([[1, 1, 1, 0]]), gamma=0.5)
        np.testing.assert_allclose(out, [[1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4, 0]])


class TestGroupAdvantages:
    r = np.array([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], np.float32)

    def test_group_scale(self):
        out = assert_jit_matches(ops.group_advantages, jnp.asarray(self.r), group_size=3)
        g = self.r.reshape(2, 3)
        want = (g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)
        np.testing.assert_allclose(out, want.reshape(-1), rtol=1e-6)

    def test_batch_and_none(self):
        g = self.r.reshape(2, 3)
        centred = (g - g.mean(1, keepdims=True)).reshape(-1)
        np.testing.assert_allclose(ops.group_advantages(self.r, group_size=3, scale="none"), centred, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(
            ops.group_advantages(self.r, group_size=3, scale="batch"), centred / (self.r.std(ddof=1) + 1e-4), rtol=1e-6, atol=1e-7
        )

    def test_constant_group_is_zero(self):
        np.testing.assert_array_equal(ops.group_advantages(jnp.ones(4), group_size=2), np.zeros(4))

    def test_errors(self):
        with pytest.raises(ValueError, match="multiple of group_size"):
            ops.group_advantages(jnp.ones(5), group_size=2)
        with pytest.raises(ValueError, match="group_size >= 2"):
            ops.group_advantages(jnp.ones(4), group_size=1)
        with pytest.raises(ValueError, match="scale"):
            ops.group_advantages(jnp.ones(4), group_size=2, scale="std")


class TestRlooAdvantages:
    def test_leave_one_out(self):
        r = jnp.array([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
        out = assert_jit_matches(ops.rloo_advantages, r, group_size=3)
        np.testing.assert_allclose(out, [1 - 4, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0], rtol=1e-6)
        g = np.asarray(r).reshape(2, 3)
        np.testing.assert_allclose(out, (1.5 * (g - g.mean(1, keepdims=True))).reshape(-1), rtol=1e-6)

    def test_normalize(self):
        r = np.array([1.0, 2.0, 6.0, 0.0, 0.0, 3.0], np.float32)
        out = ops.rloo_advantages(r, group_size=3, normalize=True)
        raw = np.asarray(ops.rloo_advantages(r, group_size=3))
        np.testing.assert_allclose(out, (raw - raw.mean()) / (raw.std(ddof=1) + 1e-4), rtol=1e-5, atol=1e-6)

    def test_errors(self):
        with pytest.raises(ValueError, match="group_size must be >= 2"):
            ops.rloo_advantages(jnp.ones(3), group_size=1)
