"""Private helpers shared by the math modules: compute dtype, binary masks, safe division."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    """The dtype to compute in: the inputs' promoted float type, but never below float32.

    float64 stays float64 (under ``jax_enable_x64``); bfloat16/float16 are upcast to float32.
    """
    dtype = jnp.result_type(*[jnp.asarray(a).dtype for a in arrays])
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    return jnp.promote_types(dtype, jnp.float32)


def as_float(x: jax.Array, dtype) -> jax.Array:
    """``x`` as ``dtype`` (no copy when it already is)."""
    return jnp.asarray(x).astype(dtype)


def bool_mask(mask: jax.Array) -> jax.Array:
    """Mask as booleans: any nonzero entry is a real token."""
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den`` where ``den > 0``, else 0 (gradient-safe: the denominator is never 0)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1), 0)


def check_same_shape(name: str, **arrays: jax.Array) -> None:
    """Raise ``ValueError`` naming the function and arguments when shapes differ."""
    shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"rlhf_jax.ops.{name}: arguments must have the same shape, got {shapes}")


def check_rank(name: str, arg: str, x: jax.Array, rank: int) -> None:
    """Raise ``ValueError`` when ``x`` does not have rank ``rank``."""
    if jnp.ndim(x) != rank:
        raise ValueError(f"rlhf_jax.ops.{name}: `{arg}` must have rank {rank}, got shape {jnp.shape(x)}")
