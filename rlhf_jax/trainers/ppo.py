"""PPO for RLHF (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022, with PPO-ptx).

Four param pytrees, each placed by its own sharding: the ACTOR (trainable, from the SFT export), the
CRITIC (trainable, scalar head, from the reward model or the actor), the frozen REFERENCE (a copy of the
initial actor) and the frozen REWARD MODEL; frozen ones are never in an optimizer and may be stored in
bf16. Python reward functions (``"package.module:function"``) may add to or replace the reward model.

One iteration: sample prompts → ``rollout.generate`` → score (RM + functions, normalise, clip, no-EOS
penalty) → actor/reference log-probs and critic values (one jit) → KL-shaped rewards → GAE → whitening
(one jit) → ``ppo.epochs`` × minibatches × micro-batches of clipped policy + value loss (+ entropy,
+ ptx) with separate actor/critic optimizers (one jit). Randomness is ``fold_in(seed, iteration)``, so a
resumed run is exactly the uninterrupted one. Everything jitted is built once; shapes never change
across iterations (prompts are padded to ``data.max_prompt_len``), so nothing recompiles.

Usage: ``rlhf-jax ppo configs/ppo_tiny_cpu.yaml model.path=runs/demo/sft/model reward.model_path=...``
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import distributed, ops, rewards
from rlhf_jax import sharding as shd
from rlhf_jax.checkpoint import Checkpointer, abstract_like, resolve_resume
from rlhf_jax.config import require
from rlhf_jax.run_config import OptimConfig, RunConfig
from rlhf_jax.data import DataConfig, build_data
from rlhf_jax.rollout import generate
from rlhf_jax.rollout.types import logprob_temperature
from rlhf_jax.train.metrics import MetricsLogger, Progress, Timer
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.state import create_train_state
from rlhf_jax.trainers import common, online, online_host, online_update
from rlhf_jax.trainers.ppo_algo import ppo_algorithm


#: Python-level traces of the jitted pieces (tests assert one per piece: no recompiles across iterations).
TRACE_COUNTS: collections.Counter = collections.Counter()


def _counted(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        TRACE_COUNTS[name] += 1
        return fn(*args, **kwargs)
    return wrapper


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling of responses."""

    batch_size: int = 16  # GLOBAL prompts per iteration (one response each)
    max_new_tokens: int = 16  # T, static response length
    temperature: float = 1.0  # τ (log-probs in the loss use logits / τ, as the sampler)
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_new_tokens: int = 0

    def __post_init__(self):
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(self.temperature > 0, "temperature", f"must be > 0 for PPO sampling, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class PPOHyper:
    """The PPO update (defaults: TRL PPO / ANCHORS.md)."""

    epochs: int = 4  # passes over each batch of experience
    num_minibatches: int = 1  # optimizer steps per epoch
    num_micro_batches: int = 1  # gradient accumulation within a minibatch
    clip_eps: float = 0.2  # ε_low of the policy ratio
    clip_eps_high: Optional[float] = None  # ε_high (DAPO clip-higher); null = clip_eps
    dual_clip: Optional[float] = None  # c > 1 for negative advantages; null = off
    value_clip_eps: float = 0.2  # ε_V
    vf_coef: float = 0.1  # value-loss weight
    entropy_coef: float = 0.0  # entropy bonus
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    loss_agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "constant"] = "token-mean"
    # π_old: the sampler's log-probs ("rollout", as TRL; saves one actor forward) or a teacher-forced
    # actor forward ("recompute", as OpenRLHF/verl; exact ratio 1 at the first step also in bf16)
    old_logp: Literal["rollout", "recompute"] = "rollout"
    # when the update is ONE optimizer step over the whole batch (epochs = minibatches = 1, any number of
    # micro-batches), take the critic's rollout values from the update's own critic forward (exact: the
    # critic has not moved yet) instead of a separate pass; false = always a separate pass
    fuse_critic_pass: bool = True

    def __post_init__(self):
        for k in ("epochs", "num_minibatches", "num_micro_batches"):
            require(getattr(self, k) >= 1, k, f"must be >= 1, got {getattr(self, k)}")
        require(self.dual_clip is None or self.dual_clip > 1, "dual_clip", f"must be > 1 or null, got {self.dual_clip}")


