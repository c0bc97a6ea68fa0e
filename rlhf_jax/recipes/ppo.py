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

import dataclasses
import functools
import time
from typing import Literal, Optional

import jax
import numpy as np

from rlhf_jax import ops
from rlhf_jax import sharding as shd
from rlhf_jax.runtime import xla
from rlhf_jax.algos.base import PolicyLossHparams
from rlhf_jax.algos.ppo import ppo_algorithm
from rlhf_jax.config import require
from rlhf_jax.data import DataConfig, build_data
from rlhf_jax.models import lora
from rlhf_jax.online.config import RewardConfig, RolloutConfig, online_eval_checks
from rlhf_jax.online.experience import (Models, UpdateSettings, evaluate_rollout, fused_values_allowed,
                                        make_experience, rollout_metrics)
from rlhf_jax.online.sampler import Sampler, frozen_copy, prompt_splits
from rlhf_jax.online.heldout import make_heldout, policy_metrics
from rlhf_jax.online.scoring import make_scorer, sample_rows
from rlhf_jax.online.update import make_update
from rlhf_jax.rollout.types import logprob_temperature
from rlhf_jax.run_config import OptimConfig, RunConfig
from rlhf_jax.train import run as common
from rlhf_jax.train.loop import Loop, run_loop
from rlhf_jax.train.metrics import Timer
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.state import create_train_state


@dataclasses.dataclass(frozen=True)
class PPOHyper:
    """The PPO update (defaults as TRL ``PPOTrainer``)."""

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
    # EMA of the actor (DeepSpeed-Chat --enable_ema, 0.992 there): kept in the actor's train state, updated after
    # every optimizer step, exported to <output_dir>/model_ema; null = off
    ema_decay: Optional[float] = None
    # with model.lora: the critic is its own adapters + value head on the ACTOR's frozen base (one base in memory;
    # critic_path must be null); false = the critic loads its own base (critic_path / reward.model_path / model.path)
    critic_shares_base: bool = False

    def __post_init__(self):
        for k in ("epochs", "num_minibatches", "num_micro_batches"):
            require(getattr(self, k) >= 1, k, f"must be >= 1, got {getattr(self, k)}")
        require(self.dual_clip is None or self.dual_clip > 1, "dual_clip", f"must be > 1 or null, got {self.dual_clip}")
        require(self.ema_decay is None or 0 < self.ema_decay < 1, "ema_decay",
                f"must be in (0, 1) or null, got {self.ema_decay}")

    def loss_hparams(self, kl: "KLConfig", *, max_new_tokens: int) -> PolicyLossHparams:
        """The loss's hyperparameter record (the "constant" aggregation divides by the generation budget)."""
        return PolicyLossHparams(
            clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high, dual_clip=self.dual_clip,
            entropy_coef=self.entropy_coef, loss_agg_mode=self.loss_agg_mode, agg_constant=float(max_new_tokens),
            kl_kind=kl.kind, kl_placement=kl.placement, kl_importance_weighted=kl.importance_weighted,
            value_clip_eps=self.value_clip_eps, vf_coef=self.vf_coef)


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
        online_eval_checks(self.run, self.data, self.reward, ema=self.ppo.ema_decay is not None)
        per_mb = self.rollout.batch_size // self.ppo.num_minibatches
        require(self.rollout.batch_size % self.ppo.num_minibatches == 0 and per_mb % self.ppo.num_micro_batches == 0,
                "ppo.num_minibatches", f"rollout.batch_size={self.rollout.batch_size} must divide into "
                f"{self.ppo.num_minibatches} minibatches of {self.ppo.num_micro_batches} micro-batches")
        require(self.ptx.path is None or self.ptx.batch_size % self.ppo.num_micro_batches == 0, "ptx.batch_size",
                "must be divisible by ppo.num_micro_batches")


def _ptx_data(cfg: PPOConfig, tokenizer, mesh):
    if cfg.ptx.path is None or cfg.ptx.coef == 0:
        return None
    d = DataConfig(path=cfg.ptx.path, max_seq_len=cfg.ptx.max_seq_len, max_prompt_len=cfg.ptx.max_seq_len // 2,
                   buckets=(cfg.ptx.max_seq_len,), shuffle_seed=cfg.run.seed)
    rows = common.host_batch_size(cfg.ptx.batch_size * cfg.ppo.num_minibatches, mesh)
    return build_data(d, tokenizer, task="sft", batch_size=rows, process_index=jax.process_index(),
                      process_count=jax.process_count()).train


