"""PPO as an online-RL :class:`~rlhf_jax.algos.base.Algorithm`: KL-shaped rewards → GAE → clipped losses.

Two pure functions over arrays, assembled by :func:`ppo_algorithm` from a few hyperparameters:

* advantages (Ziegler et al. 2019; Stiennon et al. 2020; TRL ``PPOTrainer``)::

      r_t = −β·kl_t + 1[t = last]·s            (KL in the reward, "classic"; or r_t = 1[t = last]·s)
      A, R = GAE(r, V_old; γ, λ)              (returns from the raw advantages)
      A ← masked_whiten(A)                     (optional)

* loss on a micro-batch, already divided by the minibatch's denominators::

      L = Σ ℓ^clip / D_pol − c_H·Σ H / D_pol + β·Σ kl^loss / D_pol + c_V·Σ ℓ^V / D_tok

  with ``ℓ^clip`` = ``ops.ppo_policy_loss`` (ε_low, ε_high, dual clip), ``ℓ^V`` = ``ops.value_loss``,
  ``kl^loss`` = ``ops.kl_in_loss`` (GRPO-style placement, optionally importance-weighted), D_pol the
  policy aggregation count (``ops.aggregate`` mode) and D_tok the number of real response tokens.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from rlhf_jax import ops
from rlhf_jax.algos.base import Algorithm, Experience, Forward, PolicyLossHparams


def ppo_advantages(exp: Experience, kl_coef: jax.Array, *, gamma: float, lam: float, kl_kind: str,
                   kl_in_reward: bool, whiten: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """KL-shaped per-token rewards, GAE, optional whitening; returns ``(adv_BxT, returns_BxT, rewards_BxT)``."""
    mask = exp.response_mask_BxT
    beta = kl_coef if kl_in_reward else jnp.zeros_like(kl_coef)
    rewards = ops.kl_shaped_rewards(exp.score_B, exp.old_logp_BxT, exp.ref_logp_BxT, mask,
                                    kl_coef=beta, kind=kl_kind)
    adv, ret = ops.gae(rewards, exp.old_values_BxT, mask, gamma=gamma, lam=lam)
    if whiten:
        adv = ops.masked_whiten(adv, mask)
    return adv, ret, rewards


def ppo_denominators(mb: Experience, *, loss_agg_mode: str, constant: Optional[float]) -> dict:
    """Counts of the whole minibatch: the policy aggregation count and the number of real tokens."""
    mask = mb.response_mask_BxT
    zeros = jnp.zeros(mask.shape, jnp.float32)
    _, pol = ops.aggregate(zeros, mask, mode=loss_agg_mode, constant=constant)
    return {"policy": jnp.maximum(pol, 1.0), "tokens": jnp.maximum(jnp.sum(mask > 0).astype(jnp.float32), 1.0)}


def ppo_loss(fwd: Forward, mb: Experience, den: dict, kl_coef: jax.Array, *, hp: PolicyLossHparams,
             use_critic: bool) -> tuple[jax.Array, dict]:
    """Clipped PPO objective on one micro-batch (see module docstring); metrics are minibatch means."""
    mask = mb.response_mask_BxT
    agg = functools.partial(ops.aggregate, mode=hp.loss_agg_mode, constant=hp.agg_constant)
    sg = jax.lax.stop_gradient
    pg_sum, _ = agg(ops.ppo_policy_loss(fwd.logp_BxT, mb.old_logp_BxT, mb.advantages_BxT, mask,
                                        clip_eps=hp.clip_eps, clip_eps_high=hp.clip_eps_high,
                                        dual_clip=hp.dual_clip), mask)
    # without a bonus the entropy is a metric only: no backward pass through the [B, T, V] softmax
    ent_sum, _ = agg(fwd.entropy_BxT if hp.entropy_coef else sg(fwd.entropy_BxT), mask)
    loss = (pg_sum - hp.entropy_coef * ent_sum) / den["policy"]
    stats = ops.ppo_policy_stats(fwd.logp_BxT, mb.old_logp_BxT, mb.advantages_BxT, mask,
                                 clip_eps=hp.clip_eps, clip_eps_high=hp.clip_eps_high)
    mets = {"policy_loss": sg(pg_sum / den["policy"]), "entropy": sg(ent_sum / den["policy"]),
            "policy_clipfrac": stats.clipped_sum / den["tokens"], "approx_kl": stats.approx_kl_sum / den["tokens"]}
    if not hp.kl_in_reward:
        kl_BxT = ops.kl_in_loss(fwd.logp_BxT, mb.ref_logp_BxT, kind=hp.kl_kind,
                                old_logp_BxT=mb.old_logp_BxT if hp.kl_importance_weighted else None)
        kl_sum, _ = agg(jnp.where(mask > 0, kl_BxT, 0.0), mask)
        loss = loss + kl_coef * kl_sum / den["policy"]
        mets["kl_loss"] = sg(kl_sum / den["policy"])
    if use_critic:
        vf = ops.value_loss(fwd.values_BxT, mb.old_values_BxT, mb.returns_BxT, mask, clip_eps=hp.value_clip_eps)
        vf_sum = jnp.sum(vf)
        loss = loss + hp.vf_coef * vf_sum / den["tokens"]
        clipped, _ = ops.value_clip_fraction(fwd.values_BxT, mb.old_values_BxT, mb.returns_BxT, mask,
                                             clip_eps=hp.value_clip_eps)
        mets.update(value_loss=sg(vf_sum / den["tokens"]), value_clipfrac=clipped / den["tokens"])
    return loss, mets


def ppo_algorithm(hp: PolicyLossHparams = PolicyLossHparams(), *, gamma: float = 1.0, lam: float = 0.95,
                  whiten_advantages: bool = True, use_critic: bool = True) -> Algorithm:
    """PPO's :class:`Algorithm` (defaults as TRL ``PPOTrainer``: γ 1, λ 0.95, ε 0.2, ε_V 0.2, c_V 0.1)."""
    hp = hp.check()
    return Algorithm(
        advantages=functools.partial(ppo_advantages, gamma=gamma, lam=lam, kl_kind=hp.kl_kind,
                                     kl_in_reward=hp.kl_in_reward, whiten=whiten_advantages),
        loss=functools.partial(ppo_loss, hp=hp, use_critic=use_critic),
        denominators=functools.partial(ppo_denominators, loss_agg_mode=hp.loss_agg_mode, constant=hp.agg_constant),
        use_critic=use_critic,
    )
