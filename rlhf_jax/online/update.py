"""Step 4 of an online iteration, the update: ``epochs × minibatches × micro-batches`` of the algorithm's loss, one jitted function.

:func:`make_update` differentiates an :class:`~rlhf_jax.algos.base.Algorithm`'s pure ``loss`` over
micro-batches (``lax.scan``, gradients accumulated by sum with the minibatch's denominators computed
first, so accumulation is exact) and applies separate optimizers to the actor and (if any) the critic.

Fused critic values (``UpdateSettings.fused_values``; PPO with one optimizer step over the whole batch):
the critic has not moved when the update starts, so V_old = V_θ and the rollout values can come from the
update's own critic forward instead of a separate pass. The step then runs in two phases:

1. **critic**, per micro-batch: ``V = critic(x)``, ``V_old = stop_gradient(V)``, the row's returns
   ``R = GAE(r, V_old) + V_old`` (GAE runs along each row, so a micro-batch needs no other rows), and the
   gradient of the loss with the policy terms held constant (``logp = logp_old``);
2. the whole batch's advantages from the collected ``V_old`` (whitening needs every row), then
   **actor**, per micro-batch: the loss with ``V = V_old`` held constant, differentiated for the actor.

Each phase differentiates only the terms that depend on its model, and their sum is the joint loss, so
the gradients are those of the one-pass update; the loss and metrics come from phase 2 (there ``V =
V_old``, which is the critic's current value). The phases differ from the joint pass only in memory: one
model's activations live at a time.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import ops
from rlhf_jax.algos.base import Algorithm, Experience, Forward
from rlhf_jax.data.batches import SFTBatch
from rlhf_jax.models import lora
from rlhf_jax.online.experience import (Models, UpdateSettings, critic_params_of, critic_values, fused_values_allowed,
                                        policy_forward, value_metrics)
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.step import all_finite, apply_if_finite, join_micro_batches, scan_sum, split_micro_batches


def ptx_loss_sum(model, params, batch: SFTBatch) -> tuple[jax.Array, jax.Array]:
    """Next-token loss on pretraining data as ``(sum, count)`` (PPO-ptx, Ouyang et al. 2022, eq. 2).

    .. math:: \\mathcal L_{ptx} = -\\sum_s m_{s+1} \\log \\pi_\\theta(x_{s+1} | x_{\\le s})
    """
    logits = model.apply({"params": params}, batch.input_ids_BxS, batch.attention_mask_BxS)
    logp = ops.token_logprobs(logits[:, :-1], batch.input_ids_BxS[:, 1:])
    w = batch.loss_mask_BxS[:, 1:].astype(jnp.float32)
    return -jnp.sum(logp * w), jnp.sum(w)


def _minibatches(tree, n: int):
    """[B, ...] → [n, B/n, ...]: contiguous chunks of an already shuffled batch (one per optimizer step)."""
    if tree is None:
        return None
    return split_micro_batches(tree, n, group_size=jax.tree.leaves(tree)[0].shape[0] // n)


def make_update(algo: Algorithm, models: Models, *, actor_tx: optax.GradientTransformation,
                critic_tx: Optional[optax.GradientTransformation], settings: UpdateSettings) -> Callable:
    """The un-jitted update ``(actor, critic, exp, ptx, key, kl_coef) -> (actor, critic, metrics)``.

    ``critic`` is a :class:`TrainState` or None; ``ptx`` an :class:`SFTBatch` with leading dimension
    ``num_minibatches`` × rows (or None). ``metrics`` are means over all optimizer steps of the update.
    """
    s = settings
    if s.fused_values and not (algo.use_critic and fused_values_allowed(epochs=s.epochs,
                                                                        num_minibatches=s.num_minibatches)):
        raise ValueError("fused_values needs a critic and one optimizer step over the whole batch "
                         f"(epochs, num_minibatches = 1), got {s}")
    if s.prompt_repeats > 1 and s.num_minibatches != 1:
        raise ValueError(f"prompt_repeats={s.prompt_repeats} needs the groups intact: num_minibatches must be 1, "
                         f"got {s.num_minibatches}")
    sg = jax.lax.stop_gradient

    # LoRA dropout (model.lora.dropout > 0): each training forward draws its masks from a key derived from the
    # update's key, the epoch, minibatch and micro-batch, and the role (0 actor, 1 critic, 2 ptx); without
    # dropout `lora.training` returns the module itself and the keys are dead code.
    def actor_forward(actor_p, mb: Experience, key):
        return policy_forward(lora.training(models.actor, jax.random.fold_in(key, 0)), actor_p, mb.ids_BxS, mb.mask_BxS, mb.response_ids_BxT,
                              prompt_length=mb.prompt_ids_BxP.shape[1], temperature=s.temperature,
                              with_entropy=True, prompt_repeats=s.prompt_repeats)

    def values_of(critic_p, mb: Experience, actor_p, key):
        return critic_values(lora.training(models.critic, jax.random.fold_in(key, 1)), critic_params_of(models, critic_p, actor_p), mb.ids_BxS, mb.mask_BxS,
                             prompt_length=mb.prompt_ids_BxP.shape[1])

    def with_ptx(loss, mets, actor_p, ptx_mb, den, key):
        if ptx_mb is None:
            return loss, mets
        ptx_sum, _ = ptx_loss_sum(lora.training(models.actor, jax.random.fold_in(key, 2)), actor_p, ptx_mb)
        ptx_den = jnp.maximum(den["ptx"], 1.0)
        return loss + s.ptx_coef * ptx_sum / ptx_den, dict(mets, ptx_loss=sg(ptx_sum / ptx_den))

    def denominators(mb: Experience, ptx_mb):
        den = dict(algo.denominators(mb))
        if ptx_mb is not None:
            den["ptx"] = jnp.sum(ptx_mb.loss_mask_BxS[:, 1:]).astype(jnp.float32)
        return den

    def finish(actor, critic, loss, mets, g_actor, g_critic):
        """Skip-if-not-finite, grad norms, both optimizer steps."""
        finite = jnp.isfinite(loss) & all_finite(g_actor, g_critic)
        g_actor = jax.tree.map(lambda g, p: g.astype(p.dtype), g_actor, lora.trainable(actor.params))
        mets = dict(mets, loss=loss, actor_grad_norm=optax.tree.norm(g_actor), finite=finite.astype(jnp.float32))
        actor = apply_if_finite(actor_tx, actor, g_actor, finite)
        if critic is not None:
            g_critic = jax.tree.map(lambda g, p: g.astype(p.dtype), g_critic, lora.trainable(critic.params))
            mets["critic_grad_norm"] = optax.tree.norm(g_critic)
            critic = apply_if_finite(critic_tx, critic, g_critic, finite)
        return actor, critic, mets

    # ------------------------------------------------------------- one pass: actor and critic together
    def joint_loss(params, xs, den, kl_coef, key):
        (actor_p, critic_p), (mb, ptx_mb, m) = params, xs
        key = jax.random.fold_in(key, m)  # the micro-batch
        logp, ent = actor_forward(actor_p, mb, key)
        values = values_of(critic_p, mb, actor_p, key) if algo.use_critic else None
        loss, mets = algo.loss(Forward(logp, ent, values), mb, den, kl_coef)
        return with_ptx(loss, mets, actor_p, ptx_mb, den, key)

    joint_grad = lora.value_and_grad(joint_loss, has_aux=True)  # LoRA: over the adapters (+ value head) only

    def minibatch_step(carry, xs):
        actor, critic, kl_coef, key = carry
        mb, ptx_mb, j = xs
        key_j = jax.random.fold_in(key, j)  # the minibatch
        den = denominators(mb, ptx_mb)
        params = (actor.params, critic.params if critic is not None else None)
        micro = (split_micro_batches(mb, s.num_micro_batches, group_size=s.prompt_repeats),
                 None if ptx_mb is None else split_micro_batches(ptx_mb, s.num_micro_batches),
                 jnp.arange(s.num_micro_batches))
        ((loss, mets), (g_actor, g_critic)), _ = scan_sum(lambda *a: (joint_grad(*a), None), params, micro,
                                                             den, kl_coef, key_j)
        actor, critic, mets = finish(actor, critic, loss, mets, g_actor, g_critic)
        return (actor, critic, kl_coef, key), mets

    # ------------------------------------------------- fused values: the critic phase, then the actor phase
    def critic_phase_loss(critic_p, xs, den, kl_coef, actor_p, key):
        mb, m = xs
        values = values_of(critic_p, mb, actor_p, jax.random.fold_in(key, m))
        mb = mb._replace(old_values_BxT=sg(values))
        _, returns, _ = algo.advantages(mb, kl_coef)  # per-row returns: GAE runs along each row
        fwd = Forward(mb.old_logp_BxT, jnp.zeros_like(values), values)  # policy terms constant here
        loss, _ = algo.loss(fwd, mb._replace(returns_BxT=returns), den, kl_coef)
        return loss, sg(values)

    def actor_phase_loss(actor_p, xs, den, kl_coef, key):
        mb, ptx_mb, m = xs
        key = jax.random.fold_in(key, m)
        logp, ent = actor_forward(actor_p, mb, key)
        loss, mets = algo.loss(Forward(logp, ent, mb.old_values_BxT), mb, den, kl_coef)  # V = V_old: constant
        return with_ptx(loss, mets, actor_p, ptx_mb, den, key)

    critic_grad = lora.value_and_grad(critic_phase_loss, has_aux=True)
    actor_grad = lora.value_and_grad(actor_phase_loss, has_aux=True)

    def fused_step(actor, critic, exp: Experience, ptx_mb, kl_coef, key):
        m = s.num_micro_batches
        key = jax.random.fold_in(key, 0)  # as epoch 0's minibatch 0 in the unfused update
        den = denominators(exp, ptx_mb)

        def critic_micro(*a):
            (_, values), g = critic_grad(*a)
            return g, values

        g_critic, values_MxbxT = scan_sum(critic_micro, critic.params,
                                          (split_micro_batches(exp, m, group_size=s.prompt_repeats), jnp.arange(m)),
                                          den, kl_coef, actor.params, key)
        exp = exp._replace(old_values_BxT=join_micro_batches(values_MxbxT, group_size=s.prompt_repeats))
        adv, ret, _ = algo.advantages(exp, kl_coef)
        exp = exp._replace(advantages_BxT=adv, returns_BxT=ret)
        extra = {"advantages_mean": ops.masked_mean(adv, exp.response_mask_BxT), **value_metrics(exp)}
        micro = (split_micro_batches(exp, m, group_size=s.prompt_repeats),
                 None if ptx_mb is None else split_micro_batches(ptx_mb, m), jnp.arange(m))
        ((loss, mets), g_actor), _ = scan_sum(lambda *a: (actor_grad(*a), None), actor.params, micro, den,
                                                 kl_coef, key)
        return finish(actor, critic, loss, dict(mets, **extra), g_actor, g_critic)

    def update(actor: TrainState, critic: Optional[TrainState], exp: Experience, ptx: Optional[SFTBatch],
               key: jax.Array, kl_coef: jax.Array):
        if s.fused_values:  # one optimizer step over the whole batch (checked above)
            return fused_step(actor, critic, exp, ptx, kl_coef, jax.random.fold_in(jax.random.split(key, 1)[0], 1))
        B = exp.score_B.shape[0]
        ptx_mbs = _minibatches(ptx, s.num_minibatches)

        def epoch(carry, ekey):
            if s.num_minibatches == 1:  # one minibatch is the whole batch: its row order changes nothing
                mbs = _minibatches(exp, 1)
            else:
                perm = jax.random.permutation(ekey, B)
                mbs = _minibatches(jax.tree.map(lambda x: x[perm], exp), s.num_minibatches)
            actor, critic, kl_coef = carry
            (actor, critic, kl_coef, _), mets = jax.lax.scan(
                minibatch_step, (actor, critic, kl_coef, jax.random.fold_in(ekey, 1)),
                (mbs, ptx_mbs, jnp.arange(s.num_minibatches)))
            return (actor, critic, kl_coef), mets

        (actor, critic, _), mets = jax.lax.scan(epoch, (actor, critic, kl_coef),
                                                jax.random.split(key, s.epochs))
        mets = jax.tree.map(jnp.mean, mets)
        if critic is None:
            mets.pop("critic_grad_norm", None)
        return actor, critic, mets

    return update
