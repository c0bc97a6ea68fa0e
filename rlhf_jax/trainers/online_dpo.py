"""Online DPO: preference pairs from the policy's own samples, ranked by a reward model or reward functions.

    for each iteration:  y_1..y_n ~ π_θ(·|x)  →  r(x, y_i)  →  pair (best, worst) of each prompt
                         →  ``updates_per_iteration`` DPO steps on the pairs vs the frozen initial policy

(Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; Xu et al. 2023, "Some things
are more CRINGE than others", pairwise self-play; TRL ``OnlineDPOTrainer``.) Prompts whose n scores are all
equal give no pair: their loss masks are zeroed and the DPO loss counts only real pairs. Scoring is
``group_rollout.Sampler`` (as GRPO); the loss is the offline trainer's (``dpo.make_loss_fn``: every DPO
loss type, SimPO, ORPO) in the shared jitted step, with reference log-probs from
``preference_common.make_ref_attacher``.

Usage: ``rlhf-jax online_dpo configs/online_dpo_tiny_cpu.yaml model.path=runs/demo/sft/model``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import jax
import numpy as np

from rlhf_jax import sharding as shd
from rlhf_jax.config import require
from rlhf_jax.run_config import OptimConfig, RunConfig
from rlhf_jax.data import DataConfig
from rlhf_jax.train.metrics import Timer
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.state import create_train_state
from rlhf_jax.train.step import make_train_step
from rlhf_jax.trainers import common, online_host
from rlhf_jax.trainers import group_rollout as gr
from rlhf_jax.trainers import preference_common as pc
from rlhf_jax.trainers.dpo import PreferenceLossConfig, make_loss_fn, preference_metrics
from rlhf_jax.trainers.ppo import RewardConfig, RolloutConfig


@dataclasses.dataclass(frozen=True)
class OnlineDPOHyper:
    """Pair construction and updates of one iteration."""

    num_samples: int = 4  # n responses per prompt; the pair is (best, worst)
    updates_per_iteration: int = 1  # DPO optimizer steps on each iteration's pairs
    num_micro_batches: int = 1

    def __post_init__(self):
        require(self.num_samples >= 2, "online.num_samples", f"must be >= 2, got {self.num_samples}")
        require(self.updates_per_iteration >= 1, "online.updates_per_iteration", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class OnlineDPOConfig:
    """An online DPO run; ``run.total_steps`` counts iterations."""

    model: common.ModelLoadConfig  # policy init; the reference is a frozen copy (or ref_model_path)
    data: DataConfig  # prompt rows
    reward: RewardConfig = RewardConfig(functions=("rlhf_jax.tasks:gold_score",))
    loss: PreferenceLossConfig = PreferenceLossConfig()
    online: OnlineDPOHyper = OnlineDPOHyper()
    rollout: RolloutConfig = RolloutConfig(batch_size=8)  # batch_size = PROMPTS (pairs) per iteration
    ref_dtype: Literal["float32", "bfloat16"] = "float32"
    optim: OptimConfig = OptimConfig(learning_rate=1e-6)
    run: RunConfig = RunConfig(total_steps=20, log_every=1)
    mesh: shd.MeshConfig = shd.MeshConfig()
    sample_every: int = 0
    num_samples: int = 4

    def __post_init__(self):
        require(self.run.total_steps is not None, "run.total_steps", "needs the number of iterations")
        require(self.loss.algorithm in ("dpo", "simpo", "orpo"), "loss.algorithm",
                f"online pairs need a pairwise loss (dpo, simpo, orpo), got {self.loss.algorithm}")
        require(self.rollout.batch_size % self.online.num_micro_batches == 0, "online.num_micro_batches",
                "must divide rollout.batch_size")


def train(cfg: OnlineDPOConfig, *, stop_at_step: Optional[int] = None) -> dict:
    """Run online DPO; returns the metric history, final state and export path."""
    out = common.start_run(cfg, cfg.run)
    mesh = common.make_mesh(cfg.mesh)
    actor = common.load_model(cfg.model, mesh=mesh, head="lm")
    h = cfg.online
    ref_params = gr.frozen_copy(actor.params, cfg.ref_dtype)
    prompts = gr.prompt_data(cfg.data, actor.tokenizer, common.host_batch_size(cfg.rollout.batch_size, mesh))
    sampler = gr.make_sampler(cfg.model, cfg.reward, cfg.rollout, cfg.data, actor, mesh, prompts.data)
    iters = cfg.run.total_steps
    tx = make_optimizer(cfg.optim, iters * h.updates_per_iteration)
    state, state_sh = create_train_state(actor.params, tx, mesh=mesh, params_shardings=actor.shardings)
    width = cfg.rollout.max_new_tokens  # a pair's completions are sampled responses: the head scores those only
    dpo_step = make_train_step(make_loss_fn(actor.model, cfg.loss, completion_width=width), tx=tx,
                               num_micro_batches=h.num_micro_batches, mesh=mesh, state_shardings=state_sh)
    attach = pc.make_ref_attacher(actor.model, mesh=mesh, params_shardings=actor.shardings,
                                  num_chunks=h.num_micro_batches, completion_width=width)
    base_key = jax.random.key(cfg.run.seed)

    def step(it, state):
        timer = Timer()
        k_gen, k_upd = jax.random.split(jax.random.fold_in(base_key, it))
        with timer("generate"):
            ro, score, mets, texts = sampler(state.params, next(prompts), k_gen, repeats=h.num_samples)
        best, worst, valid = gr.best_worst(score, group_size=h.num_samples)
        pairs = gr.rollout_pair_batch(ro, best, worst, valid)
        zeros = np.zeros(len(best), np.float32)
        with timer("train"):
            pb = shd.shard_batch(pc.PairBatch(pairs, zeros, zeros), mesh)
            if cfg.loss.needs_reference:
                pb = attach(ref_params, pb)
            for _ in range(h.updates_per_iteration):
                state, m = dpo_step(state, pb, k_upd)
            m = jax.device_get(m)
        pref = preference_metrics(float(m.loss) * float(m.aux.pairs), m.aux, kto=False)
        values = {"score": float(np.mean(score)), "score_std": float(np.std(score)),
                  "pair_margin": float(np.mean((score[best] - score[worst])[valid])) if valid.any() else 0.0,
                  "valid_pairs": float(valid.sum()), **mets, **common.base_metrics(m), **pref,
                  "finite": float(m.finite), **timer.as_metrics()}
        return state, values, online_host.sample_rows(texts, score, cfg.num_samples)

    state, history = gr.run_iterations("online_dpo", run=cfg.run, output_dir=out, state=state, prompts=prompts,
                                       step=step, iterations=iters, sample_every=cfg.sample_every,
                                       stop_at_step=stop_at_step, progress_keys=("score", "loss"))
    result = {"output_dir": str(out), "iterations": len(history), "history": history, "state": state,
              "model": actor.model, "tokenizer": actor.tokenizer}
    if stop_at_step is None or stop_at_step >= iters:
        result["export_dir"] = str(common.export_model(actor, state.params, out / "model"))
    return result
