"""The programs of the sample-then-train commands ``raft`` and ``online_dpo`` and of ``label``: the sampler,
the scorer (reward model or judge LM), then the train step (``recipes.online_dpo.build_programs``; RAFT's
SFT step as ``recipes.raft.train`` builds it) on rows of the rollout's width (prompt + response)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax import sharding as shd
from rlhf_jax.algos.preference import PairBatch
from rlhf_jax.data import PreferenceBatch
from rlhf_jax.plan.abstract import (Planned, RunPrograms, abstract_model, abstract_state, frozen, key_spec, spec,
                                    split_state, total_steps)
from rlhf_jax.plan.offline import sft_batch
from rlhf_jax.plan.online import kv_cache_bytes, reward_model, rm_program, sampler_programs
from rlhf_jax.algos.supervised import sft_loss
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.step import make_train_step


def _rollout_programs(cfg, actor, mesh, *, samples: int):
    U, P = cfg.rollout.batch_size, cfg.data.max_prompt_len
    shared = samples > 1 and U % shd.local_batch_divisor(mesh) == 0  # as Sampler.__call__
    programs, ro = sampler_programs(actor, cfg.rollout, mesh, rows=U if shared else U * samples, prompt_len=P,
                                    repeats=samples if shared else 1)
    extra = {"KV cache (generate)": kv_cache_bytes(actor.model, U * samples, P + cfg.rollout.max_new_tokens, mesh)}
    return programs, ro, extra


def plan_raft(cfg, mesh) -> RunPrograms:
    actor = abstract_model(cfg.model, mesh=mesh, head="lm")
    h = cfg.raft
    tx = make_optimizer(cfg.optim, total_steps(cfg.run) * h.sft_steps)
    state, state_sh = abstract_state(actor.params, actor.shardings, tx, mesh)
    if cfg.kl_coef > 0:
        raise ValueError("rlhf-jax plan: raft with kl_coef > 0 (SuperHF) is not planned yet")
    step = make_train_step(lambda p, b, k: sft_loss(actor.model, p, b, k, mode=h.loss_aggregation), tx=tx,
                           num_micro_batches=h.num_micro_batches, mesh=mesh, state_shardings=state_sh)  # as raft.train
    resident = split_state("actor", state)
    rm = reward_model(cfg, mesh)  # make_scorer's default frozen_dtype
    if rm is not None:
        resident["reward model"] = rm.params
    programs, ro, extra = _rollout_programs(cfg, actor, mesh, samples=h.num_samples)
    if rm is not None:
        programs.append(rm_program(rm, ro, mesh))
    U, S = cfg.rollout.batch_size, cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    rows = U * (h.num_samples if h.quantile is not None else h.top_k)  # the kept rows (static)
    programs.append(Planned("sft_step", step, (state, sft_batch(rows, S, shd.batch_sharding(mesh)), key_spec(mesh)),
                            uses=("actor params", "actor optimizer state")))
    return RunPrograms("raft", mesh, resident, programs, extra)


def plan_online_dpo(cfg, mesh) -> RunPrograms:
    from rlhf_jax.recipes import online_dpo

    actor = abstract_model(cfg.model, mesh=mesh, head="lm")
    h = cfg.online
    ref = frozen(actor.params, cfg.ref_dtype)
    tx = make_optimizer(cfg.optim, total_steps(cfg.run) * h.updates_per_iteration)
    state, state_sh = abstract_state(actor.params, actor.shardings, tx, mesh)
    dpo_step, attach = online_dpo.build_programs(cfg, actor.model, mesh, tx=tx, state_sh=state_sh,
                                                 ref_shardings=actor.shardings)
    resident = {**split_state("actor", state), "reference": ref}
    rm = reward_model(cfg, mesh)  # make_scorer's default frozen_dtype
    if rm is not None:
        resident["reward model"] = rm.params
    programs, ro, extra = _rollout_programs(cfg, actor, mesh, samples=h.num_samples)
    if rm is not None:
        programs.append(rm_program(rm, ro, mesh))
    bsh = shd.batch_sharding(mesh)
    U, S = cfg.rollout.batch_size, cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    ids = lambda: spec((U, S), jnp.int32, bsh)  # noqa: E731
    pairs = PairBatch(PreferenceBatch(*(ids() for _ in PreferenceBatch._fields)), spec((U,), jnp.float32, bsh),
                      spec((U,), jnp.float32, bsh))
    programs += [Planned("reference_logps", attach, (ref, pairs), uses=("reference",)),
                 Planned("dpo_step", dpo_step, (state, pairs, key_spec(mesh)),
                         uses=("actor params", "actor optimizer state"))]
    return RunPrograms("online_dpo", mesh, resident, programs, extra)


def plan_label(cfg, mesh) -> RunPrograms:
    from rlhf_jax.recipes import label

    actor = abstract_model(cfg.model, mesh=mesh, head="lm")
    resident = {"actor params": actor.params}
    programs, ro, extra = _rollout_programs(cfg, actor, mesh, samples=cfg.num_samples)
    B = cfg.rollout.batch_size * cfg.num_samples
    if cfg.ranker == "judge":
        judge, uses = actor, ("actor params",)
        if cfg.judge.model_path is not None:
            judge = abstract_model(cfg.model, mesh=mesh, head="lm", path=cfg.judge.model_path)
            resident["judge"], uses = judge.params, ("judge",)
        fn = jax.jit(lambda p, i, m: label.verdict_logprob(judge.model.apply({"params": p}, i, m), m, 0))
        ids = spec((B, cfg.judge.max_len), jnp.int32, shd.batch_sharding(mesh))  # the widest judge input
        programs.append(Planned("judge", fn, (judge.params, ids, ids), uses=uses))
    elif cfg.ranker == "pairwise_judge":
        raise ValueError("rlhf-jax plan: label ranker=pairwise_judge is not planned yet (its judge programs are "
                         "built inside online.judge.PairwiseJudge); plan ranker=judge for a same-size estimate")
    elif cfg.ranker == "reward_model":
        rm = reward_model(cfg, mesh)  # make_scorer's default frozen_dtype
        resident["reward model"] = rm.params
        programs.append(rm_program(rm, ro, mesh))
    return RunPrograms("label", mesh, resident, programs, extra)
