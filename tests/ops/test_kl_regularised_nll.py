"""rlhf_jax.ops.kl_regularised_nll (SuperHF's loss): hand-computed values, masks, jit, gradient."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import ops


def test_golden_values_k3_and_k1():
    logp = jnp.array([[-1.0, -2.0, 0.0]])
    ref = jnp.array([[-1.5, -2.0, 0.0]])
    mask = jnp.array([[1, 1, 0]])
    loss, kl = ops.kl_regularised_nll(logp, ref, mask, kl_coef=0.35, kind="k3")
    k3 = np.exp(-0.5) - 1 + 0.5  # r = ref - logp = -0.5: e^r - 1 - r
    np.testing.assert_allclose(kl, [[k3, 0.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(loss, [[1.0 + 0.35 * k3, 2.0, 0.0]], rtol=1e-6)
    loss1, kl1 = ops.kl_regularised_nll(logp, ref, mask, kl_coef=2.0, kind="k1")
    np.testing.assert_allclose(kl1, [[0.5, 0.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(loss1, [[2.0, 2.0, 0.0]], rtol=1e-6)


def test_padding_never_matters_and_coef_zero_is_nll():
    rng = np.random.default_rng(0)
    logp = jnp.asarray(-rng.uniform(0.1, 3, (3, 5)), jnp.float32)
    ref = jnp.asarray(-rng.uniform(0.1, 3, (3, 5)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    junk = jnp.where(mask > 0, logp, jnp.nan), jnp.where(mask > 0, ref, -jnp.inf)
    a = ops.kl_regularised_nll(logp, ref, mask, kl_coef=0.5)
    b = ops.kl_regularised_nll(*junk, mask, kl_coef=0.5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    chex.assert_shape(a, [(3, 5), (3, 5)])
    zero, _ = ops.kl_regularised_nll(logp, ref, mask, kl_coef=0.0)
    np.testing.assert_array_equal(zero, jnp.where(mask > 0, -logp, 0))
    jitted = jax.jit(lambda *x: ops.kl_regularised_nll(*x, kl_coef=0.5))(logp, ref, mask)
    np.testing.assert_allclose(jitted[0], a[0], rtol=1e-6)


def test_gradient_pulls_towards_the_reference():
    # d/dlogp of k3 = 1 - e^{ref - logp}: zero at the reference, positive above it (pushes logp down)
    g = jax.grad(lambda lp: ops.kl_regularised_nll(lp, jnp.array([[-1.0, -1.0]]), jnp.ones((1, 2)),
                                                   kl_coef=1.0)[0].sum())(jnp.array([[-1.0, -0.5]]))
    np.testing.assert_allclose(g, [[-1.0, -1.0 + (1 - np.exp(-0.5))]], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown kind"):
        ops.kl_regularised_nll(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)), kl_coef=1.0, kind="k9")
