"""Tests for rlhf_jax.ops.ai_feedback: the pairwise judge's probability and the soft-label RM loss."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import ops
from rlhf_jax.ops.ai_feedback import pairwise_preference_prob, soft_bradley_terry_loss

from ._helpers import assert_jit_matches


def _loop_oracle(a, b, sa, sb, mask):
    """Per row, per principle, per order, in plain Python floats."""
    out = []
    for i in range(len(a)):
        probs = []
        for k in range(len(a[i])):
            if mask[i][k]:
                pa, pb = np.exp(a[i][k]), np.exp(b[i][k])
                qa, qb = np.exp(sa[i][k]), np.exp(sb[i][k])
                probs += [pa / (pa + pb), qb / (qa + qb)]
        out.append(sum(probs) / len(probs) if probs else 0.5)
    return np.array(out)


class TestPairwisePreferenceProb:
    def test_golden(self):
        # forward σ(−0.2 + 1.8) = σ(1.6) = 0.8320184; swapped σ(−0.5 + 1.0) = σ(0.5) = 0.6224593
        got = assert_jit_matches(pairwise_preference_prob, jnp.array([[-0.2]]), jnp.array([[-1.8]]),
                                 jnp.array([[-1.0]]), jnp.array([[-0.5]]))
        chex.assert_shape(got, (1,))
        np.testing.assert_allclose(got, [0.72723885], rtol=1e-6)

    def test_position_bias_cancels(self):
        # a judge that always says (A) with the same confidence, whatever the order: 0.5 exactly
        a, b = jnp.full((3, 2), -0.1), jnp.full((3, 2), -2.5)
        np.testing.assert_allclose(pairwise_preference_prob(a, b, a, b), 0.5, atol=1e-7)

    def test_swapping_the_pair_gives_one_minus(self):
        k = jax.random.split(jax.random.key(0), 4)
        a, b, sa, sb = (jax.random.normal(x, (5, 3)) for x in k)
        p = pairwise_preference_prob(a, b, sa, sb)
        q = pairwise_preference_prob(sa, sb, a, b)
        np.testing.assert_allclose(p + q, 1.0, rtol=1e-6)

    def test_loop_oracle_and_mask(self):
        rng = np.random.default_rng(0)
        a, b, sa, sb = (rng.normal(size=(6, 4)) for _ in range(4))
        mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0]])
        got = assert_jit_matches(pairwise_preference_prob, *(jnp.asarray(x, jnp.float32) for x in (a, b, sa, sb)),
                                 mask_BxK=jnp.asarray(mask))
        np.testing.assert_allclose(got, _loop_oracle(a, b, sa, sb, mask), rtol=1e-5)
        # masked principles never change a result, whatever their log-probs
        noisy = [np.where(mask > 0, x, 1e3) for x in (a, b, sa, sb)]
        np.testing.assert_allclose(pairwise_preference_prob(*(jnp.asarray(x, jnp.float32) for x in noisy),
                                                            mask_BxK=jnp.asarray(mask)), got, rtol=1e-6)

    def test_float64_and_shape_errors(self):
        with jax.enable_x64(True):
            x = jnp.asarray([[-0.3, -1.0]], jnp.float64)
            assert pairwise_preference_prob(x, x[:, ::-1], x[:, ::-1], x).dtype == jnp.float64
        with pytest.raises(ValueError, match="same shape"):
            pairwise_preference_prob(jnp.zeros((2, 3)), jnp.zeros((2, 2)), jnp.zeros((2, 3)), jnp.zeros((2, 3)))


class TestSoftBradleyTerryLoss:
    def test_golden(self):
        # Δ = 1: −0.7·log σ(1) − 0.3·log σ(−1) = 0.7·0.31326169 + 0.3·1.31326169 = 0.61326169
        got = assert_jit_matches(soft_bradley_terry_loss, jnp.array([1.5]), jnp.array([0.5]), jnp.array([0.7]))
        np.testing.assert_allclose(got, [0.61326169], rtol=1e-6)
        # margin m = 0.5: Δ = 0.5, p = 0.5: 0.5·(log(1+e^−0.5) + log(1+e^0.5)) = 0.5·(0.47407698 + 0.97407698)
        got = soft_bradley_terry_loss(jnp.array([1.5]), jnp.array([0.5]), jnp.array([0.5]), margin=0.5)
        np.testing.assert_allclose(got, [0.72407698], rtol=1e-6)

    def test_reduces_to_bradley_terry_at_prob_one(self):
        c, r = jax.random.normal(jax.random.key(1), (2, 8))
        for margin in (None, 0.3):
            np.testing.assert_allclose(soft_bradley_terry_loss(c, r, jnp.ones(8), margin=margin),
                                       ops.bradley_terry_loss(c, r, margin=margin), rtol=1e-6, atol=1e-7)
        # p = 0 is the loss of the swapped pair
        np.testing.assert_allclose(soft_bradley_terry_loss(c, r, jnp.zeros(8)), ops.bradley_terry_loss(r, c),
                                   rtol=1e-6, atol=1e-7)

    def test_parity_with_torch_bce_with_logits(self):
        torch = pytest.importorskip("torch")
        rng = np.random.default_rng(3)
        c, r, p = rng.normal(size=16), rng.normal(size=16), rng.uniform(size=16)
        want = torch.nn.functional.binary_cross_entropy_with_logits(
            torch.tensor(c - r), torch.tensor(p), reduction="none").numpy()
        with jax.enable_x64(True):
            got = soft_bradley_terry_loss(jnp.asarray(c), jnp.asarray(r), jnp.asarray(p))
            np.testing.assert_allclose(got, want, rtol=1e-12)

    def test_gradient_zero_at_calibrated_margin(self):
        # d/dΔ = σ(Δ) − p: zero where σ(Δ) = p
        p = jnp.array([0.8])
        delta = jnp.log(p / (1 - p))
        g = jax.grad(lambda c: soft_bradley_terry_loss(c, jnp.zeros(1), p).sum())(delta)
        np.testing.assert_allclose(g, 0.0, atol=1e-6)
