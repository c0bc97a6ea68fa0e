"""The critic-free family as online-RL :class:`~rlhf_jax.algos.base.Algorithm` plug-ins.

Each algorithm is ONE small pure advantage function over an :class:`Experience` (``score_B`` is the
final sequence reward; G completions of a prompt are contiguous rows); the loss is PPO's clipped
surrogate of ``algos.ppo.ppo_loss`` with no critic (clip-higher ε_high, KL in the loss with k1/k2/k3 or
importance-weighted, token-mean / seq-mean / constant aggregation):

============== ================================================================ ==========================
algorithm      advantage of every token of response i                           source
============== ================================================================ ==========================
``grpo``       (r_i − mean_g r) / (std_g r + ε)  (std of group/batch, or none)   Shao et al. 2024; Dr. GRPO
``rloo``       r_i − mean_{j≠i} r_j  (optionally batch-standardised)             Ahmadian et al. 2024
``reinforce_pp`` whiten_batch(Σ_{k≥t} γ^{k−t} r_k), r_k = −β kl_k + 1[k=last] r_i Hu 2025 (REINFORCE++)
``remax``      Σ_{k≥t} r_k − r(x, ȳ_greedy)  (baseline stored as the "value")   Li et al. 2023 (ReMax)
============== ================================================================ ==========================

With ``kl_placement="reward"`` the per-token KL penalty of ``ops.kl_shaped_rewards`` enters the return
(k1 by default); with ``"loss"`` it is a term of the loss (GRPO's k3). ReMax's greedy baseline b_i is put
by the driver into ``old_values_BxT`` (broadcast over the response): a baseline *is* a value estimate of
the prompt, and the critic-free loss never reads values.

Also here: DAPO's token-length overlong penalty and the zero-variance group filter of its dynamic
sampling (Yu et al. 2025, "DAPO", eq. 13 and §3.2).
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import ops
from rlhf_jax.algos.base import Algorithm, Experience, PolicyLossHparams
from rlhf_jax.algos.ppo import ppo_denominators, ppo_loss

ALGORITHMS = ("grpo", "rloo", "reinforce_pp", "remax")


def _broadcast(adv_B: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """A per-sequence advantage on every real token; 0 on padding."""
    return jnp.where(mask_BxT > 0, adv_B[:, None], 0.0).astype(jnp.float32)


def _score_rewards(exp: Experience, kl_coef: jax.Array, kl_kind: str, kl_in_reward: bool) -> jax.Array:
    """Per-token rewards r_t = −β·kl_t + 1[t = last]·s (β = 0 when the KL lives in the loss)."""
    beta = kl_coef if kl_in_reward else jnp.zeros_like(kl_coef)
    return ops.kl_shaped_rewards(exp.score_B, exp.old_logp_BxT, exp.ref_logp_BxT, exp.response_mask_BxT,
                                 kl_coef=beta, kind=kl_kind)


def grpo_advantages(exp: Experience, kl_coef: jax.Array, *, group_size: int, scale: str, kl_kind: str,
                    kl_in_reward: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""GRPO / Dr. GRPO: :math:`A_{i,t} = (r_i - \bar r_g)/(\sigma + \epsilon)` on every token (``ops.group_advantages``).

    With ``kl_in_reward`` the sequence reward is :math:`r_i - \beta\sum_t kl_{i,t}` (the KL-shaped
    return at t = 0). Returns ``(adv_BxT, zeros, rewards_BxT)``.
    """
    rewards = _score_rewards(exp, kl_coef, kl_kind, kl_in_reward)
    seq_reward_B = jnp.sum(rewards, axis=-1) if kl_in_reward else exp.score_B
    adv_B = ops.group_advantages(seq_reward_B, group_size=group_size, scale=scale)
    return _broadcast(adv_B, exp.response_mask_BxT), jnp.zeros_like(rewards), rewards


