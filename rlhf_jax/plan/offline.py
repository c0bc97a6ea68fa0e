"""The programs of the offline commands (``sft``, ``rm``, ``dpo`` family), built by the recipes' own builders
(``recipes.sft.build_steps``, ``recipes.rm.build_steps``, ``recipes.dpo.build_steps``) on abstract params and batches of the widest
shape the data can take (``data.max_seq_len``)."""

from __future__ import annotations

import jax.numpy as jnp

from rlhf_jax import sharding as shd
from rlhf_jax.algos.preference_rows import KTOBatch, PairBatch
from rlhf_jax.data import PreferenceBatch, SFTBatch, UnpairedBatch
from rlhf_jax.plan.abstract import (Planned, RunPrograms, abstract_model, abstract_state, key_spec, spec,
                                    split_state, total_steps)
from rlhf_jax.train.optim import make_optimizer


def sft_batch(rows: int, width: int, bsh) -> SFTBatch:
    return SFTBatch(*(spec((rows, width), jnp.int32, bsh) for _ in SFTBatch._fields))


def _has_eval(data) -> bool:
    return data.eval_path is not None or data.eval_fraction > 0


def plan_sft(cfg, mesh) -> RunPrograms:
    from rlhf_jax.recipes import sft

    actor = abstract_model(cfg.model, mesh=mesh, head="lm")
    tx = make_optimizer(cfg.optim, total_steps(cfg.run))
    state, state_sh = abstract_state(actor.params, actor.shardings, tx, mesh)
    step, eval_step = sft.build_steps(cfg, actor.model, mesh, tx=tx, state_sh=state_sh,
                                      params_shardings=actor.shardings, total=total_steps(cfg.run))
    bsh, S = shd.batch_sharding(mesh), cfg.data.max_seq_len
    programs = [Planned("train_step", step, (state, sft_batch(cfg.batch_size, S, bsh), key_spec(mesh)),
                        uses=("policy params", "policy optimizer state"))]
    if _has_eval(cfg.data):
        rows = cfg.eval_batch_size or cfg.batch_size
        programs.append(Planned("eval_step", eval_step, (state.params, sft_batch(rows, S, bsh)),
                                uses=("policy params",)))
    return RunPrograms("sft", mesh, split_state("policy", state), programs)


def preference_batch(cfg, rows: int, bsh):
    """``PairBatch`` / ``KTOBatch`` of ``rows`` rows at ``data.max_seq_len`` (reference values attached)."""
    S = cfg.data.max_seq_len
    ids = lambda: spec((rows, S), jnp.int32, bsh)  # noqa: E731
    vec = lambda: spec((rows,), jnp.float32, bsh)  # noqa: E731
    if cfg.loss.algorithm == "kto":
        return KTOBatch(UnpairedBatch(ids(), ids(), ids(), spec((rows,), jnp.int32, bsh)), ids(), ids(), ids(),
                        vec(), vec())
    return PairBatch(PreferenceBatch(*(ids() for _ in PreferenceBatch._fields)), vec(), vec())


def plan_dpo(cfg, mesh) -> RunPrograms:
    from rlhf_jax.recipes import dpo
    from rlhf_jax.train import reference as pc

    actor = abstract_model(cfg.model, mesh=mesh, head="lm")
    tx = make_optimizer(cfg.optim, total_steps(cfg.run))
    state, state_sh = abstract_state(actor.params, actor.shardings, tx, mesh)
    step, eval_step = dpo.build_steps(cfg, actor.model, mesh, tx=tx, state_sh=state_sh,
                                      params_shardings=actor.shardings, total=total_steps(cfg.run))
    bsh = shd.batch_sharding(mesh)
    batch = preference_batch(cfg, cfg.batch_size, bsh)
    resident = split_state("policy", state)
    programs = []
    if cfg.reference_is_adapters_off:  # model.lora: the policy's base with the adapters off, nothing more resident
        attach = pc.make_ref_attacher(actor.model, mesh=mesh, params_shardings=actor.shardings,
                                      num_chunks=cfg.num_micro_batches, completion_width=dpo.completion_width(cfg.data),
                                      prompt_width=dpo.shared_prompt_width(cfg))
        name = "precompute_ref_logps" if cfg.precompute_ref_logps else "reference_logps"
        programs.append(Planned(name, attach, (actor.params, batch), uses=("policy params",)))
    elif cfg.loss.needs_reference:  # the reference as `recipes.dpo._reference` loads it
        ref = abstract_model(cfg.model, mesh=mesh, head="lm", path=cfg.ref_model_path or cfg.model.path,
                             dtype=cfg.ref_dtype or cfg.model.dtype,
                             param_dtype=cfg.ref_dtype or cfg.model.param_dtype)
        width = dpo.completion_width(cfg.data)
        attach = pc.make_ref_attacher(ref.model, mesh=mesh, params_shardings=ref.shardings,
                                      num_chunks=cfg.num_micro_batches, completion_width=width,
                                      prompt_width=dpo.shared_prompt_width(cfg))
        if cfg.precompute_ref_logps:  # one pass before training; the reference is then dropped
            resident["reference (precompute pass only)"] = ref.params
            programs.append(Planned("precompute_ref_logps", attach, (ref.params, batch),
                                    uses=("reference (precompute pass only)",),
                                    live=("policy params", "reference (precompute pass only)")))
        else:
            resident["reference"] = ref.params
            programs.append(Planned("reference_logps", attach, (ref.params, batch), uses=("reference",)))
    live = tuple(k for k in resident if "precompute" not in k)
    programs.append(Planned("train_step", step, (state, batch, key_spec(mesh)),
                            uses=("policy params", "policy optimizer state"), live=live))
    if _has_eval(cfg.data):
        programs.append(Planned("eval_step", eval_step,
                                (state.params, preference_batch(cfg, cfg.eval_batch_size or cfg.batch_size, bsh)),
                                uses=("policy params",), live=live))
    return RunPrograms(cfg.loss.algorithm, mesh, resident, programs)


