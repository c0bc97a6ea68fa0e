"""Tests for rlhf_jax.ops.stats."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import ops

from ._helpers import assert_jit_matches, ragged_mask

X = np.array([[1.0, 2.0, 3.0, np.nan], [4.0, np.inf, -7.0, 0.5]], np.float32)
M = np.array([[1, 1, 1, 0], [1, 0, 0, 1]], np.int32)
REAL = np.array([1.0, 2.0, 3.0, 4.0, 0.5])


class TestMaskedSum:
    def test_golden_and_axis(self):
        np.testing.assert_allclose(assert_jit_matches(ops.masked_sum, jnp.asarray(X), jnp.asarray(M)), REAL.sum())
        np.testing.assert_allclose(ops.masked_sum(jnp.asarray(X), jnp.asarray(M), axis=1), [6.0, 4.5])


class TestMaskedMean:
    def test_golden(self):
        np.testing.assert_allclose(assert_jit_matches(ops.masked_mean, jnp.asarray(X), jnp.asarray(M)), REAL.mean(), rtol=1e-6)
        np.testing.assert_allclose(ops.masked_mean(jnp.asarray(X), jnp.asarray(M), axis=1), [2.0, 2.25], rtol=1e-6)

    def test_empty_is_zero_with_finite_gradient(self):
        x = jnp.ones((2, 3))
        assert float(ops.masked_mean(x, jnp.zeros((2, 3)))) == 0.0
        g = jax.grad(lambda v: ops.masked_mean(v, jnp.zeros((2, 3))))(x)
        np.testing.assert_array_equal(g, np.zeros((2, 3)))

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match="masked_mean"):
            ops.masked_mean(jnp.ones((2, 3)), jnp.ones((3, 2)))


class TestMaskedVar:
    def test_unbiased_and_biased(self):
        out = assert_jit_matches(ops.masked_var, jnp.asarray(X), jnp.asarray(M))
        np.testing.assert_allclose(out, np.var(REAL, ddof=1), rtol=1e-6)
        np.testing.assert_allclose(ops.masked_var(jnp.asarray(X), jnp.asarray(M), unbiased=False), np.var(REAL), rtol=1e-6)

    def test_single_element_is_zero(self):
        assert float(ops.masked_var(jnp.array([3.0, 9.0]), jnp.array([1, 0]))) == 0.0


class TestMaskedWhiten:
    def test_golden(self):
        out = assert_jit_matches(ops.masked_whiten, jnp.asarray(X), jnp.asarray(M))
        chex.assert_shape(out, X.shape)
        want = (REAL - REAL.mean()) / np.sqrt(np.var(REAL, ddof=1) + 1e-8)
        np.testing.assert_allclose(np.asarray(out)[M.astype(bool)], want, rtol=1e-5)
        assert (np.asarray(out)[~M.astype(bool)] == 0).all()

    def test_shift_mean_false_keeps_mean(self):
        out = ops.masked_whiten(jnp.asarray(X), jnp.asarray(M), shift_mean=False)
        want = (REAL - REAL.mean()) / np.sqrt(np.var(REAL, ddof=1) + 1e-8) + REAL.mean()
        np.testing.assert_allclose(np.asarray(out)[M.astype(bool)], want, rtol=1e-5)

    def test_float64(self):
        with jax.enable_x64(True):
            out = ops.masked_whiten(jnp.asarray(REAL, jnp.float64), jnp.ones(5))
            assert out.dtype == jnp.float64
            np.testing.assert_allclose(out, (REAL - REAL.mean()) / np.sqrt(np.var(REAL, ddof=1) + 1e-8), rtol=1e-12)


class TestExplainedVariance:
    def test_values(self):
        ret = jnp.array([[1.0, 2.0, 3.0, 100.0]])
        m = jnp.array([[1, 1, 1, 0]])
        np.testing.assert_allclose(assert_jit_matches(ops.explained_variance, ret, ret, m), 1.0)
        np.testing.assert_allclose(ops.explained_variance(jnp.full((1, 4), 2.0), ret, m), 0.0, atol=1e-6)
        v = jnp.array([[3.0, 2.0, 1.0, 0.0]])
        want = 1 - np.var(np.array([1, 2, 3.0]) - np.array([3, 2, 1.0])) / np.var([1, 2, 3.0])
        np.testing.assert_allclose(ops.explained_variance(v, ret, m), want, rtol=1e-6)

    def test_constant_returns_is_nan(self):
        assert np.isnan(ops.explained_variance(jnp.zeros((1, 3)), jnp.ones((1, 3)), jnp.ones((1, 3))))


class TestLastToken:
    def test_right_and_left_padding(self):
        x = jnp.arange(10).reshape(2, 5)
        right = jnp.asarray(ragged_mask([2, 5], 5))
        left = jnp.asarray(ragged_mask([2, 5], 5, left=True))
        np.testing.assert_array_equal(assert_jit_matches(ops.last_token, x, right), [1, 9])
        np.testing.assert_array_equal(ops.last_token(x, left), [4, 9])

    def test_trailing_feature_axes(self):
        x = jnp.arange(24.0).reshape(2, 3, 4)
        out = ops.last_token(x, jnp.array([[1, 1, 0], [1, 0, 0]]))
        chex.assert_shape(out, (2, 4))
        np.testing.assert_array_equal(out, np.asarray(x)[[0, 1], [1, 0]])

    def test_last_token_mask(self):
        out = ops.last_token_mask(jnp.array([[1, 1, 0], [0, 0, 0], [0, 1, 1]]))
        np.testing.assert_array_equal(out, [[0, 1, 0], [0, 0, 0], [0, 0, 1]])

    def test_shape_error(self):
        with pytest.raises(ValueError, match="last_token"):
            ops.last_token(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
