"""The programs of the online commands: the sampler (prefill + decode loop, after the hybrid-engine reshard),
the reward model, the teacher-forced scoring pass, the experience computation and the update — the last three
from the recipes' own builders (``recipes.ppo.build_programs``, ``recipes.grpo.build_programs``)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from rlhf_jax import sharding as shd
from rlhf_jax.data import SFTBatch
from rlhf_jax.online.scoring import reward_model_scores
from rlhf_jax.plan.abstract import (AbstractModel, Planned, RunPrograms, abstract_model, abstract_state, attach,
                                    frozen, key_spec, outputs, spec, split_state, total_steps)
from rlhf_jax.rollout import inference_layout, inference_rules, lower_generate
from rlhf_jax.rollout.types import Rollout
from rlhf_jax.train.optim import make_optimizer


def kv_cache_bytes(model, rows: int, length: int, mesh) -> int:
    """Per-chip bytes of the decode loop's KV cache: layers × 2 × rows × kv_heads × length × head_dim, rows
    split over the batch axes and kv heads over ``tensor`` (when they divide)."""
    c = model.config
    rows_per = -(-rows // shd._axes_size(mesh, shd.batch_sharding(mesh).spec[0]))
    t = mesh.shape["tensor"]
    heads = c.num_kv_heads // t if c.num_kv_heads % t == 0 else c.num_kv_heads
    return 2 * c.num_layers * rows_per * heads * length * c.head_dim * jnp.dtype(c.dtype).itemsize


def sampler_programs(actor: AbstractModel, rollout_cfg, mesh, *, rows: int, prompt_len: int, repeats: int = 1,
                     temperature=None, name: str = "generate") -> tuple[list[Planned], Rollout]:
    """``online.sampler.Sampler``'s programs for ``rows`` prompts: the reshard to the inference layout (when the
    training layout splits weights over fsdp) and ``generate``; returns them and the abstract rollout."""
    r = rollout_cfg
    bsh = shd.batch_sharding(mesh)
    same = "fsdp" in r.param_axes or mesh.shape["fsdp"] == 1  # as Sampler.__init__
    programs, params, uses = [], actor.params, ("actor params",)
    inf_sh = None
    if not same:
        inf_sh = inference_layout(actor.model, mesh, rules=inference_rules(keep_axes=tuple(r.param_axes)))
        reshard = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=inf_sh)  # rollout.layout._reshard_fn
        programs.append(Planned("reshard_for_inference", reshard, (actor.params,), uses=uses))
        params, uses = attach(actor.params, inf_sh), ()
    eos = actor.eos_ids
    kwargs = dict(max_new_tokens=r.max_new_tokens, temperature=r.temperature if temperature is None else temperature,
                  top_k=r.top_k, top_p=r.top_p, eos_token_id=eos, pad_token_id=eos[0],
                  min_new_tokens=r.min_new_tokens, prompt_repeats=repeats, param_shardings=inf_sh,
                  batch_sharding=None if inf_sh is None else bsh)
    ids = spec((rows, prompt_len), jnp.int32, bsh)
    key = key_spec(mesh)

    def lower():
        with shd.mesh_context(mesh):
            return lower_generate(actor.model, params, ids, ids, key=key, **kwargs)

    programs.append(Planned(name, lower, (), uses=uses,
                            note=f"{name}: prefill + decode loop of {r.max_new_tokens} tokens"))
    B, T = rows * repeats, r.max_new_tokens
    i32, f32 = jnp.int32, jnp.float32
    ro = Rollout(spec((B, prompt_len), i32, bsh), spec((B, prompt_len), i32, bsh), spec((B, T), i32, bsh),
                 spec((B, T), i32, bsh), spec((B, T), f32, bsh), spec((B, T), f32, bsh), spec((B,), i32, bsh))
    return programs, ro


def reward_model(cfg, mesh, frozen_dtype: str = "float32") -> AbstractModel | None:
    """The frozen reward model as ``online.scoring.make_scorer`` loads it (inference layout, ``frozen_dtype``)."""
    if cfg.reward.model_path is None:
        return None
    rm = abstract_model(cfg.model, mesh=mesh, head="scalar", path=cfg.reward.model_path,
                        rules=shd.INFERENCE_RULES)
    return dataclasses.replace(rm, params=frozen(rm.params, frozen_dtype))


def rm_program(rm: AbstractModel, ro: Rollout, mesh) -> Planned:
    bsh = shd.batch_sharding(mesh)
    fn = shd.jit_sharded(functools.partial(reward_model_scores, rm.model), mesh,  # as RewardScorer.__init__
                         in_shardings=(rm.shardings, bsh, bsh), out_shardings=bsh)
    B, S = ro.prompt_ids_BxP.shape[0], ro.prompt_ids_BxP.shape[1] + ro.response_ids_BxT.shape[1]
    ids = spec((B, S), jnp.int32, bsh)
    return Planned("reward_model", fn, (rm.params, ids, ids), uses=("reward model",))


def plan_ppo(cfg, mesh) -> RunPrograms:
    from rlhf_jax.online.experience import Models
    from rlhf_jax.recipes import ppo

    actor = abstract_model(cfg.model, mesh=mesh, head="lm")
    ref = frozen(actor.params, cfg.frozen_dtype)
    critic = abstract_model(cfg.model, mesh=mesh, head="scalar",
                            path=cfg.critic_path or cfg.reward.model_path or cfg.model.path)
    rm = reward_model(cfg, mesh, cfg.frozen_dtype)
    h = cfg.ppo
    steps = total_steps(cfg.run) * h.epochs * h.num_minibatches
    actor_tx, critic_tx = make_optimizer(cfg.actor_optim, steps), make_optimizer(cfg.critic_optim, steps)
    actor_state, actor_sh = abstract_state(actor.params, actor.shardings, actor_tx, mesh)
    critic_state, critic_sh = abstract_state(critic.params, critic.shardings, critic_tx, mesh)
    with_ptx = cfg.ptx.path is not None and cfg.ptx.coef != 0
    evaluate, make_exp, update = ppo.build_programs(
        cfg, Models(actor=actor.model, critic=critic.model), mesh, actor_sh=actor_sh, critic_sh=critic_sh,
        ref_shardings=actor.shardings, actor_tx=actor_tx, critic_tx=critic_tx, eos_ids=actor.eos_ids,
        with_ptx=with_ptx)
    resident = {**split_state("actor", actor_state), **split_state("critic", critic_state), "reference": ref}
    if rm is not None:
        resident["reward model"] = rm.params
    B = cfg.rollout.batch_size
    programs, ro = sampler_programs(actor, cfg.rollout, mesh, rows=B, prompt_len=cfg.data.max_prompt_len)
    if rm is not None:
        programs.append(rm_program(rm, ro, mesh))
    bsh, rep = shd.batch_sharding(mesh), shd.replicated(mesh)
    ev_args = (actor_state.params, ref, critic_state.params, ro)
    ev = outputs(evaluate, ev_args, bsh, mesh=mesh)
    score = spec((B,), jnp.float32, bsh)
    kl = spec((), jnp.float32, rep)
    exp_args = (ro, ev, score, score, kl)
    exp, _ = outputs(make_exp, exp_args, (bsh, rep), mesh=mesh)
    ptx = None
    if with_ptx:
        rows = cfg.ptx.batch_size * h.num_minibatches
        ptx = SFTBatch(*(spec((rows, cfg.ptx.max_seq_len), jnp.int32, bsh) for _ in SFTBatch._fields))
    programs += [
        Planned("evaluate_rollout", evaluate, ev_args, uses=("actor params", "reference", "critic params")),
        Planned("make_experience", make_exp, exp_args),
        Planned("update", update, (actor_state, critic_state, exp, ptx, key_spec(mesh), kl),
                uses=("actor params", "actor optimizer state", "critic params", "critic optimizer state")),
    ]
    extra = {"KV cache (generate)": kv_cache_bytes(actor.model, B, cfg.data.max_prompt_len + cfg.rollout.max_new_tokens,
                                                   mesh)}
    return RunPrograms("ppo", mesh, resident, programs, extra)


def plan_critic_free(cfg, mesh) -> RunPrograms:
    from rlhf_jax.recipes import grpo

    actor = abstract_model(cfg.model, mesh=mesh, head="lm")
    ref = frozen(actor.params, cfg.frozen_dtype)
    rm = reward_model(cfg, mesh, cfg.frozen_dtype)
    h = cfg.algo
    tx = make_optimizer(cfg.actor_optim, total_steps(cfg.run) * h.epochs * h.num_minibatches)
    state, state_sh = abstract_state(actor.params, actor.shardings, tx, mesh)
    U = cfg.rollout.batch_size
    evaluate, make_exp, update = grpo.build_programs(cfg, actor.model, mesh, actor_sh=state_sh,
                                                     ref_shardings=actor.shardings, tx=tx, eos_ids=actor.eos_ids,
                                                     host_batch_size=U)
    resident = {**split_state("actor", state), "reference": ref}
    if rm is not None:
        resident["reward model"] = rm.params
    G, P = h.group_size, cfg.data.max_prompt_len
    divisor = shd.local_batch_divisor(mesh)
    shared = G > 1 and U % divisor == 0  # as Sampler.__call__
    programs, ro = sampler_programs(actor, cfg.rollout, mesh, rows=U if shared else U * G, prompt_len=P,
                                    repeats=G if shared else 1)
    if h.algorithm == "remax":  # the greedy baseline response of each prompt
        greedy, _ = sampler_programs(actor, cfg.rollout, mesh, rows=U, prompt_len=P, temperature=0.0,
                                     name="generate_greedy")
        programs += greedy[-1:]
    if rm is not None:
        programs.append(rm_program(rm, ro, mesh))
    bsh, rep = shd.batch_sharding(mesh), shd.replicated(mesh)
    ev_args = (state.params, ref, None, ro)
    ev = outputs(evaluate, ev_args, bsh, mesh=mesh)
    score = spec((U * G,), jnp.float32, bsh)
    kl = spec((), jnp.float32, rep)
    exp_args = (ro, ev, score, score, score, kl)
    exp, _ = outputs(make_exp, exp_args, (bsh, rep), mesh=mesh)
    programs += [
        Planned("evaluate_rollout", evaluate, ev_args, uses=("actor params", "reference")),
        Planned("make_experience", make_exp, exp_args),
        Planned("update", update, (state, None, exp, None, key_spec(mesh), kl),
                uses=("actor params", "actor optimizer state")),
    ]
    extra = {"KV cache (generate)": kv_cache_bytes(actor.model, U * G, P + cfg.rollout.max_new_tokens, mesh)}
    return RunPrograms(h.algorithm, mesh, resident, programs, extra)
