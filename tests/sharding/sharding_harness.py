"""Shared by the 8-device and multi-process sharding checks: the tiny rlhf_jax.models decoder, one SFT
step and one PPO-style step (policy LM + scalar value model), each runnable unsharded (1 device, plain
jit) or on a mesh via rlhf_jax.sharding.

Dims divide every mesh axis size up to 8 (q heads 16, kv heads 8, mlp 128, vocab 128 over ``tensor``;
embed 64 over ``fsdp``; batch = 2 x devices over ``data`` x ``fsdp``), so a mesh shape the tests were
not written for still divides.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import fixtures, models, ops
from rlhf_jax import sharding as shd

SEQ = 8


def tiny_model_config():
    """Llama-style (RoPE, RMSNorm, SwiGLU, GQA 16/8 heads), float32, one layer, untied LM head."""
    return models.ModelConfig.from_hf(fixtures.tiny_config("llama", vocab_size=128, hidden=64, layers=1, heads=16,
                                                           kv_heads=8, intermediate=128))


def big_param(params):
    """The large matrix whose shards are checked: MLP up-projection, logical ("embed", "mlp")."""
    return params["layers_0"]["mlp"]["up"]


def build(head: str = "lm"):
    """(init_fn(key) -> params, apply_fn(params, ids, mask), logical specs) of the real rlhf_jax.models decoder."""
    model = models.Transformer(tiny_model_config(), head=head)
    init = functools.partial(models.init_params, model)
    return init, (lambda p, ids, mask: model.apply({"params": p}, ids, mask)), models.logical_specs(model)


class SFTBatch(NamedTuple):
    ids_BxS: jax.Array
    mask_BxS: jax.Array


class PPOBatch(NamedTuple):
    ids_BxS: jax.Array
    mask_BxS: jax.Array
    old_logp_BxT: jax.Array
    adv_BxT: jax.Array
    old_values_BxT: jax.Array
    returns_BxT: jax.Array


def make_batches(batch_size: int, seed: int = 0) -> tuple[SFTBatch, PPOBatch]:
    """Deterministic host numpy batches (left padding on some rows)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 128, (batch_size, SEQ)).astype(np.int32)
    mask = np.ones((batch_size, SEQ), np.int32)
    mask[::3, :2] = 0
    T = SEQ - 1
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    ppo = PPOBatch(ids, mask, -np.abs(f(batch_size, T)) - 4.0, f(batch_size, T), f(batch_size, T), f(batch_size, T))
    return SFTBatch(ids, mask), ppo


# eps 1e-5 (not 1e-8): Adam's first update g/(|g|+eps) is ill-conditioned where |g| ~ eps, which would
# amplify float summation-order noise (not a sharding error) into ~lr-sized parameter differences.
TX = optax.adamw(1e-2, eps=1e-5, weight_decay=0.1)


def sft_loss(params, batch: SFTBatch, apply_fn):
    """Next-token NLL, token-mean over real target tokens."""
    logits = apply_fn(params, batch.ids_BxS, batch.mask_BxS)
    logp_BxT = ops.token_logprobs(logits[:, :-1], batch.ids_BxS[:, 1:])
    m = batch.mask_BxS[:, 1:] * batch.mask_BxS[:, :-1]
    s, c = ops.aggregate(-logp_BxT, m, mode="token-mean")
    return s / c


def ppo_loss(params, batch: PPOBatch, policy_apply, value_apply):
    """Clipped policy loss + 0.5 x clipped value loss, each token-mean."""
    logits = policy_apply(params["policy"], batch.ids_BxS, batch.mask_BxS)
    logp_BxT = ops.token_logprobs(logits[:, :-1], batch.ids_BxS[:, 1:])
    values_BxT = value_apply(params["value"], batch.ids_BxS, batch.mask_BxS)[:, :-1]
    m = batch.mask_BxS[:, 1:]
    pg = ops.ppo_policy_loss(logp_BxT, batch.old_logp_BxT, batch.adv_BxT, m, clip_eps=0.2)
    vf = ops.value_loss(values_BxT, batch.old_values_BxT, batch.returns_BxT, m, clip_eps=0.2)
    ps, pc = ops.aggregate(pg, m, mode="token-mean")
    vs, vc = ops.aggregate(vf, m, mode="token-mean")
    return ps / pc + 0.5 * vs / vc


