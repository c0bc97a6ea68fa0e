"""Critic-free online RL: GRPO (with DAPO / Dr. GRPO presets), RLOO, REINFORCE++ and ReMax.

Same engine as PPO (``rlhf_jax.online``), without a critic; the algorithms are the pure advantage
functions of ``rlhf_jax.algos.critic_free``. One iteration:

1. ``rollout.batch_size`` prompts, each repeated G = ``algo.group_size`` times (contiguous groups) →
   ``rollout.generate`` → scores (Python reward functions with weights and/or a reward model, clip,
   no-EOS penalty; ``online.scoring.RewardScorer``).
2. DAPO dynamic sampling (optional): groups whose G scores are all equal are dropped and more prompts
   are sampled, at most ``algo.max_sampling_tries`` batches; if still short, dropped groups fill the rest
   (counted in ``dynamic_sampling/filled_groups``).
3. ReMax: the greedy (τ = 0) response of each prompt is scored; its score is the baseline.
4. actor + reference log-probs (one jit) → overlong penalty (DAPO, in tokens) → advantages (one jit)
   → ``algo.epochs`` × minibatches × micro-batches of the clipped loss (one jit).

A group's G rows share one prompt, and it is encoded once (``algo.share_prompt``, exact): the sampler
prefills the distinct prompts only, and the reference / actor forwards run each prompt once with the G
responses on its KV (``online.experience.shared_prompt_logits``; in the update when the groups stay intact).

Presets (``algo.preset``, GRPO only) fill the fields left null: ``grpo`` (group std, seq-mean-token-mean,
β = 0.04 k3 in the loss), ``dapo`` (clip-higher ε_high = 0.28, token-mean, β = 0, dynamic sampling, overlong
penalty over the last ⌈T/5⌉ tokens), ``dr_grpo`` (no std scaling, constant divisor T, β = 0).

Usage: ``rlhf-jax grpo configs/grpo_tiny_cpu.yaml``; ``rlhf-jax rloo|reinforce_pp|remax CONFIG``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import sharding as shd
from rlhf_jax.runtime import distributed
from rlhf_jax.runtime import xla
from rlhf_jax.algos import critic_free
from rlhf_jax.algos.base import Algorithm, PolicyLossHparams
from rlhf_jax.config import require
from rlhf_jax.data import DataConfig, PromptBatch
from rlhf_jax.online import batches as rows_of
from rlhf_jax.online.config import RewardConfig, RolloutConfig, online_eval_checks
from rlhf_jax.online.experience import (Models, UpdateSettings, evaluate_rollout, make_experience,
                                        prompt_sharing_allowed, rollout_metrics)
from rlhf_jax.online.sampler import Sampler, frozen_copy, prompt_splits
from rlhf_jax.online.heldout import make_heldout, policy_metrics
from rlhf_jax.online.scoring import RewardScorer, make_scorer, sample_rows
from rlhf_jax.online.update import make_update
from rlhf_jax.models.shared_prompt import differentiable
from rlhf_jax.rollout.types import logprob_temperature
from rlhf_jax.run_config import OptimConfig, RunConfig
from rlhf_jax.train import run as common
from rlhf_jax.train.loop import Loop, run_loop
from rlhf_jax.train.metrics import Timer
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.state import create_train_state

#: Per-algorithm defaults of the fields left null: (scale, loss_agg_mode, kl_coef, kl_kind, kl_placement).
ALGO_DEFAULTS = {
    "grpo": ("group", "seq-mean-token-mean", 0.04, "k3", "loss"),  # Shao et al. 2024
    "rloo": ("group", "token-mean", 0.05, "k1", "reward"),  # TRL RLOOTrainer
    "reinforce_pp": ("group", "token-mean", 0.01, "k1", "reward"),  # OpenRLHF reinforce
    "remax": ("group", "token-mean", 0.01, "k1", "reward"),  # Li et al. 2023
}
#: Preset overrides (GRPO family): field -> value.
PRESETS = {
    "grpo": {},
    "dapo": dict(clip_eps_high=0.28, loss_agg_mode="token-mean", kl_coef=0.0, dynamic_sampling=True,
                 overlong_buffer=-1),  # -1: ⌈T/5⌉ (DAPO: 4096 of 20480)
    "dr_grpo": dict(scale="none", loss_agg_mode="constant", kl_coef=0.0),
}


@dataclasses.dataclass(frozen=True)
class CriticFreeHyper:
    """The algorithm and its update; null fields take the preset's / algorithm's default (see ``resolve``)."""

    algorithm: Literal["grpo", "rloo", "reinforce_pp", "remax"] = "grpo"
    preset: Literal["grpo", "dapo", "dr_grpo"] = "grpo"  # GRPO variants; must be "grpo" for other algorithms
    group_size: int = 4  # G responses per prompt (ReMax may use 1)
    scale: Optional[Literal["group", "batch", "none"]] = None  # GRPO std scaling
    rloo_normalize: bool = False  # RLOO: standardise advantages over the batch
    gamma: float = 1.0  # REINFORCE++ discount
    epochs: int = 1
    num_minibatches: int = 1
    num_micro_batches: int = 1
    clip_eps: float = 0.2  # ε_low
    clip_eps_high: Optional[float] = None  # ε_high (clip-higher); null = preset or ε_low
    dual_clip: Optional[float] = None
    loss_agg_mode: Optional[Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant"]] = None
    entropy_coef: float = 0.0
    kl_coef: Optional[float] = None  # β
    kl_kind: Optional[Literal["k1", "k2", "k3"]] = None
    kl_placement: Optional[Literal["loss", "reward"]] = None
    kl_importance_weighted: bool = False  # KL in the loss weighted by π_θ/π_old (unbiased off-policy)
    dynamic_sampling: Optional[bool] = None  # DAPO: drop zero-variance groups and refill
    max_sampling_tries: int = 4  # prompt batches sampled at most per iteration with dynamic sampling
    overlong_buffer: Optional[int] = None  # DAPO L_cache in tokens (null/0 = off; -1 = ⌈T/5⌉)
    overlong_coef: float = 1.0  # weight of the overlong penalty added to the score
    old_logp: Literal["rollout", "recompute"] = "rollout"  # π_old from the sampler or an actor forward (see ppo)
    # Encode each group's prompt once (sampler prefill, reference and actor forwards; exact, see
    # models.shared_prompt_logits). Applies when the groups stay intact: num_minibatches = 1, micro-batches of
    # whole groups, distinct prompts divisible over the batch shards; the update not with scanned, rematerialized
    # layers (`models.shared_prompt.differentiable`).
    share_prompt: bool = True
    ema_decay: Optional[float] = None  # EMA of the actor (see ppo.ema_decay), exported to <output_dir>/model_ema

    def __post_init__(self):
        require(self.algorithm == "grpo" or self.preset == "grpo", "algo.preset",
                f"presets apply to algorithm=grpo, not {self.algorithm}")
        min_g = 1 if self.algorithm in ("remax", "reinforce_pp") else 2
        require(self.group_size >= min_g, "algo.group_size", f"{self.algorithm} needs >= {min_g}, got {self.group_size}")
        for k in ("epochs", "num_minibatches", "num_micro_batches", "max_sampling_tries"):
            require(getattr(self, k) >= 1, f"algo.{k}", f"must be >= 1, got {getattr(self, k)}")
        require(self.ema_decay is None or 0 < self.ema_decay < 1, "algo.ema_decay",
                f"must be in (0, 1) or null, got {self.ema_decay}")

    def resolve(self, max_new_tokens: int) -> "Resolved":
        """Fill null fields from ``PRESETS[preset]`` then ``ALGO_DEFAULTS[algorithm]`` (derived, no mutation)."""
        preset = PRESETS[self.preset] if self.algorithm == "grpo" else {}
        scale, agg, beta, kind, place = ALGO_DEFAULTS[self.algorithm]
        pick = lambda field, default: (getattr(self, field) if getattr(self, field) is not None  # noqa: E731
                                       else preset.get(field, default))
        buf = pick("overlong_buffer", 0)
        buf = -(-max_new_tokens // 5) if buf == -1 else buf
        require(0 <= buf <= max_new_tokens, "algo.overlong_buffer", f"must be in [0, {max_new_tokens}], got {buf}")
        return Resolved(scale=pick("scale", scale), loss_agg_mode=pick("loss_agg_mode", agg),
                        kl_coef=float(pick("kl_coef", beta)), kl_kind=pick("kl_kind", kind),
                        kl_placement=pick("kl_placement", place), clip_eps_high=pick("clip_eps_high", None),
                        dynamic_sampling=bool(pick("dynamic_sampling", False)), overlong_buffer=int(buf))


class Resolved(NamedTuple):
    scale: str
    loss_agg_mode: str
    kl_coef: float
    kl_kind: str
    kl_placement: str
    clip_eps_high: Optional[float]
    dynamic_sampling: bool
    overlong_buffer: int


@dataclasses.dataclass(frozen=True)
class CriticFreeConfig:
    """A critic-free online-RL run; ``run.total_steps`` counts iterations."""

    ALGORITHM: ClassVar[Optional[str]] = None  # set by the per-subcommand subclasses

    model: common.ModelLoadConfig  # actor init (SFT export); the reference is a frozen copy
    data: DataConfig  # prompt rows (+ extra columns passed to reward functions, e.g. GSM8K `answer`)
    reward: RewardConfig = RewardConfig(functions=("rlhf_jax.tasks:gold_score",))
    algo: CriticFreeHyper = CriticFreeHyper()
    rollout: RolloutConfig = RolloutConfig(batch_size=8)  # batch_size = PROMPTS per iteration
    frozen_dtype: Literal["float32", "bfloat16"] = "float32"
    actor_optim: OptimConfig = OptimConfig(learning_rate=1e-6)
    run: RunConfig = RunConfig(total_steps=100, log_every=1)
    mesh: shd.MeshConfig = shd.MeshConfig()
    sample_every: int = 0
    num_samples: int = 4

    def __post_init__(self):
        online_eval_checks(self.run, self.data, self.reward, ema=self.algo.ema_decay is not None)
        require(self.ALGORITHM is None or self.algo.algorithm == self.ALGORITHM, "algo.algorithm",
                f"this subcommand runs {self.ALGORITHM}; got {self.algo.algorithm}")
        a, b = self.algo, self.rollout.batch_size * self.algo.group_size
        require(b % a.num_minibatches == 0 and (b // a.num_minibatches) % a.num_micro_batches == 0,
                "algo.num_minibatches", f"{b} responses (batch_size x group_size) must divide into "
                f"{a.num_minibatches} minibatches of {a.num_micro_batches} micro-batches")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(CriticFreeConfig):
    ALGORITHM: ClassVar[Optional[str]] = "grpo"


@dataclasses.dataclass(frozen=True)
class RLOOConfig(CriticFreeConfig):
    ALGORITHM: ClassVar[Optional[str]] = "rloo"
    algo: CriticFreeHyper = CriticFreeHyper(algorithm="rloo")


@dataclasses.dataclass(frozen=True)
class ReinforcePPConfig(CriticFreeConfig):
    ALGORITHM: ClassVar[Optional[str]] = "reinforce_pp"
    algo: CriticFreeHyper = CriticFreeHyper(algorithm="reinforce_pp")


@dataclasses.dataclass(frozen=True)
class ReMaxConfig(CriticFreeConfig):
    ALGORITHM: ClassVar[Optional[str]] = "remax"
    algo: CriticFreeHyper = CriticFreeHyper(algorithm="remax", group_size=1)


def build_algorithm(h: CriticFreeHyper, r: Resolved, *, max_new_tokens: int) -> Algorithm:
    """The :class:`Algorithm` of a resolved config."""
    hp = PolicyLossHparams(clip_eps=h.clip_eps, clip_eps_high=r.clip_eps_high, dual_clip=h.dual_clip,
                           entropy_coef=h.entropy_coef, loss_agg_mode=r.loss_agg_mode,
                           agg_constant=float(max_new_tokens), kl_kind=r.kl_kind, kl_placement=r.kl_placement,
                           kl_importance_weighted=h.kl_importance_weighted)
    return critic_free.critic_free_algorithm(h.algorithm, hp, group_size=h.group_size, scale=r.scale,
                                             rloo_normalize=h.rloo_normalize, gamma=h.gamma)


class Groups(NamedTuple):
    """One iteration's scored groups: the rollout and scores (global arrays), this host's rows."""

    rollout: object
    score_B: jax.Array
    local_score_B: np.ndarray
    local_index_B: np.ndarray
    texts: dict
    metrics: dict


def collect_groups(sampler: Sampler, scorer: RewardScorer, params, prompts, key, *, group_size: int,
                   dynamic: bool, max_tries: int, mesh) -> Groups:
    """One batch of G-sample groups; with DAPO dynamic sampling (single host), prompt batches are drawn until
    every group has reward variance (or ``max_tries``) and dropped groups fill what is still missing."""
    if not dynamic:  # the first (only) draw of the dynamic loop below: the same key
        batch = next(prompts)
        ro = sampler(params, batch, jax.random.fold_in(key, 0), repeats=group_size)
        index = np.repeat(np.asarray(batch.index_B), group_size)
        sc = scorer(ro, index)
        return Groups(ro, sc.score_B, sc.local_score_B, index, sc.texts, sc.metrics)
    kept, pool, mets_all = [], [], []
    n_rows = None
    for t in range(max_tries):
        batch = next(prompts)
        ro = sampler(params, batch, jax.random.fold_in(key, t), repeats=group_size)
        index = np.repeat(np.asarray(batch.index_B), group_size)
        sc = scorer(ro, index)
        mets_all.append(sc.metrics)
        gold = sc.texts["gold"] if sc.texts.get("gold") is not None else [None] * len(index)
        rows = (shd.local_rows(ro), sc.local_score_B, index, sc.texts["prompts"], sc.texts["responses"], gold)
        n_rows = len(index)
        ok = np.repeat(critic_free.group_has_variance(sc.local_score_B, group_size=group_size), group_size)
        kept.append(_subset(rows, np.flatnonzero(ok)))
        pool.append(_subset(rows, np.flatnonzero(~ok)))
        if sum(len(k[1]) for k in kept) >= n_rows:
            break
    tries, have = len(mets_all), sum(len(k[1]) for k in kept)
    parts = kept + pool
    merged = (rows_of.concat_rows([p[0] for p in parts]),) + tuple(
        np.concatenate([np.asarray(p[i], dtype=object if i >= 3 else None) for p in parts]) for i in (1, 2, 3, 4, 5))
    ro, score, index, prompts_t, resp_t, gold_t = _subset(merged, np.arange(n_rows))
    mets = {k: float(np.mean([m[k] for m in mets_all])) for k in mets_all[0]}
    mets.update({"dynamic_sampling/tries": float(tries),
                 "dynamic_sampling/filled_groups": float(max(0, n_rows - have) // group_size),
                 "dynamic_sampling/kept_fraction": have / (tries * n_rows)})
    texts = {"prompts": list(prompts_t), "responses": list(resp_t),
             "gold": None if gold_t[0] is None else [float(g) for g in gold_t]}
    score = score.astype(np.float32)
    return Groups(shd.shard_batch(ro, mesh), shd.shard_batch(score, mesh), score, index.astype(np.int64), texts,
                  mets)


def _subset(rows: tuple, idx: np.ndarray) -> tuple:
    return (rows_of.take_rows(rows[0], idx),) + tuple(np.asarray(r, dtype=object if i >= 2 else None)[idx]
                                                      for i, r in enumerate(rows[1:], start=1))


def build_programs(cfg: CriticFreeConfig, actor_model, mesh, *, actor_sh, ref_shardings, tx, eos_ids,
                   host_batch_size: int):
    """The jitted programs of one iteration after sampling: ``(evaluate, make_exp, update)`` (also lowered, with
    abstract arguments, by ``rlhf-jax plan``). ``host_batch_size``: this host's prompts per iteration."""
    h, T = cfg.algo, cfg.rollout.max_new_tokens
    r = h.resolve(T)
    algo = build_algorithm(h, r, max_new_tokens=T)
    temp = logprob_temperature(cfg.rollout.temperature)
    models = Models(actor=actor_model)
    share = h.share_prompt and prompt_sharing_allowed(
        batch_size=host_batch_size * h.group_size, group_size=h.group_size, num_minibatches=h.num_minibatches,
        num_micro_batches=h.num_micro_batches, batch_divisor=shd.local_batch_divisor(mesh))
    repeats = h.group_size if share else 1
    settings = UpdateSettings(epochs=h.epochs, num_minibatches=h.num_minibatches,
                              num_micro_batches=h.num_micro_batches, temperature=temp,
                              prompt_repeats=repeats if differentiable(cfg.model) else 1)
    rep, bsh = shd.replicated(mesh), shd.batch_sharding(mesh)
    dtypes = cfg.model.program_dtypes(cfg.frozen_dtype)  # for the XLA options: f32 compute, bf16 storage
    evaluate = shd.jit_sharded(functools.partial(evaluate_rollout, models, temperature=temp, old_logp=h.old_logp,
                                                 prompt_repeats=repeats), mesh,
                               in_shardings=(actor_sh.params, ref_shardings, None, bsh), out_shardings=bsh,
                               compiler_options=xla.compiler_options(**dtypes))

    def experience_fn(ro, ev, score_B, rm_score_B, baseline_B, kl_coef):
        if r.overlong_buffer:
            score_B = score_B + h.overlong_coef * critic_free.overlong_penalty(ro.lengths_B, max_length=T,
                                                                               cache_length=r.overlong_buffer)
        ev = ev._replace(values_BxT=jnp.where(ro.response_mask_BxT > 0, baseline_B[:, None], 0.0))
        exp, rewards_BxT = make_experience(algo, ro, ev, score_B, kl_coef)
        return exp, rollout_metrics(exp, rewards_BxT, rm_score_B, eos_ids=eos_ids, with_critic=False)

    make_exp = shd.jit_sharded(experience_fn, mesh, in_shardings=(bsh, bsh, bsh, bsh, bsh, rep),
                               out_shardings=(bsh, rep))
    update = shd.jit_sharded(make_update(algo, models, actor_tx=tx, critic_tx=None, settings=settings), mesh,
                             in_shardings=(actor_sh, None, bsh, None, rep, rep), out_shardings=(actor_sh, None, rep),
                             donate_argnums=(0,), compiler_options=xla.compiler_options(**dtypes,
                                                                                           gradient=True))
    return evaluate, make_exp, update


