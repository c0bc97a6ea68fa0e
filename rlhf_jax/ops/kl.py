"""KL estimators between the policy and a reference, and the two places KL enters RLHF.

Notation: ``logp`` is log π_θ(y_t) of the sampled token under the policy, ``ref_logp`` the same token
under the reference, and r = ref_logp − logp the log-ratio (Schulman, "Approximating KL divergence",
2020, http://joschu.net/blog/kl-approx.html). With y ~ π_θ each estimator has expectation (or, for k2,
second-order agreement with) KL(π_θ ‖ π_ref).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops._util import bool_mask, check_rank, check_same_shape, compute_dtype
from rlhf_jax.ops.stats import last_token_mask

KL_KINDS = ("k1", "k2", "k3")
LOG_RATIO_CLAMP = 20.0


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, *, kind: str) -> jax.Array:
    r"""Elementwise KL estimator with r = ref_logp − logp (Schulman 2020).

    .. math:: k_1 = -r, \qquad k_2 = \tfrac12 r^2, \qquad k_3 = e^{r} - 1 - r

    k1 is unbiased but can be negative; k2 and k3 are non-negative; k3 is unbiased and low-variance
    ("low_var_kl" in verl, the GRPO paper's estimator). All agree to second order in r.

    Args:
      logp: policy log-probs, any shape.
      ref_logp: reference log-probs, same shape.
      kind: "k1", "k2" or "k3".
    """
    check_same_shape("kl_estimate", logp=logp, ref_logp=ref_logp)
    dtype = compute_dtype(logp, ref_logp)
    r = ref_logp.astype(dtype) - logp.astype(dtype)
    if kind == "k1":
        return -r
    if kind == "k2":
        return 0.5 * jnp.square(r)
    if kind == "k3":
        return jnp.expm1(r) - r
    raise ValueError(f"rlhf_jax.ops.kl_estimate: unknown kind {kind!r}; expected one of {KL_KINDS}")


def kl_shaped_rewards(
    score_B: jax.Array,
    logp_BxT: jax.Array,
    ref_logp_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    kl_coef: float | jax.Array,
    kind: str = "k1",
) -> jax.Array:
    r"""Per-token rewards of classic RLHF PPO: a KL penalty at every token, the score at the last one.

    .. math:: r_t = -\beta\,\mathrm{kl}_t + \mathbb{1}[t = t_\text{last}]\, s

    (Ziegler et al. 2019; Stiennon et al. 2020; TRL ``PPOTrainer``.) ``t_last`` is the last real
    response token of the row. Padding gets 0. A row with no real token gets no score.

    Args:
      score_B: sequence-level reward (e.g. reward-model score, optionally clipped by the caller).
      logp_BxT: policy log-probs of the response tokens (from the rollout).
      ref_logp_BxT: reference log-probs of the same tokens.
      mask_BxT: 1 on real response tokens.
      kl_coef: β, a float or a traced scalar (adaptive KL).
      kind: KL estimator, see :func:`kl_estimate`.

    Returns:
      ``rewards_BxT``.
    """
    check_rank("kl_shaped_rewards", "logp_BxT", logp_BxT, 2)
    check_same_shape("kl_shaped_rewards", logp_BxT=logp_BxT, ref_logp_BxT=ref_logp_BxT, mask_BxT=mask_BxT)
    if jnp.shape(score_B) != logp_BxT.shape[:1]:
        raise ValueError(
            f"rlhf_jax.ops.kl_shaped_rewards: score_B shape {jnp.shape(score_B)} != batch {logp_BxT.shape[:1]}"
        )
    dtype = compute_dtype(score_B, logp_BxT, ref_logp_BxT)
    m = bool_mask(mask_BxT)
    logp = jnp.where(m, logp_BxT.astype(dtype), 0)
    ref = jnp.where(m, ref_logp_BxT.astype(dtype), 0)
    kl_BxT = kl_estimate(logp, ref, kind=kind)
    rewards = -jnp.asarray(kl_coef, dtype) * kl_BxT
    rewards = rewards + jnp.where(last_token_mask(m), score_B.astype(dtype)[:, None], 0)
    return jnp.where(m, rewards, 0)


def kl_in_loss(
    logp_BxT: jax.Array,
    ref_logp_BxT: jax.Array,
    *,
    kind: str = "k3",
    old_logp_BxT: jax.Array | None = None,
) -> jax.Array:
    r"""Per-token KL term added to the policy loss (GRPO style), optionally importance-weighted.

    Without ``old_logp``: :math:`k_t` = :func:`kl_estimate` (GRPO, Shao et al. 2024, uses k3).

    With ``old_logp`` (samples drawn from π_old, not π_θ):

    .. math:: \rho_t\,k_t, \qquad \rho_t = \exp(\mathrm{clamp}(\log\pi_\theta - \log\pi_\text{old}, \pm 20))

    the importance-weighted estimator that makes the k3-in-loss gradient unbiased for
    KL(π_θ ‖ π_ref) when the batch is off-policy (DeepSeek-V3.2 technical report, 2025, "unbiased KL
    estimate"; also Zhang et al. 2025, "On the Design of KL-Regularized Policy Gradient Algorithms").
    ρ is *not* stop-gradiented: the gradient flows through both ρ and k, as in those references.

    Returns an elementwise ``[B, T]`` term; mask and aggregate it with :func:`aggregate`.
    """
    check_same_shape("kl_in_loss", logp_BxT=logp_BxT, ref_logp_BxT=ref_logp_BxT)
    kl = kl_estimate(logp_BxT, ref_logp_BxT, kind=kind)
    if old_logp_BxT is None:
        return kl
    check_same_shape("kl_in_loss", logp_BxT=logp_BxT, old_logp_BxT=old_logp_BxT)
    dtype = kl.dtype
    log_ratio = jnp.clip(logp_BxT.astype(dtype) - old_logp_BxT.astype(dtype), -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.exp(log_ratio) * kl


def kl_regularised_nll(
    logp_BxT: jax.Array,
    ref_logp_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    kl_coef: float,
    kind: str = "k3",
) -> tuple[jax.Array, jax.Array]:
    r"""SuperHF's fine-tuning loss per token: NLL of the kept sample plus a KL prior to the reference.

    .. math:: \ell_t = -\log\pi_\theta(y_t) + c\,k_t(\pi_\theta, \pi_\text{ref})

    (Mukobi et al. 2023, "SuperHF", Eq. 2: supervised loss on the reward-filtered completions + KL
    coefficient × KL to the prior; c = ``kl_coef``, the paper's default 0.35.) k_t is
    :func:`kl_estimate` of ``kind`` on the sampled tokens (k3 by default: ≥ 0, so SuperHF's clamp of the
    KL at 0 is a no-op; its gradient pulls log π_θ(y_t) back towards log π_ref(y_t)). SuperHF's code
    uses the full-vocabulary KL(π_ref ‖ π_θ) per token instead; this estimator needs only the reference
    log-prob of each kept token. Padding (mask 0) is 0 in both outputs whatever the inputs hold there.

    Returns:
      ``(loss_BxT, kl_BxT)``; aggregate ``loss_BxT`` with :func:`aggregate`.
    """
    check_rank("kl_regularised_nll", "logp_BxT", logp_BxT, 2)
    check_same_shape("kl_regularised_nll", logp_BxT=logp_BxT, ref_logp_BxT=ref_logp_BxT, mask_BxT=mask_BxT)
    dtype = compute_dtype(logp_BxT, ref_logp_BxT)
    m = bool_mask(mask_BxT)
    logp = jnp.where(m, logp_BxT.astype(dtype), 0)
    ref = jnp.where(m, ref_logp_BxT.astype(dtype), 0)
    kl = jnp.where(m, kl_estimate(logp, ref, kind=kind), 0)
    return jnp.where(m, -logp + jnp.asarray(kl_coef, dtype) * kl, 0), kl
