"""Clipped PPO policy loss, clipped value loss, their diagnostics, and ``(sum, count)`` aggregation.

Losses here are elementwise ``[B, T]`` (0 on padding); reduce them with :func:`aggregate`, which
returns ``(sum, count)`` so that gradient accumulation and data parallelism divide exactly once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.ops._util import bool_mask, check_rank, check_same_shape, compute_dtype, safe_div
from rlhf_jax.ops.kl import LOG_RATIO_CLAMP, kl_estimate

AGGREGATE_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant")


def _masked(name: str, mask_BxT: jax.Array, **arrays: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """Check shapes and return (bool mask, arrays upcast and zeroed on padding)."""
    check_same_shape(name, mask_BxT=mask_BxT, **arrays)
    dtype = compute_dtype(*arrays.values())
    m = bool_mask(mask_BxT)
    return m, [jnp.where(m, a.astype(dtype), 0) for a in arrays.values()]


def _ppo_terms(logp, old_logp, adv, clip_eps, clip_eps_high):
    log_ratio = jnp.clip(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
    return unclipped, clipped


def ppo_policy_loss(
    logp_BxT: jax.Array,
    old_logp_BxT: jax.Array,
    advantages_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
) -> jax.Array:
    r"""Per-token clipped surrogate loss of PPO (to minimise).

    .. math::
        \rho = \exp(\mathrm{clamp}(\log\pi_\theta - \log\pi_\text{old}, \pm 20)), \quad
        \ell = \max\big(-A\rho,\; -A\,\mathrm{clip}(\rho, 1-\epsilon_\text{low}, 1+\epsilon_\text{high})\big)

    (Schulman et al. 2017.) ``clip_eps_high`` gives DAPO's asymmetric "clip-higher" (Yu et al. 2025;
    defaults to ``clip_eps``). With ``dual_clip = c > 1`` (Ye et al. 2020, "Mastering Complex Control
    in MOBA Games"; as in verl and OpenRLHF), tokens with A < 0 are further capped:
    :math:`\ell = \min(\ell, -cA)`. Padding gets 0 loss and 0 gradient.

    Args:
      logp_BxT: current policy log-probs (differentiated).
      old_logp_BxT: behaviour-policy log-probs (from the rollout).
      advantages_BxT: advantages (token-level, or a sequence advantage broadcast over T).
      mask_BxT: 1 on real response tokens.
      clip_eps: ε_low.
      clip_eps_high: ε_high; None means ε_low.
      dual_clip: c > 1, or None.
    """
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"rlhf_jax.ops.ppo_policy_loss: dual_clip must be > 1, got {dual_clip}")
    m, (logp, old, adv) = _masked(
        "ppo_policy_loss", mask_BxT, logp_BxT=logp_BxT, old_logp_BxT=old_logp_BxT, advantages_BxT=advantages_BxT
    )
    unclipped, clipped = _ppo_terms(logp, old, adv, clip_eps, clip_eps_high)
    loss = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = jnp.where(adv < 0, jnp.minimum(loss, -adv * dual_clip), loss)
    return jnp.where(m, loss, 0)


class PolicyStats(NamedTuple):
    """Masked sums over real tokens of PPO diagnostics; divide by ``count`` (after any all-reduce).

    Attributes:
      clipped_sum: number of tokens whose clipped term is active (clipped loss > unclipped loss).
      approx_kl_sum: sum of k3 estimates of KL(π_old ‖ π_θ) (samples drawn from π_old).
      count: number of real tokens.
    """

    clipped_sum: jax.Array
    approx_kl_sum: jax.Array
    count: jax.Array

    @property
    def clip_fraction(self) -> jax.Array:
        return safe_div(self.clipped_sum, self.count)

    @property
    def approx_kl(self) -> jax.Array:
        return safe_div(self.approx_kl_sum, self.count)


def ppo_policy_stats(
    logp_BxT: jax.Array,
    old_logp_BxT: jax.Array,
    advantages_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
) -> PolicyStats:
    r"""Clip fraction and approximate KL of a PPO update, as masked ``(sum, count)`` parts.

    clip fraction = mean over real tokens of 1[−A·clip(ρ) > −A·ρ] (TRL/verl ``pg_clipfrac``);
    approx KL = mean of :math:`k_3 = \rho - 1 - \log\rho`, ρ = π_θ/π_old, an unbiased,
    non-negative estimate of KL(π_old ‖ π_θ) (Schulman 2020). Returned as :class:`PolicyStats`
    (sums and count; ``.clip_fraction`` and ``.approx_kl`` give the means). Values are
    stop-gradiented.
    """
    m, (logp, old, adv) = _masked(
        "ppo_policy_stats", mask_BxT, logp_BxT=logp_BxT, old_logp_BxT=old_logp_BxT, advantages_BxT=advantages_BxT
    )
    logp, old, adv = (jax.lax.stop_gradient(a) for a in (logp, old, adv))
    unclipped, clipped = _ppo_terms(logp, old, adv, clip_eps, clip_eps_high)
    log_ratio = jnp.clip(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    k3 = kl_estimate(jnp.zeros_like(log_ratio), log_ratio, kind="k3")
    dtype = logp.dtype
    return PolicyStats(
        clipped_sum=jnp.sum(m & (clipped > unclipped)).astype(dtype),
        approx_kl_sum=jnp.sum(jnp.where(m, k3, 0)),
        count=jnp.sum(m).astype(dtype),
    )


def _value_terms(values, old_values, returns, clip_eps):
    v_clipped = jnp.clip(values, old_values - clip_eps, old_values + clip_eps)
    return jnp.square(values - returns), jnp.square(v_clipped - returns)


def value_loss(
    values_BxT: jax.Array,
    old_values_BxT: jax.Array,
    returns_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    clip_eps: float = 0.2,
) -> jax.Array:
    r"""Per-token clipped value loss (to minimise).

    .. math::
        \ell = \tfrac12\max\big((V - R)^2,\;
        (\mathrm{clip}(V, V_\text{old}-\epsilon, V_\text{old}+\epsilon) - R)^2\big)

    (OpenAI baselines PPO2; TRL ``PPOTrainer``, ``cliprange_value``.) Padding gets 0.
    """
    m, (v, old, ret) = _masked(
        "value_loss", mask_BxT, values_BxT=values_BxT, old_values_BxT=old_values_BxT, returns_BxT=returns_BxT
    )
    unclipped, clipped = _value_terms(v, old, ret, clip_eps)
    return jnp.where(m, 0.5 * jnp.maximum(unclipped, clipped), 0)


def value_clip_fraction(
    values_BxT: jax.Array,
    old_values_BxT: jax.Array,
    returns_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    clip_eps: float = 0.2,
) -> tuple[jax.Array, jax.Array]:
    """``(sum, count)``: real tokens where the clipped value loss is the larger (TRL ``vf_clipfrac``)."""
    m, (v, old, ret) = _masked(
        "value_clip_fraction", mask_BxT, values_BxT=values_BxT, old_values_BxT=old_values_BxT, returns_BxT=returns_BxT
    )
    unclipped, clipped = _value_terms(v, old, ret, clip_eps)
    dtype = v.dtype
    return jnp.sum(m & (clipped > unclipped)).astype(dtype), jnp.sum(m).astype(dtype)


def aggregate(
    loss_BxT: jax.Array, mask_BxT: jax.Array, *, mode: str, constant: float | None = None
) -> tuple[jax.Array, jax.Array]:
    r"""Reduce an elementwise loss to ``(sum, count)``; the loss is ``Σ sum / Σ count``.

    Sums and counts add over any split of the rows into micro-batches or devices, so dividing once
    per optimizer step gives exactly the full-batch value in every mode. Rows with no real token
    (batch padding) count 0. With n_b = Σ_t m_bt and R = number of rows with n_b > 0:

    ============================ =============================== ====================
    mode                          sum                             count
    ============================ =============================== ====================
    ``"token-mean"``              Σ_bt m ℓ                        Σ_b n_b  (DAPO, TRL default)
    ``"seq-mean-token-mean"``     Σ_b (Σ_t m ℓ) / n_b             R        (GRPO paper)
    ``"seq-mean-token-sum"``      Σ_bt m ℓ                        R
    ``"constant"``                Σ_bt m ℓ                        R · constant  (Dr. GRPO)
    ============================ =============================== ====================

    For ``"constant"``, ``constant`` is the per-sequence normaliser (e.g. the maximum response
    length L, so the full batch divides by B·L as in Dr. GRPO, Liu et al. 2025).
    """
    if mode not in AGGREGATE_MODES:
        raise ValueError(f"rlhf_jax.ops.aggregate: unknown mode {mode!r}; expected one of {AGGREGATE_MODES}")
    if mode == "constant" and (constant is None or not constant > 0):
        raise ValueError(f"rlhf_jax.ops.aggregate: mode='constant' needs constant > 0, got {constant!r}")
    check_rank("aggregate", "loss_BxT", loss_BxT, 2)
    m, (loss,) = _masked("aggregate", mask_BxT, loss_BxT=loss_BxT)
    dtype = loss.dtype
    n_B = jnp.sum(m, axis=1).astype(dtype)
    rows = jnp.sum(n_B > 0).astype(dtype)
    row_sum_B = jnp.sum(loss, axis=1)
    if mode == "token-mean":
        return jnp.sum(row_sum_B), jnp.sum(n_B)
    if mode == "seq-mean-token-mean":
        return jnp.sum(safe_div(row_sum_B, n_B)), rows
    if mode == "seq-mean-token-sum":
        return jnp.sum(row_sum_B), rows
    return jnp.sum(row_sum_B), rows * jnp.asarray(constant, dtype)