def plan_rm(cfg, mesh) -> RunPrograms:
    from rlhf_jax.recipes import rm

    model = abstract_model(cfg.model, mesh=mesh, head="scalar")
    tx = make_optimizer(cfg.optim, total_steps(cfg.run))
    state, state_sh = abstract_state(model.params, model.shardings, tx, mesh)
    step, eval_step = rm.build_steps(cfg, model.model, mesh, tx=tx, state_sh=state_sh,
                                     params_shardings=model.shardings, total=total_steps(cfg.run))
    bsh, S = shd.batch_sharding(mesh), cfg.data.max_seq_len
    batch = lambda n: PreferenceBatch(*(spec((n, S), jnp.int32, bsh) for _ in PreferenceBatch._fields))  # noqa: E731
    programs = [Planned("train_step", step, (state, batch(cfg.batch_size), key_spec(mesh)),
                        uses=("reward model params", "reward model optimizer state"))]
    if _has_eval(cfg.data):
        programs.append(Planned("eval_step", eval_step, (state.params, batch(cfg.eval_batch_size or cfg.batch_size)),
                                uses=("reward model params",)))
    return RunPrograms("rm", mesh, split_state("reward model", state), programs)



def plan_ilql(cfg, mesh) -> RunPrograms:
    """ILQL: the train step (``recipes.ilql.make_step``) on the LM + heads state, and the evaluation sampler
    (``algos.ilql.ILQLPolicy``: greedy and sampled) when ``eval.prompts`` is set."""
    from rlhf_jax.algos import ilql as algo
    from rlhf_jax.data.ilql import ILQLBatch
    from rlhf_jax.plan.abstract import AbstractModel, attach
    from rlhf_jax.plan.online import sampler_programs
    from rlhf_jax.recipes import ilql

    actor = abstract_model(cfg.model, mesh=mesh, head="lm")
    head_shapes, head_sh = ilql.heads_layout(cfg, actor.model.config, mesh)
    params = {"lm": actor.params, "heads": attach(head_shapes, head_sh)}
    shardings = {"lm": actor.shardings, "heads": head_sh}
    tx = make_optimizer(cfg.optim, total_steps(cfg.run))
    state, state_sh = abstract_state(params, shardings, tx, mesh)
    heads = algo.ILQLHeads(actor.model.config, two_qs=cfg.ilql.two_qs)
    step = ilql.make_step(cfg, actor.model, heads, tx, total_steps(cfg.run), mesh, state_sh)
    bsh, B = shd.batch_sharding(mesh), cfg.batch_size
    P, T = cfg.data.max_prompt_len, cfg.data.max_completion_len
    i32 = jnp.int32
    batch = ILQLBatch(spec((B, P), i32, bsh), spec((B, P), i32, bsh), spec((B, T), i32, bsh), spec((B, T), i32, bsh),
                      spec((B, T), jnp.float32, bsh))
    programs = [Planned("train_step", step, (state, batch, key_spec(mesh)),
                        uses=("policy params", "policy optimizer state"))]
    if cfg.eval.prompts is not None:  # make_evaluate: greedy (beta and beta = 0) and sampled decoding
        rollout = ilql.eval_rollout(cfg)
        policy = AbstractModel(algo.ILQLPolicy(actor.model.config, two_qs=cfg.ilql.two_qs, beta=cfg.gen_kwargs.beta),
                               state.params, shardings)
        for name, temperature in (("generate_eval_greedy", 0.0), ("generate_eval_sampled", rollout.temperature)):
            gen, _ = sampler_programs(policy, rollout, mesh,
                                      rows=cfg.eval.batch_size, prompt_len=P, temperature=temperature, name=name)
            programs += [g._replace(uses=("policy params",)) for g in gen]
    return RunPrograms("ilql", mesh, split_state("policy", state), programs)
