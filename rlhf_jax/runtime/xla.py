"""XLA compiler options chosen per program kind (the CPU dot library for differentiated programs)."""

from __future__ import annotations

import os
from collections.abc import Mapping
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


#: Env switch for :func:`enable_compilation_cache`: a folder relocates the cache, "0" turns it off.
CACHE_ENV = "RLHF_JAX_COMPILATION_CACHE"


def default_cache_dir(environ: Mapping[str, str]) -> str:
    """``$XDG_CACHE_HOME/rlhf_jax/xla`` (``~/.cache/rlhf_jax/xla``)."""
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rlhf_jax", "xla")


def enable_compilation_cache(environ: Mapping[str, str] = os.environ) -> str | None:
    """Turn on JAX's persistent compilation cache so a rerun of the same config — a resume after a
    preemption above all — loads its compiled programs instead of compiling them again.

    The cache key is the program itself (HLO, compile options, backend, devices, jax/jaxlib versions), so an
    entry is never reused for a different program. Concurrent processes (a multi-host run, or two runs on one
    machine) may share the folder: in a multi-process run only process 0 writes entries, and an entry that
    cannot be read (say, half-written by a run killed meanwhile) gives JAX's warning and the program simply
    compiles again. Programs that compiled in under a
    second are not stored. A cache folder the user set through ``jax.config`` wins. Returns the folder, or
    None when turned off (``RLHF_JAX_COMPILATION_CACHE=0``).
    """
    value = environ.get(CACHE_ENV, "")
    if value == "0":
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    path = value or default_cache_dir(environ)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path