def build_programs(cfg: PPOConfig, models: Models, mesh, *, actor_sh, critic_sh, ref_shardings, actor_tx, critic_tx,
                   eos_ids, with_ptx: bool):
    """The jitted programs of one PPO iteration after sampling: ``(evaluate, make_exp, update)`` (also lowered,
    with abstract arguments, by ``rlhf-jax plan``)."""
    h, temp = cfg.ppo, logprob_temperature(cfg.rollout.temperature)
    algo = ppo_algorithm(h.loss_hparams(cfg.kl, max_new_tokens=cfg.rollout.max_new_tokens), gamma=h.gamma,
                         lam=h.lam, whiten_advantages=h.whiten_advantages)
    fused = h.fuse_critic_pass and fused_values_allowed(epochs=h.epochs, num_minibatches=h.num_minibatches)
    settings = UpdateSettings(epochs=h.epochs, num_minibatches=h.num_minibatches,
                              num_micro_batches=h.num_micro_batches, temperature=temp,
                              ptx_coef=cfg.ptx.coef if with_ptx else 0.0, fused_values=fused)

    rep, bsh = shd.replicated(mesh), shd.batch_sharding(mesh)
    dtypes = cfg.model.program_dtypes(cfg.frozen_dtype)  # for the XLA options: f32 compute, bf16 storage
    evaluate = shd.jit_sharded(functools.partial(evaluate_rollout, models, temperature=temp, old_logp=h.old_logp,
                                                 with_values=not fused), mesh,
                               in_shardings=(actor_sh.params, ref_shardings, critic_sh.params, bsh),
                               out_shardings=bsh,
                               compiler_options=xla.compiler_options(**dtypes))

    def experience_fn(rollout, ev, score_B, rm_score_B, kl_coef):
        exp, rewards_BxT = make_experience(algo, rollout, ev, score_B, kl_coef)
        return exp, rollout_metrics(exp, rewards_BxT, rm_score_B, eos_ids=eos_ids)

    make_exp = shd.jit_sharded(experience_fn, mesh, in_shardings=(bsh, bsh, bsh, bsh, rep), out_shardings=(bsh, rep))
    update = shd.jit_sharded(
        make_update(algo, models, actor_tx=actor_tx, critic_tx=critic_tx, settings=settings), mesh,
        in_shardings=(actor_sh, critic_sh, bsh, bsh if with_ptx else None, rep, rep),
        out_shardings=(actor_sh, critic_sh, rep), donate_argnums=(0, 1),
        compiler_options=xla.compiler_options(**dtypes, gradient=True))
    return evaluate, make_exp, update


