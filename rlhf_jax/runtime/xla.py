"""XLA compiler options chosen per program kind (the CPU dot library for differentiated programs)."""

from __future__ import annotations

import os
from typing import Any

import jax


#: Env switch for :func:`gradient_compiler_options` ("0" turns the CPU dot library off).
CPU_YNN_ENV = "RLHF_JAX_CPU_YNN"


def gradient_compiler_options() -> dict[str, Any] | None:
    """XLA compiler options for programs that differentiate a model (train steps, PPO/GRPO updates).

    On XLA:CPU, dots are handed to YNNPACK (``xla_cpu_experimental_ynn_fusion_type=DOT``), which runs the
    transposed products of the backward pass better than the default emitter, while forward-only
    programs run faster with the default, so they keep it (numbers in ``benchmarks/README.md``). None
    elsewhere (GPU/TPU) or when ``RLHF_JAX_CPU_YNN=0``.
    """
    if os.environ.get(CPU_YNN_ENV, "1") == "0" or jax.default_backend() != "cpu":
        return None
    return {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
