"""Prompt-length buckets: pad ragged prompts to a few static shapes so the sampler compiles a bounded
number of programs (one per bucket × batch size × sampling settings)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def bucket_length(n: int, *, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """Smallest bucket ≥ n. Raises if n exceeds the largest bucket (truncate prompts first)."""
    if n < 0:
        raise ValueError(f"bucket_length: length must be >= 0, got {n}")
    ordered = sorted(int(b) for b in buckets)
    if not ordered or ordered[0] <= 0:
        raise ValueError(f"bucket_length: buckets must be positive ints, got {tuple(buckets)}")
    for b in ordered:
        if n <= b:
            return b
    raise ValueError(f"bucket_length: length {n} exceeds the largest bucket {ordered[-1]} (buckets={ordered})")


def pad_prompts(
    prompts: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    max_prompt_length: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """LEFT-pad a ragged list of token-id lists to the bucket of the longest one.

    Args:
      prompts: one list of token ids per row; every row must be non-empty.
      pad_token_id: id written into the padding (masked out, so its value never matters).
      buckets: allowed padded lengths.
      max_prompt_length: if given, longer prompts keep their LAST `max_prompt_length` tokens (left
        truncation keeps the text nearest to the response); otherwise a prompt longer than the largest
        bucket raises.

    Returns:
      `(prompt_ids_BxP, prompt_mask_BxP)`, both int32 numpy arrays with P = `bucket_length(longest)`.
    """
    if len(prompts) == 0:
        raise ValueError("pad_prompts: got an empty list of prompts")
    rows = []
    for i, p in enumerate(prompts):
        ids = np.asarray(p, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError(f"pad_prompts: prompt at row {i} is empty (the sampler needs >= 1 token)")
        if max_prompt_length is not None:
            ids = ids[-max_prompt_length:]
        if ids.min() < 0:
            raise ValueError(f"pad_prompts: prompt at row {i} has a negative token id {int(ids.min())}")
        rows.append(ids)
    longest = max(r.size for r in rows)
    P = bucket_length(longest, buckets=buckets)
    ids_BxP = np.full((len(rows), P), pad_token_id, dtype=np.int32)
    mask_BxP = np.zeros((len(rows), P), dtype=np.int32)
    for i, r in enumerate(rows):
        ids_BxP[i, P - r.size :] = r
        mask_BxP[i, P - r.size :] = 1
    return ids_BxP, mask_BxP
