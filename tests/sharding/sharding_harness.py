"""Shared by the 8-device and multi-process sharding checks: a tiny model, one SFT step and one
PPO-style step, each runnable unsharded (1 device, plain jit) or on a mesh via rlhf_jax.sharding.

Dims divide every mesh axis size up to 16 (heads, kv heads, mlp, vocab over ``tensor``; embed over
``fsdp``; batch = 2 x devices over ``data`` x ``fsdp``), so a mesh shape the tests were not written
for still divides.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import ops
from rlhf_jax import sharding as shd

SEQ = 8


class TinyLM(nn.Module):
    """Stand-in decoder naming the same logical axes as rlhf_jax.models (GQA attention + MLP)."""

    vocab: int = 128
    embed: int = 64
    heads: int = 16
    kv_heads: int = 16
    head_dim: int = 4
    mlp: int = 128
    layers: int = 1
    head: str = "lm"

    def _p(self, name, shape, axes, init=nn.initializers.normal(0.2)):
        return self.param(name, nn.with_logical_partitioning(init, axes), shape)

    @nn.compact
    def __call__(self, ids_BxS, mask_BxS):
        emb_VxD = self._p("embed", (self.vocab, self.embed), ("vocab", "embed"))
        x = jnp.take(emb_VxD, ids_BxS, axis=0)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        S = ids_BxS.shape[1]
        allowed = jnp.tril(jnp.ones((S, S), bool))[None, None] & (mask_BxS[:, None, None, :] > 0)
        for i in range(self.layers):
            scale = self._p(f"norm_{i}", (self.embed,), ("norm",), nn.initializers.ones)
            h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale
            q = jnp.einsum("bsd,dhk->bshk", h, self._p(f"q_{i}", (self.embed, self.heads, self.head_dim),
                                                       ("embed", "q_heads", "head_dim")))
            k = jnp.einsum("bsd,dhk->bshk", h, self._p(f"k_{i}", (self.embed, self.kv_heads, self.head_dim),
                                                       ("embed", "kv_heads", "head_dim")))
            v = jnp.einsum("bsd,dhk->bshk", h, self._p(f"v_{i}", (self.embed, self.kv_heads, self.head_dim),
                                                       ("embed", "kv_heads", "head_dim")))
            rep = self.heads // self.kv_heads
            k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
            logits = jnp.einsum("bshk,bthk->bhst", q, k) / np.sqrt(self.head_dim)
            att = jax.nn.softmax(jnp.where(allowed, logits, -1e9), axis=-1)
            o = jnp.einsum("bhst,bthk->bshk", att, v)
            o = nn.with_logical_constraint(o, ("batch", "length", "act_heads", None))
            x = x + jnp.einsum("bshk,hkd->bsd", o, self._p(f"o_{i}", (self.heads, self.head_dim, self.embed),
                                                          ("q_heads", "head_dim", "embed")))
            u = jax.nn.gelu(jnp.einsum("bsd,df->bsf", x, self._p(f"wi_{i}", (self.embed, self.mlp), ("embed", "mlp"))))
            u = nn.with_logical_constraint(u, ("batch", "length", "act_mlp"))
            x = x + jnp.einsum("bsf,fd->bsd", u, self._p(f"wo_{i}", (self.mlp, self.embed), ("mlp", "embed")))
        if self.head == "scalar":
            return jnp.einsum("bsd,do->bso", x, self._p("score", (self.embed, 1), ("embed", None)))[..., 0]
        out = jnp.einsum("bsd,dv->bsv", x, self._p("lm_head", (self.embed, self.vocab), ("embed", "vocab")))
        return nn.with_logical_constraint(out, ("batch", "length", "act_vocab"))


#: name of the large matrix whose shards are checked, and its logical axes
BIG_PARAM = ("wi_0", ("embed", "mlp"))


def build(head: str = "lm"):
    """(init_fn(key) -> params, apply_fn(params, ids, mask), logical specs)."""
    model = TinyLM(head=head)
    dummy = (jnp.zeros((1, SEQ), jnp.int32), jnp.ones((1, SEQ), jnp.int32))
    init = lambda key: nn.meta.unbox(model.init(key, *dummy)["params"])  # noqa: E731
    specs = nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(0), *dummy))["params"]
    return init, (lambda p, ids, mask: model.apply({"params": p}, ids, mask)), specs


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
