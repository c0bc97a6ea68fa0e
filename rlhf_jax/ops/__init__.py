"""Pure RLHF math: log-probs, KL, shaping, advantages, losses, aggregation, KL control.

Imports only jax/numpy. Every function is jittable and vmappable; masks are 1 on real tokens and 0 on
padding, and padding never changes a result at real positions. Low-precision inputs are computed in
float32; float64 inputs (``jax_enable_x64``) stay float64.
"""

from rlhf_jax.ops.advantages import discounted_returns, gae, group_advantages, rloo_advantages
from rlhf_jax.ops.dpo import (
    DPO_COMBINABLE_LOSS_TYPES,
    DPO_LOSS_TYPES,
    F_DIVERGENCE_LOSS_TYPES,
    F_DIVERGENCES,
    dpo_loss,
    f_divergence_scores,
)
from rlhf_jax.ops.dpo_options import ld_logps, log_sum_sq_probs, sft_nll, sft_nll_from_sums, wpo_weights
from rlhf_jax.ops.ema import ema_update
from rlhf_jax.ops.ilql import ILQLTerms, ilql_loss, ilql_perturbed_logits, polyak_update
from rlhf_jax.ops.kl import kl_estimate, kl_in_loss, kl_regularised_nll, kl_shaped_rewards
from rlhf_jax.ops.kl_control import AdaptiveKLState, adaptive_kl_init, adaptive_kl_update
from rlhf_jax.ops.logprobs import entropy, sequence_logprobs, token_logprobs
from rlhf_jax.ops.policy_loss import (
    PolicyStats,
    aggregate,
    ppo_policy_loss,
    ppo_policy_stats,
    value_clip_fraction,
    value_loss,
)
from rlhf_jax.ops.preference import (
    KTO_LOSS_TYPES,
    bradley_terry_loss,
    kto_kl_baseline,
    kto_loss,
    orpo_log_odds,
    orpo_loss,
    simpo_loss,
)
from rlhf_jax.ops.stats import (
    explained_variance,
    last_token,
    last_token_mask,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

__all__ = [
    "ema_update",
    "AdaptiveKLState",
    "DPO_COMBINABLE_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "F_DIVERGENCES",
    "F_DIVERGENCE_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "adaptive_kl_init",
    "adaptive_kl_update",
    "bradley_terry_loss",
    "dpo_loss",
    "f_divergence_scores",
    "ld_logps",
    "log_sum_sq_probs",
    "sft_nll",
    "sft_nll_from_sums",
    "wpo_weights",
    "kto_kl_baseline",
    "kto_loss",
    "orpo_log_odds",
    "orpo_loss",
    "simpo_loss",
    "PolicyStats",
    "aggregate",
    "ppo_policy_loss",
    "ppo_policy_stats",
    "value_clip_fraction",
    "value_loss",
    "discounted_returns",
    "entropy",
    "explained_variance",
    "gae",
    "group_advantages",
    "ILQLTerms",
    "ilql_loss",
    "ilql_perturbed_logits",
    "polyak_update",
    "kl_estimate",
    "kl_in_loss",
    "kl_regularised_nll",
    "kl_shaped_rewards",
    "last_token",
    "last_token_mask",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "rloo_advantages",
    "sequence_logprobs",
    "token_logprobs",
]
