"""Decode copies of a model with its projection weights stored ``[out…, in…]`` (``weight_layout="out_in"``).

Every checkpoint, optimizer state and export keeps the ``[in…, out…]`` layout. This module makes a second,
inference-only copy for sampling, because XLA:CPU's small-batch products read a weight stored ``[out, in]``
faster. A decode step at batch 16 multiplies ``[16, in]`` by every weight once, so its time is the time to
stream the weights. ``benchmarks/decode_products.py`` (numbers in ``benchmarks/README.md``): 47 chained
``[16, 768] × [768, 2048]`` products streamed 8.3 GB/s with the weight ``[in, out]`` and 11.8 GB/s with it
``[out, in]`` (the ``nn.Linear`` layout PyTorch streams); both run on YNNPACK.

    model_t, params_t = to_out_in(model, params)   # once, after loading
    generate(model_t, params_t, ...)               # same tokens; float32 sums may differ in the last bits
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

#: Env switch for :func:`for_decoding`: "in_out" keeps the loaded layout, "out_in" forces the copy anywhere.
ENV = "RLHF_JAX_DECODE_LAYOUT"

#: Projection weights and their number of input axes (``[in…, out…]`` in the ``in_out`` layout).
PROJECTIONS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1, "fc": 1, "lm_head": 1}


def _permutation(path, ndim: int, scanned: bool) -> tuple[int, ...] | None:
    """Axis order that turns an ``[in…, out…]`` leaf at ``path`` into ``[out…, in…]`` (None: not a projection)."""
    name = getattr(path[-1], "key", None)
    if name not in PROJECTIONS:
        return None
    lead = 1 if scanned and any(getattr(k, "key", None) == "layers" for k in path) else 0  # nn.scan's L axis
    n_in = PROJECTIONS[name]
    axes = list(range(lead, ndim))
    return (*range(lead), *axes[n_in:], *axes[:n_in])


def out_in_model(model):
    """``model`` with ``config.weight_layout = "out_in"`` (the same module otherwise)."""
    return model.clone(config=dataclasses.replace(model.config, weight_layout="out_in"))


def to_out_in(model, params, *, shardings: Any | Callable[[Any], Any] = None):
    """``(out_in_model(model), params')``: the projection weights of ``params`` transposed to ``[out…, in…]``,
    in new buffers (``params`` stays valid; drop it to free its memory).

    Args:
      model: a ``rlhf_jax.models.Transformer`` whose ``config.weight_layout`` is ``"in_out"``.
      params: its params (an ``{"params": …}``-free tree, as ``model.apply({"params": params}, …)`` takes).
      shardings: optional pytree of shardings for the result, or a function of the new model giving it
        (e.g. ``lambda m: sharding.param_shardings(m, mesh)``); default: let XLA place it.
    """
    if model.config.weight_layout != "in_out":
        raise ValueError(f"to_out_in: the model's weights are already {model.config.weight_layout!r}")
    new = out_in_model(model)
    if callable(shardings):
        shardings = shardings(new)
    if shardings is None:
        return new, _transpose_fn(bool(model.config.scan_layers), None)(params)
    leaves, treedef = jax.tree.flatten(shardings)  # hashable: the compile-cache key below
    return new, _transpose_fn(bool(model.config.scan_layers), (treedef, tuple(leaves)))(params)


@functools.lru_cache(maxsize=16)
def _transpose_fn(scanned: bool, frozen: tuple | None):
    """One jitted program per (scan, result shardings as ``(treedef, leaves)``): a sampler that converts every
    iteration compiles it once. ``jnp.copy`` keeps the other leaves in new buffers too, so the result never
    aliases the input."""

    def transpose(tree):
        def leaf(path, x):
            perm = _permutation(path, x.ndim, scanned)
            return jnp.copy(x) if perm is None else jnp.transpose(x, perm)
        return jax.tree_util.tree_map_with_path(leaf, tree)

    shardings = None if frozen is None else jax.tree.unflatten(*frozen)
    return jax.jit(transpose, out_shardings=shardings)


#: :func:`for_decoding` makes the copy on CPU from this many bytes of projection weights on.
MIN_PROJECTION_BYTES = 64 * 2**20


def projection_bytes(params) -> int:
    """Bytes of the projection weights (:data:`PROJECTIONS`) in ``params``."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for path, x in leaves
               if getattr(path[-1], "key", None) in PROJECTIONS)


def pays_off(model, params) -> bool:
    """Whether the ``out_in`` copy is expected to speed up decoding ``model``: on XLA:CPU with at least
    :data:`MIN_PROJECTION_BYTES` of projection weights (``params`` may be abstract: only shapes are read)."""
    return jax.default_backend() == "cpu" and projection_bytes(params) >= MIN_PROJECTION_BYTES


def for_decoding(model, params, *, shardings: Any | Callable[[Any], Any] = None):
    """``(model, params)`` for a process that samples batches and scores them (``eval``, ``generate``; ``chat``
    decodes one row, which reads the weights as fast in either layout, and keeps the loaded one).

    On XLA:CPU, when the projection weights hold at least :data:`MIN_PROJECTION_BYTES`, this is the
    ``out_in`` copy (:func:`to_out_in`); otherwise ``model`` and ``params`` unchanged. Measured with
    ``benchmarks/eval.py --compare-layouts`` (16 prompts × 64 tokens, batch 16, 2026-12-07): the ~86M model
    (330 MB of projections) ran 1.25× faster from the copy; the 7.4M one (29 MB, weights that stay in cache) ran
    0.87× as fast. Single products do not all gain (``benchmarks/decode_products.py``: 0.83× to 1.71× by shape).
    Other backends keep the loaded layout (not measured there). ``RLHF_JAX_DECODE_LAYOUT=in_out`` keeps the
    loaded layout, ``=out_in`` makes the copy on any backend and at any size."""
    choice = os.environ.get(ENV, "")
    if choice not in ("", "in_out", "out_in"):
        raise ValueError(f"{ENV}={choice!r}; expected in_out or out_in")
    if not choice:
        choice = "out_in" if pays_off(model, params) else "in_out"
    if choice == "in_out" or model.config.weight_layout == "out_in":
        return model, params
    return to_out_in(model, params, shardings=shardings)
