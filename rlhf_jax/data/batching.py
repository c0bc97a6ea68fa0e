"""Padding examples into the typed batches of `batches.py` (numpy int32), length buckets, and packing.

Training sequences are RIGHT-padded, prompts LEFT-padded. Every batch is padded to the smallest bucket
that holds its longest row, so the number of compiled shapes is at most the number of buckets.

Loss masks: 1 on completion tokens (or on every token when `completion_only_loss=False`), and always 0
on an example's first token, which no position predicts (trainers shift: logits[:, :-1] vs ids[:, 1:]);
with packing this also keeps the loss from crossing from one example into the next.
"""

from __future__ import annotations

import numpy as np

from rlhf_jax.data.batches import PreferenceBatch, PromptBatch, SFTBatch, UnpairedBatch


#: Prompt widths for :func:`pad_prompts`: a ragged prompt set compiles at most this many sampler programs.
PROMPT_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def pick_bucket(length: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= length (buckets ascending)."""
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"a row of {length} tokens does not fit the largest bucket {buckets[-1]}")


def example_tokens(prompt: np.ndarray, completion: np.ndarray, *, completion_only_loss: bool) -> tuple[np.ndarray, np.ndarray]:
    """(ids, loss_mask) of prompt + completion; the loss mask is 0 on the first token (see module doc)."""
    ids = np.concatenate([prompt, completion]).astype(np.int32)
    if completion_only_loss:
        loss = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(completion), np.int32)])
    else:
        loss = np.ones(len(ids), np.int32)
    loss[:1] = 0
    return ids, loss


def _right_pad(seqs: list[np.ndarray], batch_size: int, length: int, fill: int) -> np.ndarray:
    out = np.full((batch_size, length), fill, np.int32)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = s
    return out


def sft_batch(examples: list[tuple[np.ndarray, np.ndarray]], *, batch_size: int, buckets: tuple[int, ...], pad_id: int) -> SFTBatch:
    """Right-padded SFT batch of (ids, loss_mask) examples; rows beyond len(examples) are all padding."""
    length = pick_bucket(max((len(ids) for ids, _ in examples), default=1), buckets)
    ids = _right_pad([e[0] for e in examples], batch_size, length, pad_id)
    mask = _right_pad([np.ones(len(e[0]), np.int32) for e in examples], batch_size, length, 0)
    loss = _right_pad([e[1] for e in examples], batch_size, length, 0)
    positions = (np.arange(length, dtype=np.int32)[None, :] * mask).astype(np.int32)
    return SFTBatch(input_ids_BxS=ids, attention_mask_BxS=mask, loss_mask_BxS=loss, positions_BxS=positions, segment_ids_BxS=mask.copy())


def packed_sft_batch(rows: list[list[tuple[np.ndarray, np.ndarray]]], *, batch_size: int, seq_len: int, pad_id: int) -> SFTBatch:
    """Each row holds several examples back to back: segment ids 1..n (0 = padding), positions restart at 0."""
    ids = np.full((batch_size, seq_len), pad_id, np.int32)
    loss, seg, pos = (np.zeros((batch_size, seq_len), np.int32) for _ in range(3))
    for b, row in enumerate(rows):
        start = 0
        for k, (e_ids, e_loss) in enumerate(row, start=1):
            end = start + len(e_ids)
            ids[b, start:end], loss[b, start:end], seg[b, start:end] = e_ids, e_loss, k
            pos[b, start:end] = np.arange(len(e_ids))
            start = end
    mask = (seg > 0).astype(np.int32)
    return SFTBatch(input_ids_BxS=ids, attention_mask_BxS=mask, loss_mask_BxS=loss, positions_BxS=pos, segment_ids_BxS=seg)


def preference_batch(pairs, *, batch_size: int, buckets: tuple[int, ...], pad_id: int) -> PreferenceBatch:
    """`pairs`: list of ((chosen_ids, chosen_loss), (rejected_ids, rejected_loss)); both sides share one bucket."""
    length = pick_bucket(max((max(len(c[0]), len(r[0])) for c, r in pairs), default=1), buckets)
    fields = []
    for side in (0, 1):
        seqs = [p[side] for p in pairs]
        fields += [
            _right_pad([s[0] for s in seqs], batch_size, length, pad_id),
            _right_pad([np.ones(len(s[0]), np.int32) for s in seqs], batch_size, length, 0),
            _right_pad([s[1] for s in seqs], batch_size, length, 0),
        ]
    return PreferenceBatch(*fields)


def unpaired_batch(examples, labels: list[int], *, batch_size: int, buckets: tuple[int, ...], pad_id: int) -> UnpairedBatch:
    """KTO batch: right-padded (ids, loss_mask) examples and 0/1 labels (0 on padding rows)."""
    sft = sft_batch(examples, batch_size=batch_size, buckets=buckets, pad_id=pad_id)
    label = np.zeros(batch_size, np.int32)
    label[: len(labels)] = labels
    return UnpairedBatch(sft.input_ids_BxS, sft.attention_mask_BxS, sft.loss_mask_BxS, label)


def prompt_batch(prompts: list[np.ndarray], index: list[int], *, batch_size: int, buckets: tuple[int, ...], pad_id: int) -> PromptBatch:
    """LEFT-padded prompts; `index_B` = source row per prompt, -1 on padding rows."""
    length = pick_bucket(max((len(p) for p in prompts), default=1), buckets)
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for b, p in enumerate(prompts):
        if len(p):
            ids[b, -len(p):], mask[b, -len(p):] = p, 1
    index_B = np.full(batch_size, -1, np.int32)
    index_B[: len(index)] = index
    return PromptBatch(prompt_ids_BxP=ids, prompt_mask_BxP=mask, index_B=index_B)


def pack_first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Greedy first-fit: each item, in order, goes into the first row with room. O(n log n).

    A segment tree over rows holds each row's free space; the search walks to the leftmost leaf with
    free space >= the item's length. Returns the item indices of each row, rows in creation order.
    """
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    free = np.zeros(2 * size, np.int64)
    free[size : size + n] = capacity  # row r (created lazily) lives at leaf size + r
    for node in range(size - 1, 0, -1):
        free[node] = max(free[2 * node], free[2 * node + 1])
    rows: list[list[int]] = []
    for item, length in enumerate(lengths):
        if length > capacity:
            raise ValueError(f"item {item} has {length} tokens, more than the packing capacity {capacity}")
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= length else 2 * node + 1
        r = node - size
        if r == len(rows):
            rows.append([])
        rows[r].append(item)
        free[node] -= length
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return rows


def pad_prompts(prompts, *, pad_token_id: int, buckets: tuple[int, ...] = PROMPT_BUCKETS,
                max_prompt_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """LEFT-pad a ragged list of token-id lists to the bucket of the longest one, for ``rollout.generate``.

    ``max_prompt_length``: longer prompts keep their LAST tokens (the text nearest the response); otherwise
    a prompt longer than the largest bucket raises. Returns ``(prompt_ids_BxP, prompt_mask_BxP)`` (int32).
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
    batch = prompt_batch(rows, list(range(len(rows))), batch_size=len(rows), buckets=tuple(sorted(buckets)),
                         pad_id=pad_token_id)
    return batch.prompt_ids_BxP, batch.prompt_mask_BxP
