"""Supervised fine-tuning: next-token loss on completion tokens, token-mean over the optimizer batch.

    L = sum_{b,t} m_{b,t} * (-log pi(x_{b,t} | x_{b,<t})) / sum_{b,t} m_{b,t}

with m the loss mask shifted by one (completion tokens, or every token but each example's first), the
sum and count accumulated over micro-batches and devices and divided once (`train.step`). Packed rows
pass `segment_ids`/`positions` to the model so examples never attend to each other. At the end the
model is exported in Hugging Face format (`<output_dir>/model`) with its tokenizer.

Usage: `rlhf-jax sft configs/sft_tiny_cpu.yaml run.output_dir=runs/sft optim.learning_rate=3e-4`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional

import jax

from rlhf_jax.runtime import distributed
from rlhf_jax.algos.supervised import sft_loss
from rlhf_jax.config import require
from rlhf_jax.data import DataConfig, build_data
from rlhf_jax.run_config import OptimConfig, RunConfig
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.train import run as common
from rlhf_jax.train.loop import Loop, batch_steps, run_loop
from rlhf_jax.train.optim import make_optimizer, make_schedule
from rlhf_jax.train.state import create_train_state
from rlhf_jax.train.step import StepMetrics, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning run."""

    model: common.ModelLoadConfig  # pretrained model to fine-tune
    data: DataConfig  # prompt/completion or messages rows (eval: data.eval_path or data.eval_fraction)
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    mesh: MeshConfig = MeshConfig()
    batch_size: int = 8  # GLOBAL rows per optimizer step (over all hosts and micro-batches)
    num_micro_batches: int = 1  # gradient accumulation: batch_size / num_micro_batches rows per forward
    eval_batch_size: Optional[int] = None  # global eval rows per forward; null = batch_size
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    export: bool = True  # write a Hugging Face folder (safetensors + tokenizer) to <output_dir>/model

    def __post_init__(self):
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.num_micro_batches >= 1, "num_micro_batches", f"must be >= 1, got {self.num_micro_batches}")
        require(self.batch_size % self.num_micro_batches == 0, "num_micro_batches",
                f"must divide batch_size={self.batch_size}, got {self.num_micro_batches}")


def build_steps(cfg: SFTConfig, model, mesh, *, tx, state_sh, params_shardings, total: int):
    """The jitted ``(train_step, eval_step)`` of an SFT run (also lowered, with abstract arguments, by ``rlhf-jax plan``)."""
    def loss_fn(params, batch, key):
        return sft_loss(model, params, batch, key, mode=cfg.loss_aggregation)

    step = make_train_step(loss_fn, tx=tx, num_micro_batches=cfg.num_micro_batches,
                           lr_schedule=make_schedule(cfg.optim, total), mesh=mesh, state_shardings=state_sh,
                           **cfg.model.program_dtypes())
    eval_step = make_eval_step(lambda p, b: sft_loss(model, p, b, None, mode="token-mean")[0],
                               mesh=mesh, params_shardings=params_shardings, **cfg.model.program_dtypes())
    return step, eval_step


def train(cfg: SFTConfig, *, stop_at_step: Optional[int] = None) -> dict:
    """Run SFT; returns the last metrics plus `output_dir`/`export_dir` paths."""
    out = common.start_run(cfg, cfg.run)
    mesh = common.make_mesh(cfg.mesh)
    loaded = common.load_model(cfg.model, mesh=mesh, head="lm")
    host_bs = common.host_batch_size(cfg.batch_size, mesh)
    eval_bs = common.host_batch_size(cfg.eval_batch_size or cfg.batch_size, mesh)
    splits = build_data(cfg.data, loaded.tokenizer, task="sft", batch_size=host_bs, eval_batch_size=eval_bs,
                        process_index=jax.process_index(), process_count=jax.process_count())
    if distributed.is_main_process():
        print(f"[rlhf_jax] train data: {splits.stats.summary()}", flush=True)
    total = common.total_steps_of(cfg.run, splits.train.batches_per_epoch)
    tx = make_optimizer(cfg.optim, total)
    state, state_sh = create_train_state(loaded.params, tx, mesh=mesh, params_shardings=loaded.shardings)

    step, eval_step = build_steps(cfg, loaded.model, mesh, tx=tx, state_sh=state_sh,
                                  params_shardings=loaded.shardings, total=total)

    def describe(m: StepMetrics) -> dict[str, float]:
        return {**common.base_metrics(m), "sequences": float(m.aux.sequences)}

    evaluate = None
    if splits.eval is not None:
        def evaluate(state) -> dict[str, float]:
            loss_sum, count = common.sum_over(eval_step, state.params, splits.eval, mesh)
            loss = float(loss_sum) / max(float(count), 1.0)
            return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    loop = Loop(name="sft", run=cfg.run, output_dir=out, total=total, data={"train": splits.train},
                step=batch_steps(step, splits.train, mesh, seed=cfg.run.seed), describe=describe,
                evaluate=evaluate, stop_at_step=stop_at_step,
                export=(lambda s: common.export_model(loaded, s.params, out / "model")) if cfg.export else None)
    res = run_loop(loop, state)
    result = {**res.latest, "output_dir": str(out), "steps": int(res.state.step)}
    if res.export_dir:
        result["export_dir"] = res.export_dir
    return result
