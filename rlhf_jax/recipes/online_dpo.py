"""Online DPO: preference pairs from the policy's own samples, ranked by a reward model or reward functions.

    for each iteration:  y_1..y_n ~ π_θ(·|x)  →  r(x, y_i)  →  pair (best, worst) of each prompt
                         →  ``updates_per_iteration`` DPO steps on the pairs vs the frozen initial policy

(Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; Xu et al. 2023, "Some things
are more CRINGE than others", pairwise self-play; TRL ``OnlineDPOTrainer``.) Prompts whose n scores are all
equal give no pair: their loss masks are zeroed and the DPO loss counts only real pairs
(``pairs/tied_fraction``). Ties for the best go to a non-empty response and ties for the worst to an empty one
(``online.batches.best_worst``): an empty response is chosen only when it strictly outscores the group's
non-empty ones (``pairs/empty_chosen``). Scoring is
``online.scoring.RewardScorer`` (as GRPO); the loss is the offline recipe's
(``algos.preference.make_loss_fn``: every DPO loss type, SimPO, ORPO) in the shared jitted step, with
reference log-probs from ``train.reference.make_ref_attacher``.

Usage: ``rlhf-jax online_dpo configs/online_dpo_tiny_cpu.yaml model.path=runs/demo/sft/model``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import jax
import numpy as np

from rlhf_jax.runtime import distributed, xla
from rlhf_jax import sharding as shd
from rlhf_jax.algos.preference import PreferenceLossConfig, make_loss_fn, preference_metrics
from rlhf_jax.algos.preference_rows import ROLLOUT_ROWS, PairBatch
from rlhf_jax.config import require
from rlhf_jax.data import DataConfig
from rlhf_jax.models.shared_prompt import differentiable
from rlhf_jax.online import batches as rows_of
from rlhf_jax.online.config import RewardConfig, RolloutConfig, online_eval_checks
from rlhf_jax.online.sampler import Sampler, frozen_copy, prompt_splits
from rlhf_jax.online.heldout import make_heldout
from rlhf_jax.online.scoring import make_scorer, sample_rows
from rlhf_jax.run_config import OptimConfig, RunConfig
from rlhf_jax.train import reference as pc
from rlhf_jax.train import run as common
from rlhf_jax.train.loop import Loop, run_loop
from rlhf_jax.train.metrics import Timer
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.state import create_train_state
from rlhf_jax.train.step import make_train_step


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
    share_prompt: bool = True  # a pair's two responses run on its prompt's KV, encoded once, where W <= P (same values)

    def __post_init__(self):
        online_eval_checks(self.run, self.data, self.reward)
        require(self.loss.algorithm in ("dpo", "simpo", "orpo"), "loss.algorithm",
                f"online pairs need a pairwise loss (dpo, simpo, orpo), got {self.loss.algorithm}")
        require(self.rollout.batch_size % self.online.num_micro_batches == 0, "online.num_micro_batches",
                "must divide rollout.batch_size")


def build_programs(cfg: OnlineDPOConfig, model, mesh, *, tx, state_sh, ref_shardings):
    """The jitted ``(dpo_step, attach)`` on each iteration's pairs (also lowered, with abstract arguments, by
    ``rlhf-jax plan``)."""
    h = cfg.online
    width = cfg.rollout.max_new_tokens  # a pair's completions are sampled responses: the head scores those only
    # pairs of rollout rows [prompt P | response W]: each prompt encoded once for both rows where W <= P
    shared = ROLLOUT_ROWS if cfg.share_prompt else None
    dpo_step = make_train_step(
        make_loss_fn(model, cfg.loss, completion_width=width,
                     prompt_width=shared if differentiable(cfg.model) else None),
        tx=tx, num_micro_batches=h.num_micro_batches, mesh=mesh, state_shardings=state_sh,
        **cfg.model.program_dtypes())
    attach = pc.make_ref_attacher(model, mesh=mesh, params_shardings=ref_shardings,
                                  num_chunks=h.num_micro_batches, completion_width=width, ld_alpha=cfg.loss.ld_alpha,
                                  compiler_options=xla.compiler_options(**cfg.model.program_dtypes(cfg.ref_dtype)),
                                  prompt_width=shared)
    return dpo_step, attach


def pair_metrics(empty_B: np.ndarray, best: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """Over every host's groups: ``pairs/tied_fraction`` (groups whose n scores are all equal: no pair, no loss),
    ``pairs/empty_chosen`` (real pairs whose chosen response is empty) and ``empty_fraction`` (empty samples)."""
    groups = distributed.allgather_rows(np.asarray(valid, np.float64))
    chosen_empty = distributed.allgather_rows(np.asarray(empty_B[best][valid], np.float64))
    every = distributed.allgather_rows(np.asarray(empty_B, np.float64))
    return {"pairs/tied_fraction": float(1.0 - np.mean(groups)),
            "pairs/empty_chosen": float(np.mean(chosen_empty)) if chosen_empty.size else 0.0,
            "empty_fraction": float(np.mean(every))}


def train(cfg: OnlineDPOConfig, *, stop_at_step: Optional[int] = None) -> dict:
    """Run online DPO; returns the metric history, final state and export path."""
    out = common.start_run(cfg, cfg.run)
    mesh = common.make_mesh(cfg.mesh)
    actor = common.load_model(cfg.model, mesh=mesh, head="lm")
    h = cfg.online
    # with LoRA the reference is the policy's base, adapters off: no copy (`state.params` below)
    ref_params = None if cfg.model.lora else frozen_copy(actor.params, actor.shardings, cfg.ref_dtype)
    splits = prompt_splits(cfg.data, actor.tokenizer, common.host_batch_size(cfg.rollout.batch_size, mesh))
    prompts = splits.train
    sampler = Sampler(actor.model, actor.tokenizer, cfg.rollout, mesh)
    scorer = make_scorer(cfg.reward, model_cfg=cfg.model, actor=actor, mesh=mesh, dataset=prompts.data,
                         prompt_field=cfg.data.prompt_field)
    heldout = make_heldout(splits, sampler=sampler, scorer=scorer, reward=cfg.reward,
                           prompt_field=cfg.data.prompt_field, seed=cfg.run.seed)
    iters = common.total_steps_of(cfg.run, prompts.batches_per_epoch)
    tx = make_optimizer(cfg.optim, iters * h.updates_per_iteration)
    state, state_sh = create_train_state(actor.params, tx, mesh=mesh, params_shardings=actor.shardings)
    dpo_step, attach = build_programs(cfg, actor.model, mesh, tx=tx, state_sh=state_sh,
                                      ref_shardings=actor.shardings)
    base_key = jax.random.key(cfg.run.seed)

    def step(it, state):
        """One iteration: sample n per prompt → score → (best, worst) pairs → DPO steps."""
        timer = Timer()
        k_gen, k_upd = jax.random.split(jax.random.fold_in(base_key, it))
        with timer("generate"):
            batch = next(prompts)
            ro = sampler(state.params, batch, k_gen, repeats=h.num_samples)
            sc = scorer(ro, np.repeat(np.asarray(batch.index_B), h.num_samples))
        score = sc.local_score_B
        empty = np.array([not r.strip() for r in sc.texts["responses"]], bool)
        best, worst, valid = rows_of.best_worst(score, group_size=h.num_samples, empty_B=empty)
        pairs = rows_of.rollout_pair_batch(shd.local_rows(ro), best, worst, valid)
        zeros = np.zeros(len(best), np.float32)
        with timer("train"):
            pb = shd.shard_batch(PairBatch(pairs, zeros, zeros), mesh)
            if cfg.loss.needs_reference:
                pb = attach(state.params if ref_params is None else ref_params, pb)
            for _ in range(h.updates_per_iteration):
                state, m = dpo_step(state, pb, k_upd)
            m = jax.device_get(m)
        pref = preference_metrics(float(m.loss) * float(m.aux.pairs), m.aux, kto=False)
        every = distributed.allgather_rows(score)
        margins = distributed.allgather_rows((score[best] - score[worst])[valid])
        values = {"score": float(np.mean(every)), "score_std": float(np.std(every)),
                  "pair_margin": float(np.mean(margins)) if margins.size else 0.0,
                  "valid_pairs": float(margins.size), **pair_metrics(empty, best, valid), **sc.metrics,
                  **common.base_metrics(m), **pref,
                  "finite": float(m.finite), **timer.as_metrics()}
        return state, values, sample_rows(sc.texts, score, cfg.num_samples) if cfg.sample_every else None

    loop = Loop(name="online_dpo", run=cfg.run, output_dir=out, total=iters, step=step, data={"prompts": prompts},
                sample_every=cfg.sample_every, progress_keys=("score", "loss"), stop_at_step=stop_at_step,
                evaluate=None if heldout is None else (lambda s: heldout(s.params)),
                export=lambda s: common.export_model(actor, s.params, out / "model"))
    res = run_loop(loop, state)
    result = {"output_dir": str(out), "iterations": len(res.history), "history": res.history, "state": res.state,
              "model": actor.model, "tokenizer": actor.tokenizer}
    if res.export_dir:
        result["export_dir"] = res.export_dir
    return result
