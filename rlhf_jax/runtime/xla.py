"""XLA compiler options chosen per program kind (the CPU dot library for differentiated programs)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp


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


#: XLA:CPU pass that rewrites bf16 ops the backend lacks into f32 ones. It also upcasts bf16 DATA MOVEMENT: the
#: ``dynamic-slice`` that picks one layer's weight out of a scanned (``[L, ...]``) bf16 stack became a slice of an
#: f32 copy of the whole stack, and loop-invariant code motion then made that copy once, before the layer loop: a
#: bf16 base cost its f32 size again in every program's temporaries (l2048, 4 layers, LoRA with bf16 bases: the
#: reward model's forward 0.84 GiB of temporaries for 0.37 GiB of bf16 arguments; a 56-layer run was killed).
BF16_NORMALIZATION_PASS = "float-normalization-bf16"
#: Env switch for :func:`compiler_options`' bf16-storage part ("0" keeps XLA's pass everywhere).
CPU_BF16_STORAGE_ENV = "RLHF_JAX_CPU_BF16_STORAGE"


def compiler_options(*, compute_dtype: Any = "float32", stored_dtypes: Any = (), gradient: bool = False
                     ) -> dict[str, Any] | None:
    """XLA options for one program: :func:`gradient_compiler_options` when it differentiates (``gradient``), and
    on XLA:CPU, when it computes in f32 but stores weights in bf16 (``stored_dtypes``: LoRA's ``base_dtype``,
    ``param_dtype``, ``frozen_dtype``), :data:`BF16_NORMALIZATION_PASS` turned off, so each layer's weight is
    sliced in bf16 and converted inside the loop. Only for f32 compute: the pass is what lets XLA:CPU run bf16
    dots at all (without it they fail to compile), and an f32-compute program has none; f32 storage has no bf16
    op, so the option changes nothing there. None when no option applies."""
    opts = dict(gradient_compiler_options() or {}) if gradient else {}
    stored = {jnp.dtype(d) for d in stored_dtypes if d is not None}
    if (jax.default_backend() == "cpu" and os.environ.get(CPU_BF16_STORAGE_ENV, "1") != "0"
            and jnp.dtype(compute_dtype) == jnp.float32 and jnp.dtype(jnp.bfloat16) in stored):
        opts["xla_disable_hlo_passes"] = BF16_NORMALIZATION_PASS
    return opts or None


def leaf_dtypes(*trees: Any) -> set:
    """The dtypes of the (concrete or abstract) array leaves of ``trees``."""
    return {leaf.dtype for tree in trees for leaf in jax.tree.leaves(tree) if hasattr(leaf, "dtype")}


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
