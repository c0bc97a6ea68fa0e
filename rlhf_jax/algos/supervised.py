"""Supervised losses: next-token SFT (also RAFT's update) and the Bradley–Terry reward model.

SFT (completion-only, token-mean over the optimizer batch)::

    L = Σ_{b,t} m_{b,t}·(−log π(x_{b,t} | x_{b,<t})) / Σ_{b,t} m_{b,t}

with m the loss mask shifted by one. Reward model (Bradley & Terry 1952; Ouyang et al. 2022; constant
margin m as in Llama 2 / TRL ``RewardTrainer``)::

    L = mean over pairs of −log σ(r(x, y_c) − r(x, y_r) − m)

with r the scalar head at the LAST real token of prompt + response; chosen and rejected rows go through
ONE forward pass of 2B rows, and padding pairs (all-zero masks) count 0. With soft labels p = P(y_c ≻ y_r)
(a :class:`SoftPreferenceBatch`, e.g. Constitutional AI's judge probabilities; Bai et al. 2022 §4.1) the
RM loss is the cross-entropy with p as target, which is the loss above where p = 1::

    L = mean over pairs of −p·log σ(Δ) − (1 − p)·log σ(−Δ),    Δ = r(x, y_c) − r(x, y_r) − m

Both return ``((loss_sum, count), aux_sums)`` for ``train.step``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlhf_jax import ops
from rlhf_jax.data import PreferenceBatch, SFTBatch, SoftPreferenceBatch
from rlhf_jax.models import lora
from rlhf_jax.ops.ai_feedback import soft_bradley_terry_loss


class SFTAux(NamedTuple):
    """Extra sums of one SFT batch."""

    sequences: jax.Array  # rows with at least one target token


def sft_loss(model, params, batch: SFTBatch, key: jax.Array, *, mode: str = "token-mean"):
    """`((loss_sum, count), SFTAux)` of the shifted next-token NLL on `batch.loss_mask_BxS` (``key``: LoRA
    dropout masks of this training forward; None for evaluation)."""
    model = lora.training(model, key)
    logits_BxSxV = model.apply({"params": params}, batch.input_ids_BxS, batch.attention_mask_BxS,
                               positions_BxS=batch.positions_BxS, segment_ids_BxS=batch.segment_ids_BxS)
    logp_BxT = ops.token_logprobs(logits_BxSxV[:, :-1], batch.input_ids_BxS[:, 1:])
    mask_BxT = batch.loss_mask_BxS[:, 1:]
    loss_sum, count = ops.aggregate(-logp_BxT, mask_BxT, mode=mode)
    return (loss_sum, count), SFTAux(sequences=jnp.sum(jnp.any(mask_BxT > 0, axis=1)).astype(jnp.float32))


class RMAux(NamedTuple):
    """Sums over the real pairs of a batch."""

    pairs: jax.Array
    correct: jax.Array  # pairs with r_c > r_r
    chosen_sum: jax.Array
    rejected_sum: jax.Array


def pair_scores(model, params, batch: PreferenceBatch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(r_chosen_B, r_rejected_B, valid_B): scores at each side's last real token, one 2B-row forward."""
    ids_2BxS = jnp.concatenate([batch.chosen_ids_BxS, batch.rejected_ids_BxS], axis=0)
    mask_2BxS = jnp.concatenate([batch.chosen_mask_BxS, batch.rejected_mask_BxS], axis=0)
    scores_2BxS = model.apply({"params": params}, ids_2BxS, mask_2BxS)
    last_2B = ops.last_token(scores_2BxS.astype(jnp.float32), mask_2BxS)
    b = batch.chosen_ids_BxS.shape[0]
    valid_B = (jnp.sum(batch.chosen_mask_BxS, axis=1) > 0) & (jnp.sum(batch.rejected_mask_BxS, axis=1) > 0)
    return last_2B[:b], last_2B[b:], valid_B


def rm_loss(model, params, batch: PreferenceBatch | SoftPreferenceBatch, key: jax.Array, *,
            margin: Optional[float] = None):
    """`((loss_sum, pairs), RMAux)` of the Bradley–Terry loss over the real pairs of `batch` (the soft-label
    cross-entropy for a :class:`SoftPreferenceBatch`; ``key``: LoRA dropout, None for evaluation)."""
    model = lora.training(model, key)
    if isinstance(batch, SoftPreferenceBatch):
        chosen_B, rejected_B, valid_B = pair_scores(model, params, batch.pair)
        loss_B = soft_bradley_terry_loss(chosen_B, rejected_B, batch.chosen_prob_B, margin=margin)
    else:
        chosen_B, rejected_B, valid_B = pair_scores(model, params, batch)
        loss_B = ops.bradley_terry_loss(chosen_B, rejected_B, margin=margin)
    v_B = valid_B.astype(jnp.float32)
    zero = jnp.zeros_like(loss_B)
    aux = RMAux(pairs=jnp.sum(v_B), correct=jnp.sum(v_B * (chosen_B > rejected_B)),
                chosen_sum=jnp.sum(jnp.where(valid_B, chosen_B, zero)),
                rejected_sum=jnp.sum(jnp.where(valid_B, rejected_B, zero)))
    return (jnp.sum(jnp.where(valid_B, loss_B, zero)), aux.pairs), aux


def reward_moments(model, params, batch: PreferenceBatch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(n, sum r, sum r^2) over both responses of the real pairs (for the train-set mean/std)."""
    chosen_B, rejected_B, valid_B = pair_scores(model, params, batch)
    r_2B = jnp.concatenate([chosen_B, rejected_B])
    v_2B = jnp.concatenate([valid_B, valid_B])
    r_2B = jnp.where(v_2B, r_2B, 0.0)
    return jnp.sum(v_2B).astype(jnp.float32), jnp.sum(r_2B), jnp.sum(r_2B * r_2B)


def pair_metrics(loss_sum: float, aux: RMAux) -> dict[str, float]:
    """loss / accuracy / mean chosen and rejected reward / margin from summed RMAux."""
    n = max(float(aux.pairs), 1.0)
    chosen, rejected = float(aux.chosen_sum) / n, float(aux.rejected_sum) / n
    return {"loss": float(loss_sum) / n, "accuracy": float(aux.correct) / n, "reward_chosen": chosen,
            "reward_rejected": rejected, "reward_margin": chosen - rejected, "pairs": float(aux.pairs)}


