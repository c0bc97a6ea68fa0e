"""Random params for tests without compiling `init` (a jitted `init` costs ~10 s of CPU per config here)."""

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import Transformer, init_params


def random_params(model: Transformer, seed: int = 1):
    """Params with `init`'s exact tree, shapes and dtypes (from a trace of `init_params`, no compile), drawn
    on the host: weights and biases N(0, 0.1²), norm scales 1 + N(0, 0.1²) — random norms and biases, so
    layout and broadcast bugs show up."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    return jax.tree_util.tree_map_with_path(
        lambda kp, s: jnp.asarray((kp[-1].key == "scale") + 0.1 * rng.normal(size=s.shape), s.dtype), abstract)
