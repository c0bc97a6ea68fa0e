"""ops.ema_update: hand-computed values, DeepSpeed-Chat's lerp form, jit == no jit, dtype kept."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import ops


def test_hand_computed_values():
    ema = {"w": jnp.array([1.0, 2.0]), "b": jnp.array(4.0)}
    params = {"w": jnp.array([3.0, 0.0]), "b": jnp.array(0.0)}
    out = ops.ema_update(ema, params, decay=0.75)  # 0.75 * ema + 0.25 * params
    np.testing.assert_allclose(out["w"], [1.5, 1.5])
    np.testing.assert_allclose(out["b"], 3.0)
    chex.assert_trees_all_equal_shapes(out, ema)


def test_matches_torch_lerp_form_and_jit():
    rng = np.random.default_rng(0)
    ema, p = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    want = p + 0.992 * (ema - p)  # torch.lerp(param, param_ema, beta) in dschat moving_average
    np.testing.assert_allclose(ops.ema_update(jnp.asarray(ema), jnp.asarray(p), decay=0.992), want, rtol=1e-6)
    jitted = jax.jit(lambda e, q: ops.ema_update(e, q, decay=0.992))(jnp.asarray(ema), jnp.asarray(p))
    np.testing.assert_allclose(jitted, want, rtol=1e-6)


def test_dtype_and_bounds():
    out = ops.ema_update(jnp.ones(3, jnp.bfloat16), jnp.zeros(3, jnp.float32), decay=0.5)
    assert out.dtype == jnp.bfloat16 and float(out[0]) == 0.5
    assert bool(jnp.all(ops.ema_update(jnp.ones(2), jnp.zeros(2), decay=1.0) == 1.0))
    with pytest.raises(ValueError, match="decay"):
        ops.ema_update(jnp.ones(2), jnp.zeros(2), decay=1.5)
