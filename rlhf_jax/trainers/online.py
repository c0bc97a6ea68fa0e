"""The shared core of online RL (PPO, GRPO, RLOO, REINFORCE++, ReMax): experience, scoring, the update.

One iteration is ``prompts → generate → score → evaluate → advantages → update``:

1. ``rollout.generate`` samples responses (its own jitted loop).
2. :func:`evaluate_rollout` (jitted) runs the actor, the frozen reference, the critic and the reward
   model teacher-forced over ``prompt + response`` and returns per-token log-probs, values and the RM
   score. Host reward functions run on decoded text meanwhile (JAX dispatch is asynchronous).
3. :func:`make_experience` (jitted) combines scores (RM, functions, clip, no-EOS penalty) and calls the
   algorithm's pure ``advantages`` function → a typed :class:`Experience`.
4. ``online_update.make_update`` builds ONE jitted function that runs ``epochs × minibatches ×
   micro-batches`` with ``lax.scan``, differentiates the algorithm's pure ``loss`` and applies separate
   optimizers to the actor and (if any) the critic.

An algorithm is an :class:`Algorithm`: two small pure functions over arrays (no model, no config
object) plus a flag saying whether it needs a critic. PPO lives in ``rlhf_jax.trainers.ppo``; GRPO and
friends plug in by writing their own ``advantages``/``loss``.

Gradient accumulation is exact: the loss denominators (token or sequence counts) of the whole minibatch
are computed first from its masks, every micro-batch contributes ``Σ_k c_k · sum_k / D_k``, and the
gradients simply add (README, "Losses are elementwise; ... divided once per optimizer step").
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlhf_jax import models as model_lib
from rlhf_jax import ops
from rlhf_jax.rollout.types import Rollout


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


class RolloutEval(NamedTuple):
    """Teacher-forced evaluation of a rollout by the four models (output of :func:`evaluate_rollout`)."""

    logp_BxT: jax.Array
    ref_logp_BxT: jax.Array
    values_BxT: jax.Array
    rm_score_B: jax.Array


class Forward(NamedTuple):
    """What the loss sees of the current models on a micro-batch."""

    logp_BxT: jax.Array
    entropy_BxT: jax.Array
    values_BxT: Optional[jax.Array]


class Models(NamedTuple):
    """The (hashable) Flax modules; params are always passed separately as ``jit`` arguments.

    ``ref`` is the actor's module (same architecture, other params). ``critic``/``reward`` may be None.
    """

    actor: Any
    critic: Any = None
    reward: Any = None


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
def shared_prompt_logits(model, params, ids_BxS, mask_BxS, *, prompt_length: int, repeats: int) -> jax.Array:
    """Response logits ``[B, T, V]`` of rows whose prompts come in groups of ``repeats`` identical rows.

    Rows u·R … u·R + R − 1 share prompt u (``np.repeat`` order, as GRPO/RLOO groups). Each prompt is
    encoded ONCE: a forward over the U = B/R distinct prompts fills a KV cache (and gives the logits at
    slot P − 1, which predict response token 0), the cache is repeated R times, and the B responses run
    on top of it. The result equals ``model.apply(..., head_span=(P − 1, S − 1))`` up to float rounding,
    and so do the parameter gradients (the R copies' gradients into the shared prompt add up, exactly as
    over R identical computations); the prompt costs U·P instead of B·P tokens of compute.
    """
    B, S = ids_BxS.shape
    P, R = prompt_length, repeats
    if B % R:
        raise ValueError(f"shared_prompt_logits: batch {B} is not a whole number of groups of {R}")
    U = B // R
    mask_BxS = mask_BxS.astype(jnp.int32)
    positions_BxS = model_lib.default_positions(mask_BxS)
    prompt_mask_UxS = jnp.zeros((U, S), jnp.int32).at[:, :P].set(mask_BxS[::R, :P])
    cache = model_lib.init_cache(model.config, U, S)
    first_Ux1xV, cache = model.apply({"params": params}, ids_BxS[::R, :P], prompt_mask_UxS,
                                     positions_BxS=positions_BxS[::R, :P], cache=cache, cache_index=0,
                                     head_span=(P - 1, P))
    cache = jax.tree.map(lambda x: jnp.repeat(x, R, axis=1), cache)  # leaves [L, B, K, S, hd]
    rest_BxT1xV, _ = model.apply({"params": params}, ids_BxS[:, P : S - 1], mask_BxS,
                                 positions_BxS=positions_BxS[:, P : S - 1], cache=cache, cache_index=P)
    return jnp.concatenate([jnp.repeat(first_Ux1xV, R, axis=0), rest_BxT1xV], axis=1)


def policy_forward(model, params, ids_BxS, mask_BxS, response_ids_BxT, *, prompt_length: int,
                   temperature: float, with_entropy: bool, prompt_repeats: int = 1) -> tuple[jax.Array, jax.Array]:
    """Log-probs (and entropy) of the response tokens under ``softmax(logits / τ)``; 0 on padding.

    Same convention as the sampler's ``Rollout.logp_BxT`` (see ``rlhf_jax.rollout.sampling``).
    ``prompt_repeats`` = R > 1: the rows come in groups of R sharing a prompt, which is encoded once per
    group (:func:`shared_prompt_logits`).
    """
    S = ids_BxS.shape[1]
    if not 1 <= prompt_length < S:  # the range check of `rollout.response_logits`, whose slice this is
        raise ValueError(f"policy_forward: prompt_length {prompt_length} must be in [1, S={S})")
    if prompt_repeats > 1:
        logits_BxTxV = shared_prompt_logits(model, params, ids_BxS, mask_BxS, prompt_length=prompt_length,
                                            repeats=prompt_repeats)
    else:  # the head runs on the T positions that predict the response only (see `response_logits`)
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


def reward_model_scores(model, params, ids_BxS, mask_BxS) -> jax.Array:
    """Sequence score: the scalar head at each row's last real token (prompt + response)."""
    return ops.last_token(model.apply({"params": params}, ids_BxS, mask_BxS), mask_BxS).astype(jnp.float32)


def evaluate_rollout(models: Models, actor_params, ref_params, critic_params, reward_params,
                     rollout: Rollout, *, temperature: float, old_logp: str = "recompute",
                     with_values: bool = True, prompt_repeats: int = 1) -> RolloutEval:
    """Teacher-forced pass of all models over a rollout (pure; jit with ``models`` static).

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
    ref_logp, _ = policy_forward(models.actor, ref_params, ids, mask, rollout.response_ids_BxT, **fwd)
    values = (critic_values(models.critic, critic_params, ids, mask, prompt_length=P)
              if models.critic is not None and with_values else jnp.zeros_like(logp))
    rm = (reward_model_scores(models.reward, reward_params, ids, mask)
          if models.reward is not None else jnp.zeros(logp.shape[:1], jnp.float32))
    return RolloutEval(logp, ref_logp, values, rm)


def has_eos(response_ids_BxT: jax.Array, response_mask_BxT: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    """Whether each response contains an EOS among its real tokens."""
    is_eos = jnp.isin(response_ids_BxT, jnp.asarray(eos_ids, response_ids_BxT.dtype))
    return jnp.any(is_eos & (response_mask_BxT > 0), axis=-1)


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