def train(cfg: PPOConfig, *, stop_at_step: Optional[int] = None, evaluate_initial: bool = False) -> dict:
    """Run PPO; returns the metric history, the final state, the models, the export path and the last held-out
    evaluation (``eval``); ``evaluate_initial``: also the held-out evaluation of the initial actor
    (``eval_initial``, before any update; the demo's "before")."""
    out = common.start_run(cfg, cfg.run)
    mesh = common.make_mesh(cfg.mesh)
    actor = common.load_model(cfg.model, mesh=mesh, head="lm")
    # with LoRA the reference is the actor's base, adapters off: no copy (`state['actor'].params` below)
    ref_params = None if cfg.model.lora else frozen_copy(actor.params, actor.shardings, cfg.frozen_dtype)
    critic_path = cfg.critic_path or cfg.reward.model_path or cfg.model.path
    if cfg.ppo.critic_shares_base:  # the critic keeps its adapters and value head; its trunk is the actor's base
        require(cfg.model.lora is not None and cfg.critic_path is None, "ppo.critic_shares_base",
                "needs model.lora and critic_path: null (the critic's trunk is the actor's base)")
        critic_path = cfg.model.path
    critic = common.load_model(dataclasses.replace(cfg.model, path=critic_path, tokenizer_path=None), mesh=mesh,
                               head="scalar")
    if cfg.ppo.critic_shares_base:
        critic = dataclasses.replace(critic, params=lora.trainable(critic.params),
                                     shardings=lora.trainable(critic.shardings))
    models = Models(actor=actor.model, critic=critic.model, critic_shares_base=cfg.ppo.critic_shares_base)
    splits = prompt_splits(cfg.data, actor.tokenizer, common.host_batch_size(cfg.rollout.batch_size, mesh))
    prompts = splits.train
    ptx_iter = _ptx_data(cfg, actor.tokenizer, mesh)
    sampler = Sampler(actor.model, actor.tokenizer, cfg.rollout, mesh)
    scorer = make_scorer(cfg.reward, model_cfg=cfg.model, actor=actor, mesh=mesh, dataset=prompts.data,
                         prompt_field=cfg.data.prompt_field, frozen_dtype=cfg.frozen_dtype)
    heldout = make_heldout(splits, sampler=sampler, scorer=scorer, reward=cfg.reward,
                           prompt_field=cfg.data.prompt_field, seed=cfg.run.seed)

    iters = common.total_steps_of(cfg.run, prompts.batches_per_epoch)
    h = cfg.ppo
    steps = iters * h.epochs * h.num_minibatches
    actor_tx, critic_tx = make_optimizer(cfg.actor_optim, steps), make_optimizer(cfg.critic_optim, steps)
    actor_state, actor_sh = create_train_state(actor.params, actor_tx, mesh=mesh, params_shardings=actor.shardings,
                                               ema_decay=h.ema_decay)
    critic_state, critic_sh = create_train_state(critic.params, critic_tx, mesh=mesh,
                                                 params_shardings=critic.shardings)
    evaluate, make_exp, update = build_programs(cfg, models, mesh, actor_sh=actor_sh, critic_sh=critic_sh,
                                                ref_shardings=actor.shardings, actor_tx=actor_tx,
                                                critic_tx=critic_tx, eos_ids=sampler.eos_ids,
                                                with_ptx=ptx_iter is not None)
    base_key = jax.random.key(cfg.run.seed)

    def step(it: int, state: dict):
        """One iteration: sample → score → experience → update → KL controller."""
        timer, t_iter = Timer(), time.perf_counter()
        k_gen, k_upd = jax.random.split(jax.random.fold_in(base_key, it))
        with timer("generate"):
            host_batch = next(prompts)
            ro = sampler(state["actor"].params, host_batch, k_gen)
        with timer("score"):
            ref = state["actor"].params if ref_params is None else ref_params
            ev = evaluate(state["actor"].params, ref, state["critic"].params, ro)
            sc = scorer(ro, host_batch.index_B)
            exp, roll_mets = make_exp(ro, ev, sc.score_B, sc.rm_score_B, state["kl"].kl_coef)
            jax.block_until_ready(exp)
        with timer("train"):
            ptx = shd.shard_batch(next(ptx_iter), mesh) if ptx_iter is not None else None
            a, c, upd_mets = update(state["actor"], state["critic"], exp, ptx, k_upd, state["kl"].kl_coef)
            mets = {**jax.device_get(roll_mets), **jax.device_get(upd_mets)}
        kl_now = state["kl"].kl_coef
        new_kl = (ops.adaptive_kl_update(state["kl"], current_kl=mets["kl"], n_steps=cfg.rollout.batch_size,
                                         target=cfg.kl.target, horizon=cfg.kl.horizon)
                  if cfg.kl.adaptive else state["kl"])
        tokens = float(mets["response_length"]) * cfg.rollout.batch_size
        values = {**{k: float(v) for k, v in mets.items()}, **sc.metrics, **timer.as_metrics(),
                  "kl_coef": float(kl_now), "tokens_per_s": tokens / max(sum(timer.totals.values()), 1e-9),
                  "skipped_updates": float(a.num_skipped), "time/iteration": time.perf_counter() - t_iter}
        samples = sample_rows(sc.texts, sc.local_score_B, cfg.num_samples) if cfg.sample_every else None
        return {"actor": a, "critic": c, "kl": new_kl}, values, samples

    data = {"prompts": prompts} if ptx_iter is None else {"prompts": prompts, "ptx": ptx_iter}
    loop = Loop(name="ppo", run=cfg.run, output_dir=out, total=iters, step=step, data=data,
                sample_every=cfg.sample_every, progress_keys=("score", "kl"), stop_at_step=stop_at_step,
                evaluate=None if heldout is None else (lambda s: policy_metrics(heldout, s["actor"])),
                export=lambda s: common.export_policy(actor, s["actor"], out))
    state = {"actor": actor_state, "critic": critic_state, "kl": ops.adaptive_kl_init(cfg.kl.coef)}
    initial = heldout(actor_state.params) if evaluate_initial and heldout is not None else None
    res = run_loop(loop, state)
    result = {"output_dir": str(out), "iterations": res.steps, "history": res.history, "state": res.state,
              "models": models, "ref_params": ref_params,
              "eval": {k[len("eval/"):]: v for k, v in res.latest.items() if k.startswith("eval/")}}
    if initial is not None:
        result["eval_initial"] = initial
    if res.export_dir:
        result["export_dir"] = res.export_dir
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
