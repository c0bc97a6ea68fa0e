"""Advantage estimators: GAE (PPO with a critic) and the critic-free group baselines (GRPO, RLOO).

Token tensors are ``[B, T]`` over response tokens, right-padded, mask 1 on real tokens. Group tensors
are ``[B]`` with the G = ``group_size`` completions of one prompt in contiguous rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops._util import bool_mask, check_rank, check_same_shape, compute_dtype

GROUP_SCALES = ("group", "batch", "none")


def gae(
    rewards_BxT: jax.Array,
    values_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
    r"""Generalised advantage estimation by a reverse ``lax.scan`` over time.

    .. math::
        \delta_t = r_t + \gamma V_{t+1} - V_t, \qquad A_t = \delta_t + \gamma\lambda A_{t+1},
        \qquad R_t = A_t + V_t

    (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE"; TRL/cleanrl PPO.) The
    value and advantage after the last real token are 0 (the episode ends there). Padding positions
    are skipped — the recursion passes through them unchanged — and get advantage and return 0, so
    padding never changes a real position's result. Returns are computed from the raw (un-whitened)
    advantages; whiten afterwards with :func:`masked_whiten` if wanted.

    Args:
      rewards_BxT: per-token rewards (e.g. :func:`kl_shaped_rewards`).
      values_BxT: critic values V(s_t) at the same positions.
      mask_BxT: 1 on real response tokens.
      gamma: discount γ.
      lam: GAE λ.

    Returns:
      ``(advantages_BxT, returns_BxT)``.
    """
    check_rank("gae", "rewards_BxT", rewards_BxT, 2)
    check_same_shape("gae", rewards_BxT=rewards_BxT, values_BxT=values_BxT, mask_BxT=mask_BxT)
    dtype = compute_dtype(rewards_BxT, values_BxT)
    m_TxB = bool_mask(mask_BxT).T
    r_TxB = jnp.where(m_TxB, rewards_BxT.astype(dtype).T, 0)
    v_TxB = jnp.where(m_TxB, values_BxT.astype(dtype).T, 0)
    gamma = jnp.asarray(gamma, dtype)
    lam = jnp.asarray(lam, dtype)

    def step(carry, inputs):
        next_value_B, next_adv_B = carry
        r_B, v_B, m_B = inputs
        adv_B = r_B + gamma * next_value_B - v_B + gamma * lam * next_adv_B
        new_carry = (jnp.where(m_B, v_B, next_value_B), jnp.where(m_B, adv_B, next_adv_B))
        return new_carry, jnp.where(m_B, adv_B, 0)

    zeros_B = jnp.zeros(r_TxB.shape[1:], dtype)
    _, adv_TxB = jax.lax.scan(step, (zeros_B, zeros_B), (r_TxB, v_TxB, m_TxB), reverse=True)
    adv_BxT = adv_TxB.T
    returns_BxT = jnp.where(m_TxB.T, adv_BxT + v_TxB.T, 0)
    return adv_BxT, returns_BxT


def discounted_returns(rewards_BxT: jax.Array, mask_BxT: jax.Array, *, gamma: float) -> jax.Array:
    r"""Reward-to-go :math:`G_t = \sum_{k \ge t} \gamma^{k-t} r_k` over real tokens (REINFORCE++).

    Equal to :func:`gae` with zero values and λ = 1; padding is skipped and gets 0.
    """
    adv, _ = gae(rewards_BxT, jnp.zeros_like(rewards_BxT), mask_BxT, gamma=gamma, lam=1.0)
    return adv


def _grouped(name: str, rewards_B: jax.Array, group_size: int) -> jax.Array:
    check_rank(name, "rewards_B", rewards_B, 1)
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"rlhf_jax.ops.{name}: group_size must be a positive int, got {group_size!r}")
    if rewards_B.shape[0] % group_size:
        raise ValueError(
            f"rlhf_jax.ops.{name}: batch {rewards_B.shape[0]} is not a multiple of group_size {group_size}"
        )
    dtype = compute_dtype(rewards_B)
    return rewards_B.astype(dtype).reshape(-1, group_size)


def group_advantages(
    rewards_B: jax.Array, *, group_size: int, scale: str = "group", eps: float = 1e-4
) -> jax.Array:
    r"""GRPO advantages: reward minus its group's mean, optionally divided by a standard deviation.

    .. math:: A_i = \frac{r_i - \mathrm{mean}(r_{g(i)})}{\sigma + \epsilon}

    σ is the unbiased std of the group (``scale="group"``, GRPO, Shao et al. 2024), of the whole batch
    (``"batch"``, TRL ``scale_rewards="batch"``, Liu et al. 2025 "Part I: Tricks or Traps?"), or absent
    (``"none"``: A = r − mean, Dr. GRPO, Liu et al. 2025). Matches TRL ``GRPOTrainer`` (eps = 1e-4).
    The G completions of one prompt must be contiguous rows.

    Args:
      rewards_B: one scalar reward per completion.
      group_size: G; ``B`` must be a multiple of it (G ≥ 2 for a defined group std).
      scale: "group", "batch" or "none".
      eps: added to σ.
    """
    if scale not in GROUP_SCALES:
        raise ValueError(f"rlhf_jax.ops.group_advantages: unknown scale {scale!r}; expected {GROUP_SCALES}")
    r_NxG = _grouped("group_advantages", rewards_B, group_size)
    if scale == "group" and group_size < 2:
        raise ValueError("rlhf_jax.ops.group_advantages: scale='group' needs group_size >= 2")
    adv_NxG = r_NxG - jnp.mean(r_NxG, axis=1, keepdims=True)
    if scale == "group":
        adv_NxG = adv_NxG / (jnp.std(r_NxG, axis=1, ddof=1, keepdims=True) + eps)
    elif scale == "batch":
        adv_NxG = adv_NxG / (jnp.std(r_NxG, ddof=1) + eps)
    return adv_NxG.reshape(-1)


def rloo_advantages(
    rewards_B: jax.Array, *, group_size: int, normalize: bool = False, eps: float = 1e-4
) -> jax.Array:
    r"""REINFORCE leave-one-out advantages: each reward minus the mean of the other G − 1 in its group.

    .. math:: A_i = r_i - \frac{1}{G-1}\sum_{j \ne i} r_j = \frac{G}{G-1}(r_i - \bar r)

    (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics"; TRL ``RLOOTrainer``.) With
    ``normalize``, the advantages are then standardised over the whole batch:
    (A − mean A) / (unbiased std A + eps).
    """
    r_NxG = _grouped("rloo_advantages", rewards_B, group_size)
    if group_size < 2:
        raise ValueError("rlhf_jax.ops.rloo_advantages: group_size must be >= 2")
    baseline_NxG = (jnp.sum(r_NxG, axis=1, keepdims=True) - r_NxG) / (group_size - 1)
    adv_B = (r_NxG - baseline_NxG).reshape(-1)
    if normalize:
        adv_B = (adv_B - jnp.mean(adv_B)) / (jnp.std(adv_B, ddof=1) + eps)
    return adv_B
