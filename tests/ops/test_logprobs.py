"""Tests for rlhf_jax.ops.logprobs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import ops

from ._helpers import TraceCounter, assert_jit_matches, ragged_mask


def np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


class TestTokenLogprobs:
    def test_golden_vs_numpy_float64(self):
        rng = np.random.default_rng(0)
        logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 4
        tokens = rng.integers(0, 11, size=(3, 5))
        out = assert_jit_matches(ops.token_logprobs, jnp.asarray(logits), jnp.asarray(tokens))
        chex.assert_shape(out, (3, 5))
        chex.assert_type(out, jnp.float32)
        want = np.take_along_axis(np_log_softmax(logits), tokens[..., None], -1)[..., 0]
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)

    def test_hand_value(self):
        logits = jnp.log(jnp.array([[[0.2, 0.3, 0.5]]]))
        out = ops.token_logprobs(logits, jnp.array([[2]]))
        np.testing.assert_allclose(out, [[np.log(0.5)]], rtol=1e-6)

    def test_stable_for_huge_logits(self):
        logits = jnp.array([[[1e4, 1e4 - 1.0, -1e4]]])
        out = ops.token_logprobs(logits, jnp.array([[1]]))
        assert np.isfinite(out).all()  # f32 ulp at 1e4 is ~1e-3
        np.testing.assert_allclose(out, [[-1.0 - np.log1p(np.exp(-1.0))]], atol=2e-3)

    def test_bf16_inputs_computed_in_float32(self):
        rng = np.random.default_rng(1)
        logits = jnp.asarray(rng.normal(size=(2, 4, 64)) * 3, jnp.bfloat16)
        tokens = jnp.asarray(rng.integers(0, 64, size=(2, 4)))
        out = ops.token_logprobs(logits, tokens)
        chex.assert_type(out, jnp.float32)
        want = ops.token_logprobs(logits.astype(jnp.float32), tokens)
        np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)

    def test_float64_under_x64(self):
        with jax.enable_x64(True):
            logits = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3, 7)), jnp.float64)
            out = ops.token_logprobs(logits, jnp.zeros((2, 3), jnp.int32))
            assert out.dtype == jnp.float64
            np.testing.assert_allclose(out, np_log_softmax(logits)[..., 0], rtol=1e-12)

    def test_shape_errors(self):
        with pytest.raises(ValueError, match="token_logprobs"):
            ops.token_logprobs(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32))
        with pytest.raises(ValueError, match="rank 3"):
            ops.token_logprobs(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32))

    def test_one_trace_per_shape(self):
        f = TraceCounter(ops.token_logprobs)
        for _ in range(3):
            f(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32))
        assert f.traces == 1
        f(jnp.zeros((2, 4, 5)), jnp.zeros((2, 4), jnp.int32))
        assert f.traces == 2

    def test_vmap(self):
        rng = np.random.default_rng(3)
        logits = jnp.asarray(rng.normal(size=(4, 2, 3, 6)), jnp.float32)
        tokens = jnp.asarray(rng.integers(0, 6, size=(4, 2, 3)))
        out = jax.jit(jax.vmap(ops.token_logprobs))(logits, tokens)
        np.testing.assert_allclose(out, jax.jit(ops.token_logprobs)(logits.reshape(8, 3, 6), tokens.reshape(8, 3)).reshape(4, 2, 3), rtol=1e-6)


class TestEntropy:
    def test_uniform_is_log_v(self):
        out = assert_jit_matches(ops.entropy, jnp.zeros((2, 3, 10)))
        chex.assert_shape(out, (2, 3))
        np.testing.assert_allclose(out, np.full((2, 3), np.log(10)), rtol=1e-6)

    def test_golden_vs_numpy(self):
        logits = np.random.default_rng(4).normal(size=(2, 4, 9)) * 3
        logp = np_log_softmax(logits)
        want = -(np.exp(logp) * logp).sum(-1)
        np.testing.assert_allclose(ops.entropy(jnp.asarray(logits, jnp.float32)), want, rtol=1e-5, atol=1e-6)

    def test_minus_inf_logits_do_not_nan(self):
        logits = jnp.array([[[0.0, -jnp.inf, -jnp.inf], [0.0, 0.0, -jnp.inf]]])
        out = ops.entropy(logits)
        np.testing.assert_allclose(out, [[0.0, np.log(2)]], atol=1e-7)

    def test_bf16(self):
        logits = jnp.asarray(np.random.default_rng(5).normal(size=(2, 3, 32)), jnp.bfloat16)
        out = ops.entropy(logits)
        chex.assert_type(out, jnp.float32)
        np.testing.assert_allclose(out, ops.entropy(logits.astype(jnp.float32)), rtol=1e-6)


class TestSequenceLogprobs:
    def test_sum_and_mean_ignore_padding(self):
        logp = jnp.array([[-1.0, -2.0, jnp.nan], [-3.0, -jnp.inf, -jnp.inf], [jnp.nan, 0.0, 0.0]])
        mask = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
        total = assert_jit_matches(ops.sequence_logprobs, logp, mask)
        np.testing.assert_allclose(total, [-3.0, -3.0, 0.0])
        mean = ops.sequence_logprobs(logp, mask, average=True)
        np.testing.assert_allclose(mean, [-1.5, -3.0, 0.0])

    def test_padding_gets_no_gradient(self):
        mask = jnp.asarray(ragged_mask([2, 3], 4))
        g = jax.grad(lambda x: ops.sequence_logprobs(x, mask, average=True).sum())(jnp.zeros((2, 4)))
        np.testing.assert_allclose(g, np.where(mask, 1.0 / mask.sum(1, keepdims=True), 0.0), rtol=1e-6)
