"""The KV cache the decoder writes and reads while sampling (`Transformer(..., cache=, cache_index=)`)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig


class KVCache(NamedTuple):
    """Keys and values of every layer, `[L, B, K, Smax, hd]` in the compute dtype. Slot j holds token j.

    Heads before slots: a decode step's attention products then read the layer's `[B, K, Smax, hd]` block as
    it lies (batch dims b, k leading). The token-major `[B, Smax, K, hd]` layout made XLA transpose the
    whole cache of every layer, twice per step. `k` and `v` are either those stacked arrays or, after
    :func:`split_cache`, tuples of L per-layer `[B, K, Smax, hd]` arrays; `Transformer` returns the form it got."""

    k: Any
    v: Any

    @property
    def per_layer(self) -> bool:
        """True when the leaves are tuples of L per-layer `[B, K, Smax, hd]` arrays (:func:`split_cache`)."""
        return isinstance(self.k, (tuple, list))

    @property
    def max_len(self) -> int:
        """Smax, the number of slots."""
        return (self.k[0] if self.per_layer else self.k).shape[-2]


def init_cache(config: ModelConfig, batch_size: int, max_len: int, *, dtype=None) -> KVCache:
    """An all-zero cache for `max_len` slots."""
    shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
    dtype = config.dtype if dtype is None else dtype
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def split_cache(cache: KVCache) -> KVCache:
    """The same cache as one `[B, K, Smax, hd]` array per layer (tuples of L leaves), for decoding with unrolled
    layers: each layer's attention then reads and updates its own buffer. From the stacked `[L, ...]` arrays
    XLA:CPU copies every layer's block out of the stack before the attention products read it, every step
    (tiny Llama, batch 16: 1.7 of 5.2 ms per decode step; numbers in ``benchmarks/README.md``). The scanned
    layers (`scan_layers`) need the stacked form; `Transformer` stacks a split cache for them."""
    if cache.per_layer:
        return cache
    return KVCache(k=tuple(cache.k), v=tuple(cache.v))
