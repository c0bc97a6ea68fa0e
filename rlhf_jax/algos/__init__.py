"""Algorithms as pure plug-ins over arrays (no model loading, no mesh, no logging).

* :mod:`~rlhf_jax.algos.base`: the online-RL contract (``Experience``, ``Forward``, ``Algorithm``,
  ``PolicyLossHparams``).
* :mod:`~rlhf_jax.algos.ppo`: KL-shaped rewards → GAE → clipped policy and value losses.
* :mod:`~rlhf_jax.algos.critic_free`: GRPO / DAPO / Dr. GRPO, RLOO, REINFORCE++, ReMax advantages on PPO's
  clipped loss without a critic.
* :mod:`~rlhf_jax.algos.preference`: the DPO family, SimPO, ORPO, KTO.
* :mod:`~rlhf_jax.algos.supervised`: SFT next-token loss and the Bradley–Terry reward-model loss.

Imports run one way: ``recipes → online → algos → ops``.
"""

from rlhf_jax.algos.base import Algorithm, Experience, Forward, PolicyLossHparams
from rlhf_jax.algos.critic_free import critic_free_algorithm
from rlhf_jax.algos.ppo import ppo_algorithm

__all__ = ["Algorithm", "Experience", "Forward", "PolicyLossHparams", "critic_free_algorithm", "ppo_algorithm"]
