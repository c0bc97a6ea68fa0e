"""Step 3 of an online iteration: scored responses → :class:`~rlhf_jax.algos.base.Experience`.

* The teacher-forced forwards every online algorithm needs: :func:`policy_forward` (log-probs and
  entropy under ``softmax(logits / τ)``, each group's prompt encoded once with
  :func:`shared_prompt_logits`) and :func:`critic_values`.
* :func:`evaluate_rollout` (jitted by the recipe): the actor (or the sampler's own log-probs), the frozen
  reference and the critic over ``prompt + response``.
* :func:`make_experience` (jitted): the algorithm's pure ``advantages`` on the scores → ``Experience``;
  :func:`rollout_metrics`: the statistics of one batch.

The update that consumes the experience is ``rlhf_jax.online.update``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from rlhf_jax import ops
from rlhf_jax.algos.base import Algorithm, Experience
from rlhf_jax.models import lora
from rlhf_jax.models.shared_prompt import shared_prompt_logits
from rlhf_jax.online.scoring import has_eos
from rlhf_jax.rollout.types import Rollout


class RolloutEval(NamedTuple):
    """Teacher-forced evaluation of a rollout (output of :func:`evaluate_rollout`)."""

    logp_BxT: jax.Array
    ref_logp_BxT: jax.Array
    values_BxT: jax.Array


class Models(NamedTuple):
    """The (hashable) Flax modules; params are always passed separately as ``jit`` arguments.

    The reference shares the actor's module (same architecture, other params); ``critic`` may be None.
    ``critic_shares_base``: the critic's params are its LoRA adapters and value head only; its trunk is the
    actor's frozen base (:func:`critic_params_of`).
    """

    actor: Any
    critic: Any = None
    critic_shares_base: bool = False


def critic_params_of(models: Models, critic_params, actor_params):
    """The critic's full params: its own, or (``critic_shares_base``) its adapters + head on the actor's
    frozen base (no copy; the base gets no gradient from the critic's loss either)."""
    if not models.critic_shares_base:
        return critic_params
    return lora.join(critic_params, lora.split_trainable(actor_params)[1])


class UpdateSettings(NamedTuple):
    """Static shape of one update: B = num_minibatches × minibatch size; micro-batches per minibatch."""

    epochs: int
    num_minibatches: int
    num_micro_batches: int
    temperature: float
    ptx_coef: float = 0.0
    # The critic's rollout values come from the update's own (differentiated) critic forward instead of a
    # separate pass in `evaluate_rollout`; advantages are then computed inside the update. Exact only when
    # the update is ONE optimizer step over the whole batch (1 epoch × 1 minibatch, any micro-batches):
    # the critic has not moved, so V_old = stop_gradient(V_θ). See :func:`fused_values_allowed`.
    fused_values: bool = False
    # Rows come in groups of this many sharing one prompt (GRPO/RLOO/...): the actor encodes each prompt
    # once per group (`shared_prompt_logits`). Needs the groups intact: one minibatch (no shuffling) and
    # micro-batches of whole groups. See :func:`prompt_sharing_allowed`.
    prompt_repeats: int = 1


def prompt_sharing_allowed(*, batch_size: int, group_size: int, num_minibatches: int, num_micro_batches: int,
                           batch_divisor: int = 1) -> bool:
    """Whether the update may encode each group's prompt once: the rows stay in contiguous groups (one
    minibatch, so no shuffle; micro-batches of whole groups) and the U = B/G distinct prompts split evenly
    over ``batch_divisor`` batch shards."""
    if group_size <= 1 or num_minibatches != 1 or batch_size % (num_micro_batches * group_size):
        return False
    return (batch_size // num_micro_batches // group_size) % batch_divisor == 0


def fused_values_allowed(*, epochs: int, num_minibatches: int) -> bool:
    """Whether the critic's rollout values may be taken from the update's forward: one optimizer step over
    the whole batch (1 epoch × 1 minibatch; micro-batches are fine, the critic runs over all of them
    before the actor needs the advantages, see ``online_update``)."""
    return epochs == 1 and num_minibatches == 1


# ---------------------------------------------------------------------------------------- forwards
def policy_forward(model, params, ids_BxS, mask_BxS, response_ids_BxT, *, prompt_length: int,
                   temperature: float, with_entropy: bool, prompt_repeats: int = 1) -> tuple[jax.Array, jax.Array]:
    """Log-probs (and entropy) of the response tokens under ``softmax(logits / τ)``; 0 on padding.

    Same convention as the sampler's ``Rollout.logp_BxT`` (see ``rlhf_jax.rollout.sampling``).
    ``prompt_repeats`` = R > 1: the rows come in groups of R sharing a prompt, which is encoded once per
    group (:func:`shared_prompt_logits`).
    """
    S = ids_BxS.shape[1]
    if not 1 <= prompt_length < S:  # logits at s predict token s + 1: the response is predicted by [P − 1, S − 1)
        raise ValueError(f"policy_forward: prompt_length {prompt_length} must be in [1, S={S})")
    if prompt_repeats > 1:
        logits_BxTxV = shared_prompt_logits(model, params, ids_BxS, mask_BxS, prompt_length=prompt_length,
                                            repeats=prompt_repeats)
    else:  # the head runs on the T positions that predict the response only
        logits_BxTxV = model.apply({"params": params}, ids_BxS, mask_BxS, head_span=(prompt_length - 1, S - 1))
    logits_BxTxV = logits_BxTxV / temperature
    mask_BxT = mask_BxS[:, prompt_length:]
    logp_BxT = jnp.where(mask_BxT > 0, ops.token_logprobs(logits_BxTxV, response_ids_BxT), 0.0)
    ent_BxT = ops.entropy(logits_BxTxV) if with_entropy else jnp.zeros_like(logp_BxT)
    return logp_BxT, jnp.where(mask_BxT > 0, ent_BxT, 0.0)


def critic_values(model, params, ids_BxS, mask_BxS, *, prompt_length: int) -> jax.Array:
    """V(s_t) for each response token t: the scalar head at the position that PREDICTS token t.

    As TRL ``PPOTrainer`` (``full_value[:, context_length - 1 : -1]``); 0 on padding.
    """
    scores_BxS = model.apply({"params": params}, ids_BxS, mask_BxS)
    values_BxT = scores_BxS[:, prompt_length - 1 : -1].astype(jnp.float32)
    return jnp.where(mask_BxS[:, prompt_length:] > 0, values_BxT, 0.0)


def evaluate_rollout(models: Models, actor_params, ref_params, critic_params, rollout: Rollout, *,
                     temperature: float, old_logp: str = "recompute",
                     with_values: bool = True, prompt_repeats: int = 1) -> RolloutEval:
    """Teacher-forced pass of the actor, reference and critic over a rollout (pure; jit with ``models`` static).

    ``old_logp``: "recompute" runs the actor teacher-forced (OpenRLHF, verl); "rollout" takes the
    sampler's own ``Rollout.logp_BxT`` (the same distribution, ``log_softmax(logits / τ)`` of the same
    params, from the KV-cache decode; TRL ``PPOTrainer`` likewise keeps the generation logits) and saves
    one actor forward. The two agree to float rounding (``tests/rollout``: 1e-5 in float32); in bf16
    compute the decode and the full forward round differently, so pick "recompute" there if the first
    ratio must be exactly 1. ``with_values=False`` skips the critic (values 0; the update computes them,
    ``UpdateSettings.fused_values``). ``prompt_repeats`` = G > 1: the rows are groups of G sharing a
    prompt, encoded once per group by the actor and the reference (:func:`shared_prompt_logits`).
    """
    if old_logp not in ("recompute", "rollout"):
        raise ValueError(f"old_logp must be 'recompute' or 'rollout', got {old_logp!r}")
    ids, mask, P = rollout.ids_BxS, rollout.mask_BxS, rollout.prompt_length
    fwd = dict(prompt_length=P, temperature=temperature, with_entropy=False, prompt_repeats=prompt_repeats)
    if old_logp == "rollout":
        logp = jnp.where(rollout.response_mask_BxT > 0, rollout.logp_BxT, 0.0).astype(jnp.float32)
    else:
        logp, _ = policy_forward(models.actor, actor_params, ids, mask, rollout.response_ids_BxT, **fwd)
    # LoRA: the reference is the actor's own base with the adapters off (no second copy; PEFT disable_adapter)
    ref_logp, _ = policy_forward(models.actor, lora.adapters_off(ref_params), ids, mask, rollout.response_ids_BxT,
                                 **fwd)
    values = (critic_values(models.critic, critic_params_of(models, critic_params, actor_params), ids, mask,
                            prompt_length=P)
              if models.critic is not None and with_values else jnp.zeros_like(logp))
    return RolloutEval(logp, ref_logp, values)


def make_experience(algo: Algorithm, rollout: Rollout, ev: RolloutEval, score_B: jax.Array,
                    kl_coef: jax.Array) -> tuple[Experience, jax.Array]:
    """Assemble :class:`Experience` and run the algorithm's advantage estimator (pure; jittable).

    ``score_B`` is the final sequence score (already combined, clipped and penalised by the caller).
    Returns ``(experience, rewards_BxT)``.
    """
    exp = Experience(
        prompt_ids_BxP=rollout.prompt_ids_BxP, prompt_mask_BxP=rollout.prompt_mask_BxP,
        response_ids_BxT=rollout.response_ids_BxT, response_mask_BxT=rollout.response_mask_BxT,
        old_logp_BxT=ev.logp_BxT, ref_logp_BxT=ev.ref_logp_BxT, old_values_BxT=ev.values_BxT,
        advantages_BxT=jnp.zeros_like(ev.logp_BxT), returns_BxT=jnp.zeros_like(ev.logp_BxT),
        score_B=score_B.astype(jnp.float32))
    adv, ret, rewards = algo.advantages(exp, kl_coef)
    return exp._replace(advantages_BxT=adv, returns_BxT=ret), rewards


def value_metrics(exp: Experience) -> dict:
    """Critic statistics of a batch of experience: mean return and value, explained variance (jittable)."""
    m = exp.response_mask_BxT
    return {"returns_mean": ops.masked_mean(exp.returns_BxT, m), "values_mean": ops.masked_mean(exp.old_values_BxT, m),
            "explained_variance": ops.explained_variance(exp.old_values_BxT, exp.returns_BxT, m)}


def rollout_metrics(exp: Experience, rewards_BxT: jax.Array, rm_score_B: jax.Array, *, eos_ids: Sequence[int],
                    with_critic: bool = True) -> dict:
    """Per-iteration statistics of a batch of experience (jittable; device scalars over the global batch).

    ``with_critic=False`` (critic-free algorithms) leaves out returns, values and explained variance: there
    are no value estimates (the variance ratio would be 0/0 = NaN)."""
    m = exp.response_mask_BxT
    lengths = jnp.sum(m, axis=-1).astype(jnp.float32)
    kl_B = jnp.sum(jnp.where(m > 0, exp.old_logp_BxT - exp.ref_logp_BxT, 0.0), axis=-1)  # k1 summed per sequence
    out = {
        "score": jnp.mean(exp.score_B), "score_std": jnp.std(exp.score_B),
        "rm_score": jnp.mean(rm_score_B),
        "kl": jnp.mean(kl_B), "kl_k3_per_token": ops.masked_mean(ops.kl_estimate(exp.old_logp_BxT, exp.ref_logp_BxT,
                                                                                  kind="k3"), m),
        "non_score_reward": jnp.mean(jnp.sum(rewards_BxT, -1) - exp.score_B),
        "response_length": jnp.mean(lengths),
        "eos_rate": jnp.mean(has_eos(exp.response_ids_BxT, m, tuple(eos_ids)).astype(jnp.float32)),
        "rollout_entropy_proxy": -ops.masked_mean(exp.old_logp_BxT, m),
        "advantages_mean": ops.masked_mean(exp.advantages_BxT, m),
    }
    if with_critic:
        out.update(value_metrics(exp))
    return out