def update_step(loss_fn, params, opt_state, batch):
    """One optimizer step: returns (loss, grads, new_params, new_opt_state)."""
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = TX.update(grads, opt_state, params)
    return loss, grads, optax.apply_updates(params, updates), opt_state


class Problem(NamedTuple):
    init: Any        # key -> params
    specs: Any       # logical PartitionSpecs
    loss: Any        # (params, batch) -> scalar
    batch: Any       # host numpy batch


def problems(batch_size: int) -> dict[str, Problem]:
    """The SFT and PPO problems on the tiny model."""
    p_init, p_apply, p_specs = build("lm")
    v_init, v_apply, v_specs = build("scalar")
    sft_b, ppo_b = make_batches(batch_size)

    def ppo_init(key):
        k1, k2 = jax.random.split(key)
        v = v_init(k2)
        v["score"] = 0.3 * jax.random.normal(k2, v["score"].shape)  # non-zero value head
        return {"policy": p_init(k1), "value": v}

    return {
        "sft": Problem(p_init, p_specs, functools.partial(sft_loss, apply_fn=p_apply), sft_b),
        "ppo": Problem(ppo_init, {"policy": p_specs, "value": v_specs},
                       functools.partial(ppo_loss, policy_apply=p_apply, value_apply=v_apply), ppo_b),
    }


def run_unsharded(prob: Problem, key) -> tuple:
    """The 1-device reference: plain jit, no mesh."""
    params = jax.jit(prob.init)(key)
    opt_state = jax.jit(TX.init)(params)
    out = jax.jit(functools.partial(update_step, prob.loss))(params, opt_state, prob.batch)
    return jax.device_get(out)


def run_sharded(prob: Problem, key, mesh, *, steps: int = 1, rules=shd.LOGICAL_RULES, fetch: bool = True):
    """Params and optimizer state born sharded; the step jitted with explicit shardings and donation.
    ``prob.batch`` holds this host's rows (the whole batch single-host).

    Returns ((loss, grads, new_params, new_opt_state) of the first step — fetched to host numpy if
    ``fetch``, else live global arrays —, the live params after ``steps`` steps, the jitted step).
    """
    abstract = jax.eval_shape(prob.init, key)
    p_sh = shd.logical_to_shardings(prob.specs, mesh, shapes=abstract, rules=rules)
    o_sh = shd.opt_state_shardings(TX, p_sh, abstract, mesh)
    params = shd.create_sharded(prob.init, key, out_shardings=p_sh)
    opt_state = shd.create_sharded(TX.init, params, out_shardings=o_sh)
    step = shd.jit_sharded(functools.partial(update_step, prob.loss), mesh,
                           in_shardings=(p_sh, o_sh, shd.batch_sharding(mesh, rules=rules)),
                           out_shardings=(shd.replicated(mesh), p_sh, p_sh, o_sh),
                           donate_argnums=(0, 1), rules=rules)
    batch = shd.shard_batch(prob.batch, mesh, rules=rules)
    first = None
    for _ in range(steps):
        out = step(params, opt_state, batch)
        _, _, params, opt_state = out
        if first is None:
            first = jax.device_get(out) if fetch else out
    return first, params, step


def checksum(params) -> jax.Array:
    """Sum over leaves of sum(x^2) + sum(x): a replicated scalar summarising every param."""
    return jax.jit(lambda p: sum(jnp.sum(x * x) + jnp.sum(x) for x in jax.tree.leaves(p)))(params)
