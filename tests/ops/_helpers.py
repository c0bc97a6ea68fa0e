"""Shared test helpers for rlhf_jax.ops: ragged masks, trace counting, jit/no-jit comparison."""

from __future__ import annotations

import functools

import jax
import numpy as np
from hypothesis import HealthCheck, settings

#: Fixed examples and no wall-clock checks: no per-example deadline, and no too_slow health check (it fails
#: a test whose input generation took over 30 s, which is the machine's load, not the code under test).
FAST = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def ragged_mask(lengths, t: int, *, left: bool = False) -> np.ndarray:
    """int32 ``[B, t]`` mask with ``lengths[b]`` ones, right-padded (or left-padded)."""
    pos = np.arange(t)[None, :]
    lengths = np.asarray(lengths)[:, None]
    return (pos >= t - lengths) if left else (pos < lengths)


class TraceCounter:
    """Jitted wrapper of ``fn`` that counts how many times JAX traces it."""

    def __init__(self, fn, **static_kwargs):
        self.traces = 0

        @functools.wraps(fn)
        def traced(*args):
            self.traces += 1
            return fn(*args, **static_kwargs)

        self.jitted = jax.jit(traced)

    def __call__(self, *args):
        return self.jitted(*args)


def assert_jit_matches(fn, *args, rtol=1e-6, atol=1e-6, **kwargs):
    """``fn(*args, **kwargs)`` eagerly and under ``jit`` agree; returns the eager result."""
    eager = fn(*args, **kwargs)
    jitted = jax.jit(functools.partial(fn, **kwargs))(*args)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol), eager, jitted)
    return eager