def rloo_advantages(exp: Experience, kl_coef: jax.Array, *, group_size: int, normalize: bool, kl_kind: str,
                    kl_in_reward: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""RLOO: :math:`A_i = R_i - \frac{1}{G-1}\sum_{j\ne i} R_j` with :math:`R_i = s_i - \beta\sum_t kl_{i,t}`
    (TRL ``RLOOTrainer``: KL in the sequence reward), on every token."""
    rewards = _score_rewards(exp, kl_coef, kl_kind, kl_in_reward)
    adv_B = ops.rloo_advantages(jnp.sum(rewards, axis=-1), group_size=group_size, normalize=normalize)
    return _broadcast(adv_B, exp.response_mask_BxT), jnp.zeros_like(rewards), rewards


def reinforce_pp_advantages(exp: Experience, kl_coef: jax.Array, *, gamma: float, kl_kind: str,
                            kl_in_reward: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""REINFORCE++: KL-shaped per-token rewards, reward-to-go, whitened over the GLOBAL batch, no critic.

    .. math:: G_t = \sum_{k\ge t}\gamma^{k-t}(-\beta\,kl_k + \mathbb 1[k=\text{last}]\,s),
              \quad A_t = (G_t - \mu_{batch}) / \sigma_{batch}

    (Hu 2025, "REINFORCE++", §3; OpenRLHF ``advantage_estimator=reinforce``.)
    """
    rewards = _score_rewards(exp, kl_coef, kl_kind, kl_in_reward)
    returns = ops.discounted_returns(rewards, exp.response_mask_BxT, gamma=gamma)
    adv = ops.masked_whiten(returns, exp.response_mask_BxT)
    return jnp.where(exp.response_mask_BxT > 0, adv, 0.0), returns, rewards


def remax_advantages(exp: Experience, kl_coef: jax.Array, *, kl_kind: str,
                     kl_in_reward: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""ReMax: :math:`A_t = \sum_{k\ge t} r_k - b`, b = reward of the greedy response to the same prompt.

    (Li et al. 2023, "ReMax", Algorithm 1.) ``b`` is read from ``exp.old_values_BxT`` (the driver writes
    the greedy baseline there, broadcast over each response).
    """
    rewards = _score_rewards(exp, kl_coef, kl_kind, kl_in_reward)
    returns = ops.discounted_returns(rewards, exp.response_mask_BxT, gamma=1.0)
    adv = jnp.where(exp.response_mask_BxT > 0, returns - exp.old_values_BxT, 0.0)
    return adv, returns, rewards


#: The critic-free loss defaults: GRPO's k3 KL in the loss (Shao et al. 2024).
CRITIC_FREE_HPARAMS = PolicyLossHparams(kl_kind="k3", kl_placement="loss", value_clip_eps=0.0, vf_coef=0.0)


def critic_free_algorithm(name: str, hp: PolicyLossHparams = CRITIC_FREE_HPARAMS, *, group_size: int = 1,
                          scale: str = "group", rloo_normalize: bool = False, gamma: float = 1.0) -> Algorithm:
    """The :class:`Algorithm` of ``name`` (one of :data:`ALGORITHMS`) with PPO's critic-free clipped loss
    (the value terms of ``hp`` are ignored: there is no critic)."""
    if name not in ALGORITHMS:
        raise ValueError(f"critic_free_algorithm: unknown algorithm {name!r}; expected one of {ALGORITHMS}")
    hp = hp.check()._replace(value_clip_eps=0.0, vf_coef=0.0)
    kl = dict(kl_kind=hp.kl_kind, kl_in_reward=hp.kl_in_reward)
    adv = {
        "grpo": functools.partial(grpo_advantages, group_size=group_size, scale=scale, **kl),
        "rloo": functools.partial(rloo_advantages, group_size=group_size, normalize=rloo_normalize, **kl),
        "reinforce_pp": functools.partial(reinforce_pp_advantages, gamma=gamma, **kl),
        "remax": functools.partial(remax_advantages, **kl),
    }[name]
    return Algorithm(advantages=adv, loss=functools.partial(ppo_loss, hp=hp, use_critic=False),
                     denominators=functools.partial(ppo_denominators, loss_agg_mode=hp.loss_agg_mode,
                                                    constant=hp.agg_constant),
                     use_critic=False)


# ----------------------------------------------------------------------------------------- DAPO pieces
def overlong_penalty(lengths_B: jax.Array, *, max_length: int, cache_length: int) -> jax.Array:
    r"""DAPO's soft overlong punishment, counted in response TOKENS (Yu et al. 2025, eq. 13).

    .. math::
        R_{len}(y) = \begin{cases} 0 & |y| \le L_{max} - L_{cache} \\
                     \frac{(L_{max} - L_{cache}) - |y|}{L_{cache}} & L_{max} - L_{cache} < |y| \le L_{max} \\
                     -1 & L_{max} < |y| \end{cases}

    ``lengths_B`` counts real response tokens (EOS included); L_max is the generation limit.
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"overlong_penalty: need 0 < cache_length <= max_length, got {cache_length}, {max_length}")
    n = lengths_B.astype(jnp.float32)
    soft = max_length - cache_length
    pen = jnp.where(n <= soft, 0.0, (soft - n) / cache_length)
    return jnp.where(n > max_length, -1.0, pen)


def group_has_variance(score_B: np.ndarray, *, group_size: int, tol: float = 1e-6) -> np.ndarray:
    """``[B / G]`` bool: whether a group's scores are not all equal (DAPO dynamic sampling keeps these).

    A group whose G rewards are equal has zero advantage under GRPO and gives no gradient (DAPO §3.2).
    """
    s = np.asarray(score_B, np.float64)
    if s.ndim != 1 or s.shape[0] % group_size:
        raise ValueError(f"group_has_variance: {s.shape} scores are not groups of {group_size}")
    s = s.reshape(-1, group_size)
    return (s.max(axis=1) - s.min(axis=1)) > tol