@dataclasses.dataclass(frozen=True)
class KLConfig:
    """KL regularisation towards the reference policy."""

    coef: float = 0.05  # β (initial β when adaptive)
    kind: Literal["k1", "k2", "k3"] = "k1"  # estimator (Schulman 2020)
    placement: Literal["reward", "loss"] = "reward"  # per-token reward (classic PPO) or loss term (GRPO style)
    importance_weighted: bool = False  # with placement=loss: weight kl by π_θ/π_old (unbiased off-policy)
    adaptive: bool = False  # Ziegler et al. 2019 proportional controller
    target: float = 6.0  # target sequence KL (adaptive)
    horizon: float = 10000.0  # controller horizon in samples (adaptive)


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Where the score comes from."""

    model_path: Optional[str] = None  # reward model export (scalar head); null = functions only
    model_weight: float = 1.0
    normalize: bool = True  # (r − mean) / std with the RM's stored statistics (rlhf_jax_reward_mean/std)
    functions: tuple[str, ...] = ()  # "package.module:function" or "file.py:function"
    weights: tuple[float, ...] = ()  # one per function; empty = 1 each
    clip: Optional[float] = None  # clip the final score to ±clip
    no_eos_penalty: Optional[float] = None  # subtract this from responses without EOS
    gold_function: Optional[str] = None  # reported only (e.g. "rlhf_jax.tasks:gold_score")

    def __post_init__(self):
        require(self.model_path is not None or len(self.functions) > 0, "model_path",
                "set a reward model path and/or reward.functions")


@dataclasses.dataclass(frozen=True)
class PtxConfig:
    """PPO-ptx: next-token loss on pretraining/SFT data mixed into the actor loss (InstructGPT)."""

    path: Optional[str] = None  # SFT-format data; null = off
    coef: float = 0.0  # γ_ptx
    batch_size: int = 8  # GLOBAL rows per minibatch step (divisible by ppo.num_micro_batches)
    max_seq_len: int = 128


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """A PPO run. `run.total_steps` counts PPO iterations."""

    model: common.ModelLoadConfig  # actor (SFT export); reference = copy of it
    data: DataConfig  # prompt rows (+ extra columns passed to reward functions)
    reward: RewardConfig = RewardConfig(functions=("rlhf_jax.tasks:gold_score",))
    critic_path: Optional[str] = None  # null = reward.model_path, else model.path (scalar head)
    frozen_dtype: Literal["float32", "bfloat16"] = "float32"  # storage dtype of reference and reward model
    rollout: RolloutConfig = RolloutConfig()
    ppo: PPOHyper = PPOHyper()
    kl: KLConfig = KLConfig()
    ptx: PtxConfig = PtxConfig()
    actor_optim: OptimConfig = OptimConfig(learning_rate=1e-5)
    critic_optim: OptimConfig = OptimConfig(learning_rate=1e-5)
    run: RunConfig = RunConfig(total_steps=100, log_every=1)
    mesh: shd.MeshConfig = shd.MeshConfig()
    sample_every: int = 0  # log a table of samples every N iterations; 0 = never
    num_samples: int = 4  # rows in each sample table

    def __post_init__(self):
        require(self.run.total_steps is not None, "run.total_steps", "PPO needs the number of iterations")
        per_mb = self.rollout.batch_size // self.ppo.num_minibatches
        require(self.rollout.batch_size % self.ppo.num_minibatches == 0 and per_mb % self.ppo.num_micro_batches == 0,
                "ppo.num_minibatches", f"rollout.batch_size={self.rollout.batch_size} must divide into "
                f"{self.ppo.num_minibatches} minibatches of {self.ppo.num_micro_batches} micro-batches")
        require(self.ptx.path is None or self.ptx.batch_size % self.ppo.num_micro_batches == 0, "ptx.batch_size",
                "must be divisible by ppo.num_micro_batches")


def _frozen(params, shardings, dtype: str):
    """A frozen copy in fresh buffers (never donated, never in an optimizer), floats cast to ``dtype``."""
    dt = jnp.dtype(dtype)
    cast = lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    return jax.jit(lambda p: jax.tree.map(cast, p), out_shardings=shardings)(params)


def _prompt_data(cfg: PPOConfig, tokenizer, host_bs: int):
    # one static prompt width: every iteration reuses the same compiled programs
    data_cfg = dataclasses.replace(cfg.data, format="prompt" if cfg.data.format == "auto" else cfg.data.format,
                                   buckets=(cfg.data.max_prompt_len,))
    return build_data(data_cfg, tokenizer, task="prompt", batch_size=host_bs,
                      process_index=jax.process_index(), process_count=jax.process_count()).train


def _ptx_data(cfg: PPOConfig, tokenizer, mesh):
    if cfg.ptx.path is None or cfg.ptx.coef == 0:
        return None
    d = DataConfig(path=cfg.ptx.path, max_seq_len=cfg.ptx.max_seq_len, max_prompt_len=cfg.ptx.max_seq_len // 2,
                   buckets=(cfg.ptx.max_seq_len,), shuffle_seed=cfg.run.seed)
    rows = common.host_batch_size(cfg.ptx.batch_size * cfg.ppo.num_minibatches, mesh)
    return build_data(d, tokenizer, task="sft", batch_size=rows, process_index=jax.process_index(),
                      process_count=jax.process_count()).train


def train(cfg: PPOConfig, *, stop_at_step: Optional[int] = None) -> dict:
    """Run PPO; returns the last metrics (before/after gold score when a gold function is set) and paths."""
    out = common.start_run(cfg, cfg.run)
    mesh = common.make_mesh(cfg.mesh)
    actor = common.load_model(cfg.model, mesh=mesh, head="lm")
    tok = actor.tokenizer
    eos_ids = tuple(np.atleast_1d(actor.model.config.eos_token_id or tok.eos_token_id).tolist())
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
    ref_params = _frozen(actor.params, actor.shardings, cfg.frozen_dtype)
    rm = None
    if cfg.reward.model_path is not None:
        rm = common.load_model(dataclasses.replace(cfg.model, path=cfg.reward.model_path, tokenizer_path=None),
                               mesh=mesh, head="scalar", rules=shd.INFERENCE_RULES)
        rm.params = _frozen(rm.params, rm.shardings, cfg.frozen_dtype)
    critic_path = cfg.critic_path or cfg.reward.model_path or cfg.model.path
    critic = common.load_model(dataclasses.replace(cfg.model, path=critic_path, tokenizer_path=None), mesh=mesh,
                               head="scalar")
    models = online.Models(actor=actor.model, critic=critic.model, reward=rm.model if rm else None)

    host_bs = common.host_batch_size(cfg.rollout.batch_size, mesh)
    prompts = _prompt_data(cfg, tok, host_bs)
    ptx_iter = _ptx_data(cfg, tok, mesh)
    iters = cfg.run.total_steps
    steps = iters * cfg.ppo.epochs * cfg.ppo.num_minibatches
    actor_tx, critic_tx = make_optimizer(cfg.actor_optim, steps), make_optimizer(cfg.critic_optim, steps)
    actor_state, actor_sh = create_train_state(actor.params, actor_tx, mesh=mesh, params_shardings=actor.shardings)
    critic_state, critic_sh = create_train_state(critic.params, critic_tx, mesh=mesh,
                                                 params_shardings=critic.shardings)
    kl_state = ops.adaptive_kl_init(cfg.kl.coef)

    h, temp = cfg.ppo, logprob_temperature(cfg.rollout.temperature)
    algo = ppo_algorithm(gamma=h.gamma, lam=h.lam, whiten_advantages=h.whiten_advantages, kl_kind=cfg.kl.kind,
                         kl_placement=cfg.kl.placement, kl_importance_weighted=cfg.kl.importance_weighted,
                         clip_eps=h.clip_eps, clip_eps_high=h.clip_eps_high, dual_clip=h.dual_clip,
                         value_clip_eps=h.value_clip_eps, vf_coef=h.vf_coef, entropy_coef=h.entropy_coef,
                         loss_agg_mode=h.loss_agg_mode, agg_constant=float(cfg.rollout.max_new_tokens))
    fused = h.fuse_critic_pass and online.fused_values_allowed(epochs=h.epochs, num_minibatches=h.num_minibatches)
    settings = online.UpdateSettings(epochs=h.epochs, num_minibatches=h.num_minibatches,
                                     num_micro_batches=h.num_micro_batches, temperature=temp,
                                     ptx_coef=cfg.ptx.coef if ptx_iter is not None else 0.0, fused_values=fused)
    rm_mean, rm_std = 0.0, 1.0
    if rm is not None and cfg.reward.normalize:
        from rlhf_jax.trainers.rm import load_reward_stats
        rm_mean, rm_std = load_reward_stats(cfg.reward.model_path)
    score_settings = online_host.ScoreSettings(
        rm_weight=cfg.reward.model_weight, rm_mean=rm_mean, rm_std=rm_std, normalize=cfg.reward.normalize,
        clip=cfg.reward.clip, no_eos_penalty=cfg.reward.no_eos_penalty, eos_ids=eos_ids, has_reward_model=rm is not None)

    rep, bsh = shd.replicated(mesh), shd.batch_sharding(mesh)
    rm_sh = rm.shardings if rm else None
    evaluate = shd.jit_sharded(_counted("evaluate", functools.partial(online.evaluate_rollout, models,
                                                                       temperature=temp, old_logp=h.old_logp,
                                                                       with_values=not fused)), mesh,
                               in_shardings=(actor_sh.params, actor.shardings, critic_sh.params, rm_sh, bsh),
                               out_shardings=bsh)

    def experience_fn(rollout, ev, fn_score, kl_coef):
        score = online_host.final_scores(ev, fn_score, rollout.response_ids_BxT, rollout.response_mask_BxT,
                                         settings=score_settings)
        exp, rewards_bxt = online.make_experience(algo, rollout, ev, score, kl_coef)
        return exp, online_host.rollout_metrics(exp, rewards_bxt, ev, eos_ids=eos_ids)

    make_exp = shd.jit_sharded(_counted("experience", experience_fn), mesh, in_shardings=(bsh, bsh, bsh, rep), out_shardings=(bsh, rep))
    update = shd.jit_sharded(
        _counted("update", online_update.make_update(algo, models, actor_tx=actor_tx, critic_tx=critic_tx,
                                              settings=settings)), mesh,
        in_shardings=(actor_sh, critic_sh, bsh, bsh if ptx_iter is not None else None, rep, rep),
        out_shardings=(actor_sh, critic_sh, rep), donate_argnums=(0, 1),
        compiler_options=shd.gradient_compiler_options())
    scorer = online_host.Scorer(
        tok, rewards.WeightedRewards.from_specs(cfg.reward.functions, cfg.reward.weights or None),
        gold=rewards.load_function(cfg.reward.gold_function) if cfg.reward.gold_function else None,
        dataset=prompts.data, prompt_field=cfg.data.prompt_field)

    # ---- resume -----------------------------------------------------------------------------------
    ckpt = Checkpointer(out / "checkpoints", keep_last_n=cfg.run.keep_last_n)
    state = {"actor": actor_state, "critic": critic_state, "kl": kl_state}
    start = 0
    found = resolve_resume(cfg.run.resume, ckpt.directory)
    if found is not None:
        source = ckpt if found[0] == ckpt.directory else Checkpointer(found[0], read_only=True)
        state, meta = source.restore(found[1], target=abstract_like(state))
        prompts.restore(meta["data"])
        if ptx_iter is not None:
            ptx_iter.restore(meta["ptx_data"])
        start = int(meta["iteration"])
        print(f"[rlhf_jax] PPO resumed from {found[0]}/{found[1]} (iteration {start})", flush=True)
    common.truncate_metrics(out / "metrics.jsonl", after_step=start)
    main = distributed.is_main_process()
    logger = MetricsLogger(out, tensorboard=cfg.run.tensorboard, wandb=cfg.run.wandb,
                           wandb_project=cfg.run.wandb_project, is_main=main)
    progress = Progress(iters, desc="ppo", enabled=cfg.run.progress, is_main=main, initial=start)
    base_key = jax.random.key(cfg.run.seed)
    last = min(iters, stop_at_step or iters)
    history: list[dict] = []
    try:
        for it in range(start, last):
            timer, t_iter = Timer(), time.perf_counter()
            k_gen, k_upd = jax.random.split(jax.random.fold_in(base_key, it))
            with timer("generate"):
                host_batch = next(prompts)
                batch = shd.shard_batch(host_batch, mesh)
                with shd.mesh_context(mesh):
                    ro = generate(actor.model, state["actor"].params, batch.prompt_ids_BxP, batch.prompt_mask_BxP,
                                  key=k_gen, max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                                  top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p, eos_token_id=eos_ids,
                                  pad_token_id=pad_id, min_new_tokens=cfg.rollout.min_new_tokens)
                jax.block_until_ready(ro)
            with timer("score"):
                ev = evaluate(state["actor"].params, ref_params, state["critic"].params, rm.params if rm else None, ro)
                fn_score, host_mets, texts = scorer(ro, host_batch.index_B)
                exp, roll_mets = make_exp(ro, ev, shd.shard_batch(fn_score, mesh), state["kl"].kl_coef)
                jax.block_until_ready(exp)
            with timer("train"):
                ptx = shd.shard_batch(next(ptx_iter), mesh) if ptx_iter is not None else None
                a, c, upd_mets = update(state["actor"], state["critic"], exp, ptx, k_upd, state["kl"].kl_coef)
                mets = {**jax.device_get(roll_mets), **jax.device_get(upd_mets)}
            kl_now = state["kl"].kl_coef
            new_kl = (ops.adaptive_kl_update(state["kl"], current_kl=mets["kl"], n_steps=cfg.rollout.batch_size,
                                             target=cfg.kl.target, horizon=cfg.kl.horizon)
                      if cfg.kl.adaptive else state["kl"])
            state = {"actor": a, "critic": c, "kl": new_kl}
            done = it + 1
            t = timer.as_metrics()
            tokens = float(mets["response_length"]) * cfg.rollout.batch_size
            values = {**{k: float(v) for k, v in mets.items()}, **host_mets, **t, "kl_coef": float(kl_now),
                      "tokens_per_s": tokens / max(sum(timer.totals.values()), 1e-9),
                      "skipped_updates": float(a.num_skipped)}
            if values["finite"] < 1 and cfg.run.nan_policy == "stop":
                raise RuntimeError(f"non-finite PPO loss/gradient at iteration {done}; the update was skipped")
            values["time/iteration"] = time.perf_counter() - t_iter
            history.append(values)
            progress.update(1, score=values["score"], kl=values["kl"])
            if done % cfg.run.log_every == 0 or done == last:
                logger.log(done, values)
            if cfg.sample_every and (done % cfg.sample_every == 0 or it == start):
                logger.log_table(done, online_host.sample_rows(texts, np.asarray(exp.score_B), cfg.num_samples))
            if done == last or (cfg.run.save_every and done % cfg.run.save_every == 0):
                meta = {"data": prompts.state(), "iteration": done}
                if ptx_iter is not None:
                    meta["ptx_data"] = ptx_iter.state()
                ckpt.save(done, state, meta=meta, metrics={k: values[k] for k in ("score", "kl")})
    finally:
        progress.close()
        logger.close()
        ckpt.close()
    result = {"output_dir": str(out), "iterations": last, "history": history,
              "state": state, "models": models, "ref_params": ref_params}
    if last == iters:
        result["export_dir"] = str(common.export_model(actor, state["actor"].params, out / "model"))
    return result


def before_after(history: list[dict], *, window: int = 5) -> dict:
    """Mean of the first vs the last ``window`` iterations (samples drawn from the policy at that time)."""
    keys = [k for k in ("gold_score", "score", "rm_score", "kl", "response_length", "eos_rate") if k in history[0]]
    w = max(1, min(window, len(history) // 2))
    mean = lambda rows, k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    return {k: {"before": mean(history[:w], k), "after": mean(history[-w:], k)} for k in keys} | {"window": w}


def format_before_after(table: dict) -> str:
    """A small text table of :func:`before_after`."""
    w = table["window"]
    lines = [f"PPO: sampled responses, first {w} vs last {w} iterations", f"{'metric':<16}{'before':>10}{'after':>10}"]
    lines += [f"{k:<16}{v['before']:>10.3f}{v['after']:>10.3f}" for k, v in table.items() if k != "window"]
    return "\n".join(lines)
