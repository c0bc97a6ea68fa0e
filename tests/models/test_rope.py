"""rope_tables: the table-and-gather path (positions the model derived from the mask) against the direct one."""

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.fixtures import tiny_config
from rlhf_jax.models.rope import apply_rope, rope_tables
from rlhf_jax.models.transformer import default_positions
from tests.models.tiny import random_params

INV = (10000.0 ** (-np.arange(0, 16, 2) / 16)).astype(np.float32)  # head_dim 16


def test_golden_values():
    cos, sin = rope_tables(jnp.array([[0, 1]]), np.array([1.0, 0.5], np.float32), jnp.float32, bound=2)
    np.testing.assert_allclose(cos[0], [[1, 1, 1, 1], np.cos([1, 0.5, 1, 0.5])], rtol=1e-7)
    np.testing.assert_allclose(sin[0], [[0, 0, 0, 0], np.sin([1, 0.5, 1, 0.5])], rtol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_table_lookup_is_bit_identical_to_the_direct_angles(dtype):
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 1]])
    positions = jnp.concatenate([default_positions(mask),  # left padding: repeated 0s
                                 jax.random.randint(jax.random.key(0), (4, 8), 0, 8)])
    direct, table = rope_tables(positions, INV, dtype), rope_tables(positions, INV, dtype, bound=8)
    for d, t in zip(direct, table):
        assert d.shape == t.shape == (7, 8, 16) and t.dtype == dtype
        np.testing.assert_array_equal(np.asarray(d, np.float32), np.asarray(t, np.float32))
    # and jitted (the bound is static)
    jitted = jax.jit(lambda p: rope_tables(p, INV, dtype, bound=8))(positions)
    np.testing.assert_array_equal(np.asarray(jitted[0], np.float32), np.asarray(direct[0], np.float32))


def _cos_input_shapes(fn, *args):
    """Shapes of every `cos` operand in fn's jaxpr (nested jaxprs included)."""
    shapes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "cos":
                shapes.append(tuple(eqn.invars[0].aval.shape))
            for sub in jax_core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return shapes


def test_model_takes_mask_positions_from_a_table_and_explicit_ones_directly():
    hf = tiny_config("llama", vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, max_positions=64)
    model = models.Transformer(models.ModelConfig.from_hf(hf))
    params = random_params(model)
    ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
    mask = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]])
    derived = lambda p: model.apply({"params": p}, ids, mask)  # noqa: E731
    assert _cos_input_shapes(derived, params) == [(8, 8)]  # one [S, head_dim] table, not [B, S, head_dim]
    explicit = lambda p: model.apply({"params": p}, ids, mask, positions_BxS=default_positions(mask))  # noqa: E731
    assert _cos_input_shapes(explicit, params) == [(2, 8, 8)]
    # the two paths give the same logits
    np.testing.assert_array_equal(np.asarray(derived(params)), np.asarray(explicit(params)))
    # explicit positions beyond S (a chunk of a longer document) still work: the direct path has no bound
    far = model.apply({"params": params}, ids, mask, positions_BxS=default_positions(mask) + 40)
    assert np.isfinite(np.asarray(far)).all()


def test_apply_rope_rotates_pairs_by_the_angle():
    x = jnp.arange(2 * 1 * 1 * 4, dtype=jnp.float32).reshape(2, 1, 1, 4)
    cos, sin = rope_tables(jnp.array([[0], [3]]), np.array([1.0, 0.25], np.float32), jnp.float32, bound=4)
    y = np.asarray(apply_rope(x, cos, sin))
    np.testing.assert_allclose(y[0], np.asarray(x[0]))  # position 0: identity
    a = np.array([3.0, 0.75])
    x1, x2 = np.array([4.0, 5.0]), np.array([6.0, 7.0])
    np.testing.assert_allclose(y[1, 0, 0], np.concatenate([x1 * np.cos(a) - x2 * np.sin(a),
                                                           x2 * np.cos(a) + x1 * np.sin(a)]), rtol=1e-6)
