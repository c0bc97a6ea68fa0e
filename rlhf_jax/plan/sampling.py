"""The programs of the sample-then-train commands ``raft`` and ``online_dpo`` and of ``label``: the sampler,
the scorer (reward model or judge LM), then the train step (``recipes.online_dpo.build_programs``; RAFT's
SFT step as ``recipes.raft.train`` builds it) on rows of the rollout's width (prompt + response)."""

from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax import sharding as shd
from rlhf_jax.algos.preference_rows import PairBatch
from rlhf_jax.data import PreferenceBatch
from rlhf_jax.plan.abstract import (Planned, RunPrograms, abstract_model, abstract_state, frozen, key_spec, spec,
                                    split_state, total_steps)
from rlhf_jax.plan.offline import sft_batch
from rlhf_jax.plan.online import kv_cache_bytes, reward_model, rm_program, sampler_programs
from rlhf_jax.train.optim import make_optimizer


def _rollout_programs(cfg, actor, mesh, *, samples: int):
    U, P = cfg.rollout.batch_size, cfg.data.max_prompt_len
    shared = samples > 1 and U % shd.local_batch_divisor(mesh) == 0  # as Sampler.__call__
    programs, ro = sampler_programs(actor, cfg.rollout, mesh, rows=U if shared else U * samples, prompt_len=P,
                                    repeats=samples if shared else 1)
    extra = {"KV cache (generate)": kv_cache_bytes(actor.model, U * samples, P + cfg.rollout.max_new_tokens, mesh)}
    return programs, ro, extra


def plan_raft(cfg, mesh) -> RunPrograms:
    """RAFT / SuperHF: sampler, reward model, (SuperHF) the reference log-prob pass, then the SFT step —
    both from ``recipes.raft.build_programs``."""
    from rlhf_jax.algos.superhf import SuperHFBatch
    from rlhf_jax.recipes import raft

    actor = abstract_model(cfg.model, mesh=mesh, head="lm")
    h = cfg.raft
    tx = make_optimizer(cfg.optim, total_steps(cfg.run) * h.sft_steps)
    state, state_sh = abstract_state(actor.params, actor.shardings, tx, mesh)
    step, ref_scorer = raft.build_programs(cfg, actor.model, mesh, tx=tx, state_sh=state_sh,
                                           params_shardings=actor.shardings)
    resident = split_state("actor", state)
    rm = reward_model(cfg, mesh)  # make_scorer's default frozen_dtype
    if rm is not None:
        resident["reward model"] = rm.params
    programs, ro, extra = _rollout_programs(cfg, actor, mesh, samples=h.num_samples)
    if rm is not None:
        programs.append(rm_program(rm, ro, mesh))
    U, S = cfg.rollout.batch_size, cfg.data.max_prompt_len + cfg.rollout.max_new_tokens
    rows = U * (h.num_samples if h.quantile is not None else h.top_k)  # the kept rows (static)
    bsh = shd.batch_sharding(mesh)
    kept = sft_batch(rows, S, bsh)
    if ref_scorer is not None:  # SuperHF: frozen float32 copy of the starting policy (raft.train's frozen_copy)
        resident["reference"] = frozen(actor.params, "float32")
        programs.append(Planned("reference_logps", ref_scorer, (resident["reference"], kept), uses=("reference",)))
        kept = SuperHFBatch(kept, spec((rows, S - 1), jnp.float32, bsh))
    programs.append(Planned("sft_step", step, (state, kept, key_spec(mesh)),
                            uses=("actor params", "actor optimizer state")))
    return RunPrograms("raft" if ref_scorer is None else "superhf", mesh, resident, programs, extra)


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
        fn = label.judge_program(judge.model, 0)  # the verdict id does not change the program
        ids = spec((B, cfg.judge.max_len), jnp.int32, shd.batch_sharding(mesh))  # the widest judge input
        programs.append(Planned("judge", fn, (judge.params, ids, ids), uses=uses))
    elif cfg.ranker == "pairwise_judge":  # online.judge.PairwiseJudge: pairs x principles x 2 orders
        from rlhf_jax.online.judge import judge_program

        pj = cfg.pairwise_judge
        judge, uses = actor, ("actor params",)
        if pj.model_path is not None:
            judge = abstract_model(cfg.model, mesh=mesh, head="lm", path=pj.model_path)
            resident["judge"], uses = judge.params, ("judge",)
        fn = judge_program(judge.model, jnp.zeros((2,), jnp.int32))  # option ids: values do not change the program
        rows = cfg.rollout.batch_size * len(pj.principles) * 2
        ids = spec((rows, pj.max_len), jnp.int32, shd.batch_sharding(mesh))  # the widest judge input
        programs.append(Planned("pairwise_judge", fn, (judge.params, ids, ids), uses=uses))
    elif cfg.ranker == "reward_model":
        rm = reward_model(cfg, mesh)  # make_scorer's default frozen_dtype
        resident["reward model"] = rm.params
        programs.append(rm_program(rm, ro, mesh))
    return RunPrograms("label", mesh, resident, programs, extra)


def plan_critique(cfg, mesh) -> RunPrograms:
    """Constitutional AI's SL stage: the policy's sampler, then the helper's critique and revision sampler
    (``recipes.critique.revision_rollout``) on contexts of ``max_context_len`` tokens."""
    from rlhf_jax.recipes import critique

    actor = abstract_model(cfg.model, mesh=mesh, head="lm")
    resident = {"policy params": actor.params}
    helper = actor
    if cfg.helper_model is not None:
        helper = abstract_model(cfg.model, mesh=mesh, head="lm", path=cfg.helper_model)
        resident["helper params"] = helper.params
    U = cfg.rollout.batch_size
    programs, _ = sampler_programs(actor, cfg.rollout, mesh, rows=U, prompt_len=cfg.data.max_prompt_len)
    revise, _ = sampler_programs(helper, critique.revision_rollout(cfg, U), mesh, rows=U,
                                 prompt_len=cfg.max_context_len, temperature=cfg.revision.temperature,
                                 name="generate_critique_revision")
    if cfg.helper_model is not None:
        revise = [p._replace(uses=("helper params",) if p.uses else ()) for p in revise]
    programs += revise
    ctx = cfg.max_context_len + cfg.revision.max_new_tokens
    extra = {"KV cache (generate)": kv_cache_bytes(actor.model, U, cfg.data.max_prompt_len + cfg.rollout.max_new_tokens,
                                                   mesh),
             "KV cache (critique/revision)": kv_cache_bytes(helper.model, U, ctx, mesh)}
    return RunPrograms("critique", mesh, resident, programs, extra)
