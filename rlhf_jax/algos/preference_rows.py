"""Scoring preference rows: the pair / KTO batch types, the 2B stacked rows, and their completion log-probs.

A pair (prompt, chosen y_c, rejected y_r) is scored by ONE forward pass over the 2B rows chosen ++ rejected
(:func:`completion_logps`: a row's log-prob is the sum of its completion tokens' log-probs); KTO's rows go with
their mismatched KL rows. The LM head runs on each row's completion window only (``completion_width``), and a
pair's prompt can be encoded once for both rows (``prompt_width``, :func:`pair_prompt_layout`). The losses on
these sums are ``rlhf_jax.algos.preference``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlhf_jax import ops
from rlhf_jax.data import PreferenceBatch, UnpairedBatch
from rlhf_jax.models.shared_prompt import shared_prompt_logits


class PairBatch(NamedTuple):
    """Preference pairs plus the reference log-prob sums of their completions (0 for reference-free losses)."""

    pairs: PreferenceBatch
    ref_chosen_logps_B: jax.Array
    ref_rejected_logps_B: jax.Array


class KTOBatch(NamedTuple):
    """Unpaired rows, their mismatched KL rows (same width), and reference log-prob sums of both."""

    rows: UnpairedBatch
    kl_ids_BxS: jax.Array
    kl_mask_BxS: jax.Array
    kl_loss_mask_BxS: jax.Array
    ref_logps_B: jax.Array
    ref_kl_logps_B: jax.Array


# ------------------------------------------------------------------------------------------ log-probs
def pair_prompt_layout(ids_2BxS, mask_2BxS, loss_mask_2BxS, *, prompt_width: int, completion_width: int):
    """The 2B stacked rows (chosen ++ rejected, each ``prompt + completion`` from column 0, right-padded) laid
    out as ``[left-padded prompt | completion]``, ``[2B, P + W]`` (P = ``prompt_width``, W = ``completion_width``):
    what :func:`~rlhf_jax.models.shared_prompt.shared_prompt_logits` reads, with row b and row b + B sharing
    columns ``[0, P)``. A row's prompt is everything before its first scored token (its loss mask); the encoder
    keeps prompts within ``data.max_prompt_len`` (= P) and completions within ``data.max_completion_len`` (= W).
    Positions are unchanged (the model counts them from the first real token), so every token sees the same
    context at the same position as in the original row.

    Returns ``(ids, mask, targets_2BxW, scored_2BxW)``: the new rows, the completion tokens and which of them
    are scored (the original loss mask, 0 past column S − 1).
    """
    S = ids_2BxS.shape[1]
    P, W = prompt_width, completion_width
    scored = loss_mask_2BxS[:, 1:] > 0
    # tokens before the first scored one (a row with none, a padding row: all of it, masked anyway)
    prompt_len = jnp.where(scored.any(axis=1), jnp.argmax(scored, axis=1) + 1, 0)
    src_P = jnp.arange(P)[None, :] - (P - prompt_len)[:, None]  # left padding: prompt token i at column P − len + i
    in_P = src_P >= 0
    src_W = prompt_len[:, None] + jnp.arange(W)[None, :]
    in_W = src_W < S

    def take(x, src, ok):
        return jnp.where(ok, jnp.take_along_axis(x, jnp.clip(src, 0, S - 1), axis=1), 0)

    ids = jnp.concatenate([take(ids_2BxS, src_P, in_P), take(ids_2BxS, src_W, in_W)], axis=1)
    mask = jnp.concatenate([take(mask_2BxS, src_P, in_P), take(mask_2BxS, src_W, in_W)], axis=1)
    return ids, mask, ids[:, P:], take(loss_mask_2BxS, src_W, in_W)


#: ``prompt_width`` for rows laid out as a rollout's, ``[left-padded prompt | response]`` with the response W =
#: ``completion_width`` wide: the prompt width is the rest of the row (:func:`rollout_prompt_width`).
ROLLOUT_ROWS = "rollout"


def rollout_prompt_width(row_width: int, completion_width: Optional[int]) -> Optional[int]:
    """P = S − W for pairs of rollout rows (S = ``row_width``, W = ``completion_width``) when encoding each
    prompt once saves at least a quarter of the tokens: P + 2W ≤ 3/4 · 2(P + W), that is W ≤ P (the offline
    rule of ``recipes.dpo.shared_prompt_width``); else None (stacked rows)."""
    if completion_width is None or completion_width >= row_width:
        return None
    P = row_width - completion_width
    return P if completion_width <= P else None


def completion_token_logps(model, params, ids_2BxS, mask_2BxS, loss_mask_2BxS, *,
                           completion_width: Optional[int] = None, with_lssp: bool = False,
                           prompt_width: Optional[int | str] = None):
    r"""Per-token log-probs ``logp_BxT`` of the scored positions, their mask ``m_BxT`` (the loss mask shifted
    by one: logits at t−1 score token t; see `rlhf_jax.data.batching`) and, with ``with_lssp``, WPO's
    :math:`\log\sum_v p_v^2` there (``ops.log_sum_sq_probs``; else None). One forward pass.

    ``completion_width`` = W (static) runs the LM head only on W positions per row, from the one that
    predicts the row's first completion token: the prompt's ``[S, V]`` logits are never computed. Exact
    when every row's scored tokens are contiguous and at most W (the encoder guarantees both with
    ``data.max_completion_len`` ≤ W); None or W ≥ S − 1 scores all positions (T = S − 1).

    ``prompt_width`` = P (static, with ``completion_width``): the rows are pairs, chosen ++ rejected (or KTO's
    rows ++ their KL rows, row b's with prompt b), and each pair's prompt is encoded once (:func:`pair_prompt_layout`, then ``models.shared_prompt_logits``): B·P + 2B·W
    tokens through the trunk instead of 2B·S. The same log-probs and gradients up to float rounding.
    :data:`ROLLOUT_ROWS`: rollout rows (online DPO's pairs), P from the rows' width (:func:`rollout_prompt_width`).
    """
    if prompt_width == ROLLOUT_ROWS:
        prompt_width = rollout_prompt_width(ids_2BxS.shape[1], completion_width)
    if prompt_width is not None and completion_width is not None:
        ids, mask, targets_BxW, m_BxW = pair_prompt_layout(ids_2BxS, mask_2BxS, loss_mask_2BxS,
                                                           prompt_width=prompt_width, completion_width=completion_width)
        logits = shared_prompt_logits(model, params, ids, mask, prompt_length=prompt_width, repeats=2, order="tile")
        lssp = ops.log_sum_sq_probs(logits) if with_lssp else None
        return ops.token_logprobs(logits, targets_BxW), m_BxW, lssp
    S = ids_2BxS.shape[1]
    m_BxT = loss_mask_2BxS[:, 1:]
    targets_BxT = ids_2BxS[:, 1:]
    if completion_width is None or completion_width >= S - 1:
        logits = model.apply({"params": params}, ids_2BxS, mask_2BxS)[:, :-1]
    else:
        first_B = jnp.argmax(m_BxT > 0, axis=1)  # position predicting the first completion token
        pos_BxW = first_B[:, None] + jnp.arange(completion_width)[None, :]
        inside_BxW = pos_BxW <= S - 2
        pos_BxW = jnp.minimum(pos_BxW, S - 2)
        logits = model.apply({"params": params}, ids_2BxS, mask_2BxS, head_positions_BxW=pos_BxW)
        targets_BxT = jnp.take_along_axis(targets_BxT, pos_BxW, axis=1)
        m_BxT = jnp.take_along_axis(m_BxT, pos_BxW, axis=1) * inside_BxW
    lssp = ops.log_sum_sq_probs(logits) if with_lssp else None
    return ops.token_logprobs(logits, targets_BxT), m_BxT, lssp


def completion_logps(model, params, ids_2BxS, mask_2BxS, loss_mask_2BxS, *,
                     completion_width: Optional[int] = None, ld_alpha: Optional[float] = None,
                     prompt_width: Optional[int | str] = None) -> tuple[jax.Array, jax.Array]:
    r"""Per-row completion log-prob sums and token counts from one forward pass.

    .. math:: \log\pi(y\mid x) = \sum_t m_t \log\pi(x_t \mid x_{<t}), \quad n = \sum_t m_t

    (``ld_alpha``: LD-DPO's sums, ``ops.ld_logps``, rows chosen ++ rejected). ``completion_width`` and
    ``prompt_width``: see :func:`completion_token_logps`.

    Returns:
      ``(logp_sum_2B, count_2B)`` in float32.
    """
    logp_BxT, m_BxT, _ = completion_token_logps(model, params, ids_2BxS, mask_2BxS, loss_mask_2BxS,
                                                completion_width=completion_width, prompt_width=prompt_width)
    n = jnp.sum(m_BxT, axis=1).astype(jnp.float32)
    if ld_alpha is not None:
        return ops.ld_logps(logp_BxT, m_BxT, ld_alpha=ld_alpha), n
    return ops.sequence_logprobs(logp_BxT, m_BxT), n


class CompletionTerms(NamedTuple):
    """What the DPO options read besides the sums (:func:`completion_terms`)."""

    logp_2B: jax.Array  # the sums the loss compares (LD-DPO's when ld_alpha is set)
    n_2B: jax.Array  # completion token counts
    raw_logp_2B: jax.Array  # plain sums (TRL's sft term ignores ld_alpha)
    aligned_2B: Optional[jax.Array]  # WPO: sum_t (log p_t - log sum_v p_v^2), stop-gradient; None without it


def completion_terms(model, params, ids_2BxS, mask_2BxS, loss_mask_2BxS, *, completion_width: Optional[int] = None,
                     ld_alpha: Optional[float] = None, use_weighting: bool = False,
                     prompt_width: Optional[int | str] = None) -> CompletionTerms:
    """:class:`CompletionTerms` of the rows chosen ++ rejected from one forward pass."""
    logp_BxT, m_BxT, lssp = completion_token_logps(model, params, ids_2BxS, mask_2BxS, loss_mask_2BxS,
                                                   completion_width=completion_width, with_lssp=use_weighting,
                                                   prompt_width=prompt_width)
    raw = ops.sequence_logprobs(logp_BxT, m_BxT)
    logp = raw if ld_alpha is None else ops.ld_logps(logp_BxT, m_BxT, ld_alpha=ld_alpha)
    aligned = None if lssp is None else ops.sequence_logprobs(jax.lax.stop_gradient(logp_BxT - lssp), m_BxT)
    return CompletionTerms(logp, jnp.sum(m_BxT, axis=1).astype(jnp.float32), raw, aligned)


def stacked_rows(batch: PairBatch | KTOBatch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(ids, mask, loss_mask) of the 2B rows scored together: chosen then rejected, or rows then KL rows."""
    if isinstance(batch, PairBatch):
        p = batch.pairs
        parts = ((p.chosen_ids_BxS, p.rejected_ids_BxS), (p.chosen_mask_BxS, p.rejected_mask_BxS),
                 (p.chosen_loss_mask_BxS, p.rejected_loss_mask_BxS))
    else:
        r = batch.rows
        parts = ((r.input_ids_BxS, batch.kl_ids_BxS), (r.attention_mask_BxS, batch.kl_mask_BxS),
                 (r.loss_mask_BxS, batch.kl_loss_mask_BxS))
    return tuple(jnp.concatenate(pair, axis=0) for pair in parts)  # type: ignore[return-value]
