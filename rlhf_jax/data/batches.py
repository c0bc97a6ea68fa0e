"""Typed batches that cross `jit` (see README, "Contracts between layers").

All arrays are int32 (ids, masks, positions, segment ids) or float32, with static shapes chosen from a
few length buckets. Masks are 1 on real tokens and 0 on padding. Prompts are LEFT-padded (so generation
appends on the right); training sequences (prompt + completion) are RIGHT-padded.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class SFTBatch(NamedTuple):
    """Next-token training data. `loss_mask_BxS[b, s] = 1` when token s is a target (completion token).

    The model predicts token s from tokens < s, so trainers shift: logits[:, :-1] vs input_ids[:, 1:],
    weighted by loss_mask[:, 1:]. With packing, `segment_ids_BxS` (1, 2, ... per packed example, 0 on
    padding) restricts attention to one example and `positions_BxS` restarts at 0 for each example.
    """

    input_ids_BxS: jax.Array
    attention_mask_BxS: jax.Array
    loss_mask_BxS: jax.Array
    positions_BxS: jax.Array
    segment_ids_BxS: jax.Array


class PreferenceBatch(NamedTuple):
    """Pairs for reward models and the DPO family: chosen and rejected, each prompt + completion.

    `*_loss_mask_BxS` marks completion tokens (the ones whose log-probs a DPO loss sums).
    """

    chosen_ids_BxS: jax.Array
    chosen_mask_BxS: jax.Array
    chosen_loss_mask_BxS: jax.Array
    rejected_ids_BxS: jax.Array
    rejected_mask_BxS: jax.Array
    rejected_loss_mask_BxS: jax.Array


class SoftPreferenceBatch(NamedTuple):
    """Pairs with soft labels: `chosen_prob_B` = P(chosen ≻ rejected) (e.g. an AI judge's probability, as
    `rlhf-jax label` with `ranker: pairwise_judge` writes it); 1 on padding rows (which have no tokens)."""

    pair: PreferenceBatch
    chosen_prob_B: jax.Array


class UnpairedBatch(NamedTuple):
    """KTO data: prompt + completion with a desirable (1) / undesirable (0) label per row."""

    input_ids_BxS: jax.Array
    attention_mask_BxS: jax.Array
    loss_mask_BxS: jax.Array
    label_B: jax.Array


class PromptBatch(NamedTuple):
    """Prompts for online RL, LEFT-padded. `index_B` indexes the dataset rows (to fetch extra columns
    such as a verifiable answer for reward functions on the host)."""

    prompt_ids_BxP: jax.Array
    prompt_mask_BxP: jax.Array
    index_B: jax.Array
