"""What every online-RL algorithm plugs into: the experience it reads, the forward it is scored on, its
loss hyperparameters, and the :class:`Algorithm` record of its pure functions.

An algorithm is two small pure functions over arrays (no model, no config object, no mesh): its
``advantages`` over a batch of :class:`Experience`, and its ``loss`` on a micro-batch given a
:class:`Forward` of the current models, divided by the minibatch's ``denominators`` (computed from masks
first, so gradient accumulation is exact). ``rlhf_jax.algos.ppo`` and ``rlhf_jax.algos.critic_free`` are
the two families; the engine (``rlhf_jax.online``) runs any of them.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp


class Experience(NamedTuple):
    """One batch of on-policy experience; crosses ``jit`` as a pytree (all leaves ``[B, ...]``).

    Attributes:
      prompt_ids_BxP, prompt_mask_BxP: LEFT-padded prompts.
      response_ids_BxT, response_mask_BxT: responses, mask 1 up to and including EOS.
      old_logp_BxT: actor log-probs at rollout time (trainer forward, logits / temperature).
      ref_logp_BxT: frozen reference log-probs of the same tokens.
      old_values_BxT: critic values V(s_t) at rollout time (0 without a critic).
      advantages_BxT: advantages (whitened or not, as the algorithm decides).
      returns_BxT: value targets (0 without a critic).
      score_B: the final sequence score (after clipping / penalties) that was shaped into rewards.
    """

    prompt_ids_BxP: jax.Array
    prompt_mask_BxP: jax.Array
    response_ids_BxT: jax.Array
    response_mask_BxT: jax.Array
    old_logp_BxT: jax.Array
    ref_logp_BxT: jax.Array
    old_values_BxT: jax.Array
    advantages_BxT: jax.Array
    returns_BxT: jax.Array
    score_B: jax.Array

    @property
    def ids_BxS(self) -> jax.Array:
        return jnp.concatenate([self.prompt_ids_BxP, self.response_ids_BxT], axis=1)

    @property
    def mask_BxS(self) -> jax.Array:
        return jnp.concatenate([self.prompt_mask_BxP, self.response_mask_BxT], axis=1)


class Forward(NamedTuple):
    """What the loss sees of the current models on a micro-batch."""

    logp_BxT: jax.Array
    entropy_BxT: jax.Array
    values_BxT: Optional[jax.Array]


class PolicyLossHparams(NamedTuple):
    """Hyperparameters of the clipped policy (+ value) loss shared by PPO and the critic-free family.

    Attributes:
      clip_eps: ε_low of the ratio clip (Schulman et al. 2017).
      clip_eps_high: ε_high (DAPO clip-higher); None = ε_low.
      dual_clip: c of the dual clip for negative advantages (Ye et al. 2020); None = off.
      entropy_coef: c_H, entropy bonus (0 = entropy is a metric only).
      loss_agg_mode: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum" or "constant"
        (``ops.aggregate``).
      agg_constant: the constant of "constant" aggregation (Dr. GRPO: the generation budget).
      kl_kind: k1, k2 or k3 (``ops.kl_estimate``).
      kl_placement: "reward" (KL-shaped per-token rewards) or "loss" (a β·KL term of the loss).
      kl_importance_weighted: the loss's KL weighted by π_θ/π_old (unbiased off-policy).
      value_clip_eps: ε_V of the clipped value loss (PPO only).
      vf_coef: c_V, weight of the value loss (PPO only).
    """

    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None
    dual_clip: Optional[float] = None
    entropy_coef: float = 0.0
    loss_agg_mode: str = "token-mean"
    agg_constant: Optional[float] = None
    kl_kind: str = "k1"
    kl_placement: str = "reward"
    kl_importance_weighted: bool = False
    value_clip_eps: float = 0.2
    vf_coef: float = 0.1

    def check(self) -> "PolicyLossHparams":
        """Raise on an unknown KL placement; returns self."""
        if self.kl_placement not in ("reward", "loss"):
            raise ValueError(f"kl_placement must be 'reward' or 'loss', got {self.kl_placement!r}")
        return self

    @property
    def kl_in_reward(self) -> bool:
        return self.kl_placement == "reward"


# An algorithm's advantages: (exp_without_adv, kl_coef) -> (advantages_BxT, returns_BxT, rewards_BxT)
AdvantageFn = Callable[[Experience, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]
# Its loss: (forward, minibatch, denominators, kl_coef) -> (scalar loss for this micro-batch, metric sums)
LossFn = Callable[[Forward, Experience, Any, jax.Array], tuple[jax.Array, dict]]
# Its denominators: the full minibatch -> pytree of counts (computed from masks only).
DenominatorFn = Callable[[Experience], Any]


class Algorithm(NamedTuple):
    """An online-RL algorithm as pure functions (see module docstring)."""

    advantages: AdvantageFn
    loss: LossFn
    denominators: DenominatorFn
    use_critic: bool


