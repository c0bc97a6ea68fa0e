"""AI-feedback math of Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI
Feedback", §4.1): the pairwise judge's preference probability, and the soft-label reward-model loss.

* :func:`pairwise_preference_prob`: a judge LM sees a prompt, a principle and two responses as options (A)
  and (B); its log-probs of the two option tokens, normalised over the two options, give the probability
  that the response shown as (A) is preferred. Each pair is shown in BOTH orders (position-bias removal)
  under K principles (the constitution's ensemble), and the probabilities are averaged::

      p_k^→ = σ(ℓ_A − ℓ_B)            response 1 shown as (A), response 2 as (B)
      p_k^← = σ(ℓ'_B − ℓ'_A)          response 2 shown as (A), response 1 as (B)
      P(y_1 ≻ y_2) = Σ_k w_k (p_k^→ + p_k^←) / (2 Σ_k w_k)

  (σ(ℓ_A − ℓ_B) = e^{ℓ_A} / (e^{ℓ_A} + e^{ℓ_B}): "we compute the log probability of the responses (A) and
  (B), ... normalize these ... ensembling over 16 principles", Bai et al. 2022 §4.1; averaging the two
  orders as in Zheng et al. 2023, "Judging LLM-as-a-judge", §3.4 swap-position.) ``w`` is a 0/1 principle
  mask (rows with fewer principles).
* :func:`soft_bradley_terry_loss`: the Bradley–Terry cross-entropy with a soft target ``p`` (the judge's
  probability that the chosen response is preferred)::

      ℓ = −p·log σ(Δ) − (1 − p)·log σ(−Δ),      Δ = r_c − r_r − m

  (Bai et al. 2022 §4.1 train the preference model on these soft labels; at p = 1 it is
  :func:`rlhf_jax.ops.preference.bradley_terry_loss` exactly.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops._util import check_rank, check_same_shape, compute_dtype

log_sigmoid = jax.nn.log_sigmoid


def pairwise_preference_prob(
    logp_a_BxK: jax.Array,
    logp_b_BxK: jax.Array,
    swapped_logp_a_BxK: jax.Array,
    swapped_logp_b_BxK: jax.Array,
    *,
    mask_BxK: jax.Array | None = None,
) -> jax.Array:
    r"""P(response 1 ≻ response 2) of each pair, averaged over principles and both option orders.

    Args:
      logp_a_BxK, logp_b_BxK: the judge's log-probs of the option tokens "A" and "B" when response 1 is
        shown as (A) and response 2 as (B), one column per principle.
      swapped_logp_a_BxK, swapped_logp_b_BxK: the same with the responses swapped (response 2 as (A)).
      mask_BxK: 1 on the principles that count (default all).

    Returns:
      ``prob_B`` in [0, 1] (0.5 for a row with no principle).
    """
    check_rank("pairwise_preference_prob", "logp_a_BxK", logp_a_BxK, 2)
    check_same_shape("pairwise_preference_prob", logp_a_BxK=logp_a_BxK, logp_b_BxK=logp_b_BxK,
                     swapped_logp_a_BxK=swapped_logp_a_BxK, swapped_logp_b_BxK=swapped_logp_b_BxK)
    dtype = compute_dtype(logp_a_BxK, logp_b_BxK, swapped_logp_a_BxK, swapped_logp_b_BxK)
    forward = jax.nn.sigmoid(logp_a_BxK.astype(dtype) - logp_b_BxK.astype(dtype))
    backward = jax.nn.sigmoid(swapped_logp_b_BxK.astype(dtype) - swapped_logp_a_BxK.astype(dtype))
    w = jnp.ones_like(forward) if mask_BxK is None else mask_BxK.astype(dtype)
    check_same_shape("pairwise_preference_prob", logp_a_BxK=logp_a_BxK, mask_BxK=w)
    total = jnp.sum(w * (forward + backward), axis=-1)
    count = 2.0 * jnp.sum(w, axis=-1)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.5)


def soft_bradley_terry_loss(
    chosen_B: jax.Array,
    rejected_B: jax.Array,
    chosen_prob_B: jax.Array,
    *,
    margin: jax.Array | float | None = None,
) -> jax.Array:
    r"""Per-pair cross-entropy :math:`-p\log\sigma(\Delta) - (1-p)\log\sigma(-\Delta)`, Δ = s_c − s_r − m.

    Equals ``bradley_terry_loss(chosen_B, rejected_B, margin=m)`` where ``chosen_prob_B`` is 1.
    """
    check_rank("soft_bradley_terry_loss", "chosen_B", chosen_B, 1)
    check_same_shape("soft_bradley_terry_loss", chosen_B=chosen_B, rejected_B=rejected_B, chosen_prob_B=chosen_prob_B)
    dtype = compute_dtype(chosen_B, rejected_B, chosen_prob_B)
    diff = chosen_B.astype(dtype) - rejected_B.astype(dtype)
    if margin is not None:
        diff = diff - jnp.asarray(margin, dtype)
    p = chosen_prob_B.astype(dtype)
    return -p * log_sigmoid(diff) - (1.0 - p) * log_sigmoid(-diff)
