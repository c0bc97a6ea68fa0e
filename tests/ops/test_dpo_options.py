"""Hand-computed golden values, masks, jit and errors of rlhf_jax.ops.dpo_options and dpo_loss's combined losses."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import ops

NAN = float("nan")


def test_sft_nll_golden_and_padding_ignored():
    logp = jnp.array([[-1.0, -2.0, NAN], [-3.0, NAN, -jnp.inf]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    assert float(ops.sft_nll(logp, mask)) == pytest.approx(2.0)  # (1 + 2 + 3) / 3 tokens
    assert float(ops.sft_nll_from_sums(jnp.array([-3.0, -3.0]), jnp.array([2, 1]))) == pytest.approx(2.0)
    assert float(ops.sft_nll(logp, jnp.zeros_like(mask))) == 0.0  # no token: 0, not NaN


def test_ld_logps_golden():
    # chosen [-1, -2, -3] (3 tokens), rejected [-4] (1 token): shared length 1, tail weighted by alpha
    logp = jnp.array([[-1.0, -2.0, -3.0], [-4.0, NAN, NAN]])
    mask = jnp.array([[1, 1, 1], [1, 0, 0]])
    np.testing.assert_allclose(ops.ld_logps(logp, mask, ld_alpha=0.5), [-1.0 - 0.5 * 5.0, -4.0])
    np.testing.assert_allclose(ops.ld_logps(logp, mask, ld_alpha=0.0), [-1.0, -4.0])
    # left padding (prompt positions before the completion) does not shift the shared length
    shifted = jnp.array([[9.0, -1.0, -2.0, -3.0], [9.0, 9.0, -4.0, 9.0]])
    mask_s = jnp.array([[0, 1, 1, 1], [0, 0, 1, 0]])
    np.testing.assert_allclose(ops.ld_logps(shifted, mask_s, ld_alpha=0.5), [-3.5, -4.0])
    with pytest.raises(ValueError, match="ld_alpha"):
        ops.ld_logps(logp, mask, ld_alpha=1.5)
    with pytest.raises(ValueError, match="even row count"):
        ops.ld_logps(logp[:1], mask[:1], ld_alpha=0.5)


def test_wpo_weights_and_log_sum_sq_probs_golden():
    w = ops.wpo_weights(jnp.array([-2.0]), jnp.array([-3.0]), jnp.array([2]), jnp.array([1]))
    np.testing.assert_allclose(w, [np.exp(-1.0 - 3.0)], rtol=1e-6)  # exp(-2/2) * exp(-3/1)
    logits = jnp.array([[[0.0, np.log(3.0)]]])  # p = (1/4, 3/4): sum p^2 = 10/16
    np.testing.assert_allclose(ops.log_sum_sq_probs(logits), [[np.log(10 / 16)]], rtol=1e-6)
    chex.assert_shape(ops.log_sum_sq_probs(jnp.zeros((2, 3, 5), jnp.bfloat16)), (2, 3))
    # weights are constants for the gradient
    g = jax.grad(lambda a: ops.wpo_weights(a, a, jnp.ones(1), jnp.ones(1)).sum())(jnp.array([-1.0]))
    np.testing.assert_array_equal(g, [0.0])


def _pairs():
    return jnp.array([-1.0]), jnp.array([-2.0]), jnp.array([-1.0]), jnp.array([-1.0])


def test_combined_losses_golden():
    # u_c = 0, u_r = -1, beta = 1: sigmoid = log(1 + e^-1); sft = 2
    got, _, _ = ops.dpo_loss(*_pairs(), beta=1.0, loss_type=("sigmoid", "sft"), loss_weights=(1.0, 0.5),
                             sft_nll=jnp.asarray(2.0))
    np.testing.assert_allclose(got, [np.log1p(np.exp(-1.0)) + 1.0], rtol=1e-6)
    hinge = 0.0  # relu(1 - 1)
    got, _, _ = ops.dpo_loss(*_pairs(), beta=1.0, loss_type=("sigmoid", "hinge"), weights_B=jnp.array([0.25]))
    np.testing.assert_allclose(got, [0.25 * (np.log1p(np.exp(-1.0)) + hinge)], rtol=1e-6)


def test_single_loss_path_unchanged_and_jit():
    pc, pr, rc, rr = (jnp.asarray(np.random.default_rng(i).normal(size=4), jnp.float32) for i in range(4))
    one, _, _ = ops.dpo_loss(pc, pr, rc, rr, beta=0.1)
    tup, _, _ = ops.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=("sigmoid",), loss_weights=(1.0,))
    np.testing.assert_allclose(tup, one, rtol=1e-7)
    def combined(pc, pr, rc, rr, sft, w):
        return ops.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=("sigmoid", "bco_pair", "sft"),
                            loss_weights=(0.8, 0.2, 1.0), sft_nll=sft, weights_B=w)[0]

    args = (pc, pr, rc, rr, jnp.asarray(1.5), jnp.full(4, 0.5))
    np.testing.assert_allclose(jax.jit(combined)(*args), combined(*args), rtol=1e-6)


def test_combined_losses_errors():
    with pytest.raises(ValueError, match="needs sft_nll"):
        ops.dpo_loss(*_pairs(), beta=1.0, loss_type=("sigmoid", "sft"))
    with pytest.raises(ValueError, match="loss_weights has 1 entries"):
        ops.dpo_loss(*_pairs(), beta=1.0, loss_type=("sigmoid", "hinge"), loss_weights=(1.0,))
    with pytest.raises(ValueError, match="unknown loss_type"):
        ops.dpo_loss(*_pairs(), beta=1.0, loss_type=("sigmoid", "nope"))