def train(cfg: CriticFreeConfig, *, stop_at_step: Optional[int] = None) -> dict:
    """Run the critic-free trainer; returns the metric history, final state and export path."""
    out = common.start_run(cfg, cfg.run)
    mesh = common.make_mesh(cfg.mesh)
    actor = common.load_model(cfg.model, mesh=mesh, head="lm")
    h, T = cfg.algo, cfg.rollout.max_new_tokens
    r = h.resolve(T)
    if r.dynamic_sampling and jax.process_count() > 1:  # hosts could draw different numbers of batches
        raise ValueError("algo.dynamic_sampling: supported on a single host only (set algo.dynamic_sampling=false)")
    # with LoRA the reference is the actor's base, adapters off: no copy (`state.params` below)
    ref_params = None if cfg.model.lora else frozen_copy(actor.params, actor.shardings, cfg.frozen_dtype)
    splits = prompt_splits(cfg.data, actor.tokenizer, common.host_batch_size(cfg.rollout.batch_size, mesh))
    prompts = splits.train
    sampler = Sampler(actor.model, actor.tokenizer, cfg.rollout, mesh)
    scorer = make_scorer(cfg.reward, model_cfg=cfg.model, actor=actor, mesh=mesh, dataset=prompts.data,
                         prompt_field=cfg.data.prompt_field, frozen_dtype=cfg.frozen_dtype)
    heldout = make_heldout(splits, sampler=sampler, scorer=scorer, reward=cfg.reward,
                           prompt_field=cfg.data.prompt_field, seed=cfg.run.seed)
    iters = common.total_steps_of(cfg.run, prompts.batches_per_epoch)
    tx = make_optimizer(cfg.actor_optim, iters * h.epochs * h.num_minibatches)
    actor_state, actor_sh = create_train_state(actor.params, tx, mesh=mesh, params_shardings=actor.shardings,
                                               ema_decay=h.ema_decay)
    evaluate, make_exp, update = build_programs(cfg, actor.model, mesh, actor_sh=actor_sh, ref_shardings=actor.shardings,
                                                tx=tx, eos_ids=sampler.eos_ids, host_batch_size=prompts.batch_size)
    base_key, kl_coef = jax.random.key(cfg.run.seed), jnp.float32(r.kl_coef)

    def step(it, state):
        """One iteration: sample G per prompt → score → (ReMax baseline) → experience → update."""
        timer = Timer()
        k_gen, k_upd, k_greedy = jax.random.split(jax.random.fold_in(base_key, it), 3)
        with timer("generate"):
            g = collect_groups(sampler, scorer, state.params, prompts, k_gen, group_size=h.group_size,
                               dynamic=r.dynamic_sampling, max_tries=h.max_sampling_tries, mesh=mesh)
            host_mets = dict(g.metrics)
            baseline = np.zeros_like(g.local_score_B)
            if h.algorithm == "remax":  # the greedy response's score of each prompt is its baseline
                local = shd.local_rows(g.rollout)
                uniq = PromptBatch(local.prompt_ids_BxP[:: h.group_size], local.prompt_mask_BxP[:: h.group_size],
                                   g.local_index_B[:: h.group_size])
                greedy = sampler(state.params, uniq, k_greedy, temperature=0.0)
                b = scorer(greedy, uniq.index_B).local_score_B
                baseline = np.repeat(b, h.group_size)
                host_mets["remax_baseline"] = float(np.mean(distributed.allgather_rows(b)))
        with timer("score"):
            ev = evaluate(state.params, state.params if ref_params is None else ref_params, None, g.rollout)
            zeros = shd.shard_batch(np.zeros_like(g.local_score_B), mesh)
            exp, roll_mets = make_exp(g.rollout, ev, g.score_B, zeros, shd.shard_batch(baseline, mesh), kl_coef)
            jax.block_until_ready(exp)
        with timer("train"):
            state, _, upd = update(state, None, exp, None, k_upd, kl_coef)
            mets = {**jax.device_get(roll_mets), **jax.device_get(upd)}
        values = {**{k: float(v) for k, v in mets.items()}, **host_mets, **timer.as_metrics(), "kl_coef": r.kl_coef,
                  "skipped_updates": float(state.num_skipped)}
        samples = sample_rows(g.texts, g.local_score_B, cfg.num_samples) if cfg.sample_every else None
        return state, values, samples

    loop = Loop(name=h.algorithm, run=cfg.run, output_dir=out, total=iters, step=step, data={"prompts": prompts},
                sample_every=cfg.sample_every, progress_keys=("score", "kl"), stop_at_step=stop_at_step,
                evaluate=None if heldout is None else (lambda s: policy_metrics(heldout, s)),
                export=lambda s: common.export_policy(actor, s, out))
    res = run_loop(loop, actor_state)
    result = {"output_dir": str(out), "iterations": len(res.history), "history": res.history, "state": res.state,
              "model": actor.model, "tokenizer": actor.tokenizer, "resolved": r._asdict()}
    if res.export_dir:
        result["export_dir"] = res.export_dir
    return result
