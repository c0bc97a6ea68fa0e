"""Tests for rlhf_jax.ops.kl_control."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import ops


class TestAdaptiveKL:
    def test_golden_sequence(self):
        state = ops.adaptive_kl_init(0.2)
        beta = 0.2
        for kl in (12.0, 3.0, 6.6, 0.0):
            state = ops.adaptive_kl_update(state, current_kl=kl, n_steps=256, target=6.0, horizon=10000)
            beta *= 1 + np.clip(kl / 6.0 - 1, -0.2, 0.2) * 256 / 10000
            np.testing.assert_allclose(state.kl_coef, beta, rtol=1e-6)

    def test_jit_with_traced_arguments(self):
        upd = jax.jit(lambda s, kl, n: ops.adaptive_kl_update(s, current_kl=kl, n_steps=n, target=1.0, horizon=100.0))
        out = upd(ops.adaptive_kl_init(1.0), jnp.float32(1.1), jnp.int32(10))
        np.testing.assert_allclose(out.kl_coef, 1.0 * (1 + 0.1 * 10 / 100), rtol=1e-6)

    def test_state_is_a_pytree_that_round_trips(self):
        state = ops.adaptive_kl_update(ops.adaptive_kl_init(0.05), current_kl=1.0, n_steps=8, target=2.0, horizon=16.0)
        leaves, treedef = jax.tree.flatten(state)
        assert len(leaves) == 1 and leaves[0].shape == ()
        restored = jax.tree.unflatten(treedef, [np.asarray(x) for x in leaves])
        assert isinstance(restored, ops.AdaptiveKLState)
        np.testing.assert_allclose(restored.kl_coef, 0.05 * (1 - 0.2 * 0.5))

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="init_kl_coef"):
            ops.adaptive_kl_init(-1.0)
        with pytest.raises(ValueError, match="horizon"):
            ops.adaptive_kl_update(ops.adaptive_kl_init(0.1), current_kl=1.0, n_steps=1, target=1.0, horizon=0.0)
