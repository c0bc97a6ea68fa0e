"""KL coefficient control for PPO: a pure adaptive controller whose state is a checkpointable pytree.

Fixed KL is simply never calling :func:`adaptive_kl_update`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class AdaptiveKLState(NamedTuple):
    """State of the adaptive KL controller: the current coefficient β (a scalar array)."""

    kl_coef: jax.Array


def adaptive_kl_init(init_kl_coef: float) -> AdaptiveKLState:
    """Initial state with β = ``init_kl_coef`` (float32, or float64 under ``jax_enable_x64``)."""
    if not init_kl_coef >= 0:
        raise ValueError(f"rlhf_jax.ops.adaptive_kl_init: init_kl_coef must be >= 0, got {init_kl_coef}")
    return AdaptiveKLState(kl_coef=jnp.asarray(init_kl_coef, dtype=jnp.result_type(float)))


def adaptive_kl_update(
    state: AdaptiveKLState,
    *,
    current_kl: float | jax.Array,
    n_steps: int | jax.Array,
    target: float,
    horizon: float,
) -> AdaptiveKLState:
    r"""One step of Ziegler et al. (2019)'s proportional controller.

    .. math::
        \beta \leftarrow \beta\,\big(1 + \mathrm{clip}(\mathrm{KL}/\mathrm{target} - 1, -0.2, 0.2)
        \cdot n/\mathrm{horizon}\big)

    (lm-human-preferences ``AdaptiveKLController``; TRL's identical port.) ``n_steps`` is the number of
    samples (episodes) in the batch just used; ``current_kl`` the mean sequence KL measured on it.
    Jittable: all arguments may be traced scalars.
    """
    if not target > 0 or not horizon > 0:
        raise ValueError(f"rlhf_jax.ops.adaptive_kl_update: target and horizon must be > 0, got {target}, {horizon}")
    dtype = state.kl_coef.dtype
    error = jnp.clip(jnp.asarray(current_kl, dtype) / target - 1, -0.2, 0.2)
    mult = 1 + error * jnp.asarray(n_steps, dtype) / horizon
    return AdaptiveKLState(kl_coef=state.kl_coef * mult)
