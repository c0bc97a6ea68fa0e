"""Exponential moving average of parameters (DeepSpeed-Chat `--enable_ema`, `moving_average` in
`dschat/utils/utils.py`: ``param_ema = lerp(param, param_ema, beta)``; Polyak & Juditsky 1992)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def ema_update(ema: Any, params: Any, *, decay: float) -> Any:
    """``ema ← decay · ema + (1 − decay) · params``, leaf by leaf, computed in float32 and stored in ``ema``'s
    dtype (DeepSpeed-Chat's ``torch.lerp(param, param_ema, beta)`` with ``beta = decay``)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"ema decay must be in [0, 1], got {decay}")

    def one(e, p):
        e32, p32 = e.astype(jnp.float32), p.astype(jnp.float32)
        return (p32 + decay * (e32 - p32)).astype(e.dtype)

    return jax.tree.map(one, ema, params)
