"""Masked reductions and normalisation: sum, mean, variance, whitening, explained variance, last token.

Masks are 1 on real entries and 0 on padding; padding never changes a result (padded entries may hold
anything, even NaN). Reductions over an all-padding selection return 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops._util import bool_mask, check_same_shape, compute_dtype, safe_div


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """Sum of ``x`` over real entries (``mask != 0``), along ``axis`` (all axes when None)."""
    check_same_shape("masked_sum", x=x, mask=mask)
    dtype = compute_dtype(x)
    return jnp.sum(jnp.where(bool_mask(mask), x.astype(dtype), 0), axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    r"""Mean of ``x`` over real entries: :math:`\sum m x / \sum m` (0 where there is none)."""
    check_same_shape("masked_mean", x=x, mask=mask)
    dtype = compute_dtype(x)
    count = jnp.sum(bool_mask(mask), axis=axis).astype(dtype)
    return safe_div(masked_sum(x, mask, axis=axis), count)


def masked_var(x: jax.Array, mask: jax.Array, *, unbiased: bool = True) -> jax.Array:
    r"""Variance of ``x`` over all real entries.

    .. math:: \sigma^2 = \frac{\sum m (x - \mu)^2}{\sum m}\cdot\frac{n}{n - 1}\ \text{(if unbiased)},
              \quad n = \sum m

    As TRL's ``masked_var`` (trl/core.py), with Bessel's correction when ``unbiased``. TRL raises when
    ``n <= 1``; under ``jit`` we cannot, so with ``n <= 1`` the biased value (0) is returned.
    """
    check_same_shape("masked_var", x=x, mask=mask)
    dtype = compute_dtype(x)
    mean = masked_mean(x, mask)
    var = masked_mean(jnp.square(x.astype(dtype) - mean), mask)
    if unbiased:
        n = jnp.sum(bool_mask(mask)).astype(dtype)
        var = jnp.where(n > 1, var * n / jnp.where(n > 1, n - 1, 1), var)
    return var


def masked_whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    r"""Normalise ``x`` by the statistics of its real entries.

    .. math:: \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \;(+\,\mu \text{ if not shift\_mean})

    with the masked mean and unbiased masked variance (TRL ``masked_whiten``; Ziegler et al. 2019 use
    ``shift_mean=False`` for reward whitening). Padding positions are returned as 0.
    """
    check_same_shape("masked_whiten", x=x, mask=mask)
    dtype = compute_dtype(x)
    xf = x.astype(dtype)
    mean = masked_mean(xf, mask)
    var = masked_var(xf, mask, unbiased=True)
    white = (xf - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return jnp.where(bool_mask(mask), white, 0)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
    r"""Fraction of the returns' variance the value estimates explain, over real entries.

    .. math:: 1 - \frac{\mathrm{Var}[R - V]}{\mathrm{Var}[R]}

    As in Stable-Baselines3 / cleanrl (``explained_variance``): 1 is perfect, 0 no better than a
    constant, negative worse. NaN when the returns have zero variance (undefined), as there.
    """
    check_same_shape("explained_variance", values=values, returns=returns, mask=mask)
    dtype = compute_dtype(values, returns)
    r = returns.astype(dtype)
    var_r = masked_var(r, mask, unbiased=False)
    var_res = masked_var(r - values.astype(dtype), mask, unbiased=False)
    return jnp.where(var_r > 0, 1 - var_res / jnp.where(var_r > 0, var_r, 1), jnp.nan)


def last_token(x_BxS: jax.Array, mask_BxS: jax.Array) -> jax.Array:
    """Value of ``x`` at the last real position of each row (left or right padding alike).

    ``x_BxS`` may carry trailing feature axes (``[B, S, ...]``). A row with no real position returns
    its entry at position 0.
    """
    if jnp.ndim(mask_BxS) != 2 or jnp.shape(x_BxS)[:2] != jnp.shape(mask_BxS):
        raise ValueError(
            f"rlhf_jax.ops.last_token: x [B,S,...] and mask [B,S] disagree: {jnp.shape(x_BxS)} vs "
            f"{jnp.shape(mask_BxS)}"
        )
    s = mask_BxS.shape[1]
    pos_BxS = jnp.where(bool_mask(mask_BxS), jnp.arange(s, dtype=jnp.int32)[None, :], -1)
    idx_B = jnp.maximum(jnp.max(pos_BxS, axis=1), 0)
    idx = idx_B.reshape((-1, 1) + (1,) * (jnp.ndim(x_BxS) - 2))
    return jnp.take_along_axis(x_BxS, idx, axis=1)[:, 0]


def last_token_mask(mask_BxS: jax.Array) -> jax.Array:
    """Boolean ``[B, S]`` one-hot of each row's last real position (all False for an empty row)."""
    m = bool_mask(mask_BxS)
    s = m.shape[1]
    pos_BxS = jnp.where(m, jnp.arange(s, dtype=jnp.int32)[None, :], -1)
    last_B = jnp.max(pos_BxS, axis=1)
    return m & (jnp.arange(s, dtype=jnp.int32)[None, :] == last_B[:, None])
