"""Sampled rows → training batches (host side): the selections of RAFT (top-k of each group), online DPO
(best vs worst of each group) and labelling, and the batches they train on. Rows are THIS host's rows of a
rollout (``sharding.local_rows``); each host selects within its own groups."""

from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np

from rlhf_jax.data import PreferenceBatch, SFTBatch
from rlhf_jax.rollout.types import Rollout


def take_rows(tree: Any, rows: np.ndarray) -> Any:
    """Rows ``rows`` of every ``[B, ...]`` leaf (host or device arrays)."""
    return jax.tree.map(lambda x: np.asarray(x)[rows], tree)


def concat_rows(trees: list) -> Any:
    """Concatenate pytrees of ``[B_i, ...]`` leaves along the batch axis (host numpy)."""
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs], axis=0), *trees)


# --------------------------------------------------------------------------------- rollouts → batches
def _positions_and_segments(mask_BxS: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.maximum(np.cumsum(mask_BxS, axis=1) - 1, 0).astype(np.int32), mask_BxS.astype(np.int32)


def rollout_sft_batch(ro: Rollout) -> SFTBatch:
    """Sampled rows as an :class:`SFTBatch`: loss on the response tokens (EOS included) only."""
    ids = np.concatenate([np.asarray(ro.prompt_ids_BxP), np.asarray(ro.response_ids_BxT)], axis=1).astype(np.int32)
    mask = np.concatenate([np.asarray(ro.prompt_mask_BxP), np.asarray(ro.response_mask_BxT)], axis=1).astype(np.int32)
    loss = np.concatenate([np.zeros_like(np.asarray(ro.prompt_mask_BxP)), np.asarray(ro.response_mask_BxT)],
                          axis=1).astype(np.int32)
    pos, seg = _positions_and_segments(mask)
    return SFTBatch(ids, mask, loss, pos, seg)


def rollout_pair_batch(ro: Rollout, chosen: np.ndarray, rejected: np.ndarray, valid: np.ndarray) -> PreferenceBatch:
    """Pairs (row ``chosen[i]`` ≻ row ``rejected[i]``) as a :class:`PreferenceBatch`; invalid pairs get empty
    loss masks, so the DPO loss counts them as no pair (``pair_loss``: valid = both completions non-empty)."""
    sft = rollout_sft_batch(ro)
    keep = np.asarray(valid, bool)[:, None]
    c, r = take_rows(sft, chosen), take_rows(sft, rejected)
    return PreferenceBatch(c.input_ids_BxS, c.attention_mask_BxS, np.where(keep, c.loss_mask_BxS, 0).astype(np.int32),
                           r.input_ids_BxS, r.attention_mask_BxS, np.where(keep, r.loss_mask_BxS, 0).astype(np.int32))


def best_worst(score_B: np.ndarray, *, group_size: int,
               empty_B: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group of G contiguous rows: (row of the best score, row of the worst, whether they differ).

    A group whose scores are all equal is not a pair. Among rows tied for the best score the chosen is the
    first NON-empty one, among rows tied for the worst the rejected is the first EMPTY one (``empty_B``: the
    response has no text before EOS); without ``empty_B``, or when no tied row is (non-)empty, the first row.
    So an empty response is "chosen" only when it strictly outscores every non-empty response of its group:
    a tie between an empty answer and a wrong one never teaches "stop at once" (online DPO on a 0/1 reward
    with a no-EOS penalty otherwise drifts to empty responses, which tie with wrong answers and beat truncated
    ones).
    """
    s = np.asarray(score_B, np.float64).reshape(-1, group_size)
    base = np.arange(s.shape[0]) * group_size
    top, bottom = s == s.max(axis=1, keepdims=True), s == s.min(axis=1, keepdims=True)
    if empty_B is not None:
        empty = np.asarray(empty_B, bool).reshape(-1, group_size)
        top = np.where((top & ~empty).any(axis=1, keepdims=True), top & ~empty, top)
        bottom = np.where((bottom & empty).any(axis=1, keepdims=True), bottom & empty, bottom)
    best, worst = base + top.argmax(axis=1), base + bottom.argmax(axis=1)
    return best, worst, s.max(axis=1) > s.min(axis=1)


def top_k_rows(score_B: np.ndarray, *, group_size: int, k: int) -> np.ndarray:
    """Row indices of the ``k`` best-scored responses of each group (RAFT / best-of-n), group order kept."""
    if not 1 <= k <= group_size:
        raise ValueError(f"top_k_rows: need 1 <= k <= group_size={group_size}, got {k}")
    s = np.asarray(score_B, np.float64).reshape(-1, group_size)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return (np.arange(s.shape[0])[:, None] * group_size + order).reshape(-1)
