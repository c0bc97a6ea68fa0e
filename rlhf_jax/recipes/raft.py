"""RAFT / best-of-n fine-tuning: sample n responses per prompt, score, keep the best, SFT on them, repeat.

    for each iteration:  y_1..y_n ~ π_θ(·|x)  →  r(x, y_i)  →  keep top-k of each group (or the rows with
                         r ≥ the batch's q-quantile)  →  ``sft_steps`` SFT steps on the kept (x, y) pairs

(Dong et al. 2023, "RAFT: Reward rAnked FineTuning"; "best-of-n distillation"/expert iteration.) Scoring
uses the same reward functions / reward model / clip / no-EOS penalty as the online-RL trainers
(``online.scoring.RewardScorer``); the update is the SFT loss (``algos.supervised.sft_loss``) in the shared jitted
step (``train.step.make_train_step``). Top-k keeps a static ``batch_size·k`` rows; the quantile rule keeps
all rows and zeroes the loss mask of the rejected ones (static shapes, nothing recompiles).

SuperHF (Mukobi et al. 2023): ``raft.kl_coef`` > 0 adds a KL prior to the frozen starting policy to the
fine-tuning loss (``algos.superhf``, ``ops.kl_regularised_nll``); ``algo.preset: superhf`` sets the paper's
KL coefficient 0.35 when ``raft.kl_coef`` is null. Logged: ``nll``, ``kl`` (token mean of the estimator on
the kept tokens) and ``kl_term`` (c·kl).

Usage: ``rlhf-jax raft configs/raft_tiny_cpu.yaml model.path=runs/demo/sft/model``
(SuperHF: ``rlhf-jax raft configs/superhf_tiny_cpu.yaml model.path=...``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import jax
import numpy as np

from rlhf_jax.runtime import distributed, xla
from rlhf_jax import sharding as shd
from rlhf_jax.algos import superhf
from rlhf_jax.algos.supervised import sft_loss
from rlhf_jax.config import require
from rlhf_jax.data import DataConfig, SFTBatch
from rlhf_jax.online import batches as rows_of
from rlhf_jax.online.config import RewardConfig, RolloutConfig, online_eval_checks
from rlhf_jax.online.sampler import Sampler, frozen_copy, prompt_splits
from rlhf_jax.online.heldout import make_heldout
from rlhf_jax.online.scoring import make_scorer, sample_rows
from rlhf_jax.run_config import OptimConfig, RunConfig
from rlhf_jax.train import run as common
from rlhf_jax.train.loop import Loop, run_loop
from rlhf_jax.train.metrics import Timer
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.state import create_train_state
from rlhf_jax.train.step import make_train_step


@dataclasses.dataclass(frozen=True)
class RAFTHyper:
    """Selection and the SFT stage of one iteration."""

    num_samples: int = 4  # n responses per prompt
    top_k: int = 1  # keep the k best of each prompt's n (ignored when `quantile` is set)
    quantile: Optional[float] = None  # keep responses scoring >= this quantile of the batch's scores
    sft_steps: int = 1  # optimizer steps on the kept rows per iteration
    num_micro_batches: int = 1
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    kl_coef: Optional[float] = None  # SuperHF's KL prior coefficient c; null = the preset's (raft 0, superhf 0.35)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # per-token KL estimator of the prior (ops.kl_estimate)

    def __post_init__(self):
        require(self.kl_coef is None or self.kl_coef >= 0, "raft.kl_coef", f"must be >= 0, got {self.kl_coef}")
        require(self.num_samples >= 1, "raft.num_samples", f"must be >= 1, got {self.num_samples}")
        require(1 <= self.top_k <= self.num_samples, "raft.top_k", f"must be in [1, num_samples], got {self.top_k}")
        require(self.quantile is None or 0 <= self.quantile < 1, "raft.quantile", f"must be in [0, 1), got {self.quantile}")
        require(self.sft_steps >= 1, "raft.sft_steps", f"must be >= 1, got {self.sft_steps}")


@dataclasses.dataclass(frozen=True)
class RAFTAlgo:
    """Which published variant fills the null hyperparameters."""

    preset: Literal["raft", "superhf"] = "raft"  # superhf: raft.kl_coef defaults to 0.35 (Mukobi et al. 2023)


@dataclasses.dataclass(frozen=True)
class RAFTConfig:
    """A RAFT run; ``run.total_steps`` counts iterations."""

    model: common.ModelLoadConfig
    data: DataConfig  # prompt rows
    reward: RewardConfig = RewardConfig(functions=("rlhf_jax.tasks:gold_score",))
    raft: RAFTHyper = RAFTHyper()
    algo: RAFTAlgo = RAFTAlgo()
    rollout: RolloutConfig = RolloutConfig(batch_size=8)  # batch_size = PROMPTS per iteration
    optim: OptimConfig = OptimConfig(learning_rate=1e-5)
    run: RunConfig = RunConfig(total_steps=20, log_every=1)
    mesh: shd.MeshConfig = shd.MeshConfig()
    sample_every: int = 0
    num_samples: int = 4  # rows in each sample table

    def __post_init__(self):
        online_eval_checks(self.run, self.data, self.reward)
        rows = self.rollout.batch_size * (self.raft.num_samples if self.raft.quantile is not None else self.raft.top_k)
        require(rows % self.raft.num_micro_batches == 0, "raft.num_micro_batches",
                f"must divide the {rows} kept rows per iteration")

    @property
    def kl_coef(self) -> float:
        """The KL prior's coefficient in effect (``raft.kl_coef``, else the preset's)."""
        if self.raft.kl_coef is not None:
            return self.raft.kl_coef
        return superhf.SUPERHF_KL_COEF if self.algo.preset == "superhf" else 0.0


def select_rows(score_B: np.ndarray, *, group_size: int, top_k: int, quantile: Optional[float],
                threshold: Optional[float] = None):
    """(row indices, loss weight per selected row): top-k of each group, or every row weighted by score ≥ q
    (``threshold``: the q-quantile of the GLOBAL batch when the rows are one host's; default: of ``score_B``)."""
    if quantile is None:
        return rows_of.top_k_rows(score_B, group_size=group_size, k=top_k), None
    keep = np.asarray(score_B) >= (np.quantile(score_B, quantile) if threshold is None else threshold)
    return np.arange(len(score_B)), keep


def kept_batch(sft: SFTBatch, rows: np.ndarray, keep: Optional[np.ndarray]) -> SFTBatch:
    """The selected rows; rows with ``keep`` False get an all-zero loss mask (they add nothing)."""
    out = rows_of.take_rows(sft, rows)
    if keep is not None:
        out = out._replace(loss_mask_BxS=np.where(keep[:, None], out.loss_mask_BxS, 0).astype(np.int32))
    return out


def build_programs(cfg: RAFTConfig, model, mesh, *, tx, state_sh, params_shardings):
    """``(sft_step, ref_scorer)``: the jitted SFT step on the kept rows (SuperHF's KL-regularised loss when
    ``kl_coef`` > 0) and, for SuperHF, the jitted reference log-prob pass (``algos.superhf.make_ref_scorer``,
    None otherwise). Also what ``rlhf-jax plan`` compiles."""
    h, kl_coef = cfg.raft, cfg.kl_coef
    if kl_coef > 0:
        ref_scorer = superhf.make_ref_scorer(model, mesh=mesh, params_shardings=params_shardings,
                                             compiler_options=xla.compiler_options(**cfg.model.program_dtypes()))
        loss = lambda p, b, k: superhf.superhf_loss(model, p, b, k, kl_coef=kl_coef,  # noqa: E731
                                                    kl_estimator=h.kl_estimator, mode=h.loss_aggregation)
    else:
        ref_scorer = None
        loss = lambda p, b, k: sft_loss(model, p, b, k, mode=h.loss_aggregation)  # noqa: E731
    step = make_train_step(loss, tx=tx, num_micro_batches=h.num_micro_batches, mesh=mesh, state_shardings=state_sh,
                           **cfg.model.program_dtypes())
    return step, ref_scorer


def train(cfg: RAFTConfig, *, stop_at_step: Optional[int] = None) -> dict:
    """Run RAFT; returns the metric history, final state and export path."""
    out = common.start_run(cfg, cfg.run)
    mesh = common.make_mesh(cfg.mesh)
    actor = common.load_model(cfg.model, mesh=mesh, head="lm")
    h = cfg.raft
    splits = prompt_splits(cfg.data, actor.tokenizer, common.host_batch_size(cfg.rollout.batch_size, mesh))
    prompts = splits.train
    sampler = Sampler(actor.model, actor.tokenizer, cfg.rollout, mesh)
    scorer = make_scorer(cfg.reward, model_cfg=cfg.model, actor=actor, mesh=mesh, dataset=prompts.data,
                         prompt_field=cfg.data.prompt_field)
    heldout = make_heldout(splits, sampler=sampler, scorer=scorer, reward=cfg.reward,
                           prompt_field=cfg.data.prompt_field, seed=cfg.run.seed)
    iters = common.total_steps_of(cfg.run, prompts.batches_per_epoch)
    tx = make_optimizer(cfg.optim, iters * h.sft_steps)
    state, state_sh = create_train_state(actor.params, tx, mesh=mesh, params_shardings=actor.shardings)
    kl_coef = cfg.kl_coef
    sft_step, ref_scorer = build_programs(cfg, actor.model, mesh, tx=tx, state_sh=state_sh,
                                          params_shardings=actor.shardings)
    if ref_scorer is not None:  # SuperHF: the kept rows carry the frozen starting policy's log-probs
        ref_params = frozen_copy(actor.params, actor.shardings, "float32")
        with_ref = lambda kept: ref_scorer(ref_params, kept)  # noqa: E731
    else:
        with_ref = lambda kept: kept  # noqa: E731
    base_key = jax.random.key(cfg.run.seed)

    def step(it, state):
        """One iteration: sample n per prompt → score → keep the best → ``sft_steps`` SFT steps."""
        timer = Timer()
        k_gen, k_sft = jax.random.split(jax.random.fold_in(base_key, it))
        with timer("generate"):
            batch = next(prompts)
            ro = sampler(state.params, batch, k_gen, repeats=h.num_samples)
            sc = scorer(ro, np.repeat(np.asarray(batch.index_B), h.num_samples))
        score, every = sc.local_score_B, distributed.allgather_rows(sc.local_score_B)
        threshold = None if h.quantile is None else float(np.quantile(every, h.quantile))
        rows, keep = select_rows(score, group_size=h.num_samples, top_k=h.top_k, quantile=h.quantile,
                                 threshold=threshold)
        kept = with_ref(shd.shard_batch(kept_batch(rows_of.rollout_sft_batch(shd.local_rows(ro)), rows, keep), mesh))
        with timer("train"):
            for _ in range(h.sft_steps):
                state, m = sft_step(state, kept, k_sft)
            m = jax.device_get(m)
        sel = distributed.allgather_rows(score[rows] if keep is None else score[keep])
        values = {"score": float(np.mean(every)), "score_std": float(np.std(every)),
                  "kept_score": float(np.mean(sel)), "kept_rows": float(len(sel)), **sc.metrics,
                  **common.base_metrics(m), "finite": float(m.finite), **timer.as_metrics()}
        if kl_coef > 0:
            values.update(superhf.superhf_metrics(m.aux, kl_coef))
        return state, values, sample_rows(sc.texts, score, cfg.num_samples) if cfg.sample_every else None

    loop = Loop(name="raft", run=cfg.run, output_dir=out, total=iters, step=step, data={"prompts": prompts},
                sample_every=cfg.sample_every, progress_keys=("score", "kept_score"), stop_at_step=stop_at_step,
                evaluate=None if heldout is None else (lambda s: heldout(s.params)),
                export=lambda s: common.export_model(actor, s.params, out / "model"))
    res = run_loop(loop, state)
    result = {"output_dir": str(out), "iterations": len(res.history), "history": res.history, "state": res.state,
              "model": actor.model, "tokenizer": actor.tokenizer}
    if res.export_dir:
        result["export_dir"] = res.export_dir
    return result
