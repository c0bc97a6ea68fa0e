"""Reward model: a scalar head on the decoder, trained with the Bradley–Terry pairwise loss.

    L = mean over pairs of  -log sigma(r(x, y_c) - r(x, y_r) - m)

(Bradley & Terry 1952; Ouyang et al. 2022, InstructGPT; constant margin m as in Llama 2 / TRL
`RewardTrainer`), where r is the scalar head's output at the LAST real token of prompt + response. When the
preference file has a `chosen_prob` column (`data.chosen_prob_field`; `rlhf-jax label ranker=pairwise_judge`
writes it), the loss is the cross-entropy with that probability p as target,
-p log sigma(Δ) - (1 - p) log sigma(-Δ) (Constitutional AI's soft labels; the loss above at p = 1).
Chosen and rejected rows go through ONE forward pass (concatenated into 2B rows). Padding pairs (all-zero
masks, from a padded last eval batch) count 0. Eval reports pairwise accuracy P(r_c > r_r).

After training, the mean and standard deviation of r over every train response (chosen and rejected) are
stored with the exported model — in `config.json` as `rlhf_jax_reward_mean` / `rlhf_jax_reward_std` and
in `reward_stats.json` — so RL can normalise rewards as (r - mean) / std.

Usage: `rlhf-jax rm configs/rm_tiny_cpu.yaml model.path=runs/sft/model`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional

import jax

from rlhf_jax import rewards
from rlhf_jax.runtime import distributed
from rlhf_jax.algos.supervised import pair_metrics, reward_moments, rm_loss
from rlhf_jax.config import require
from rlhf_jax.data import BatchIterator, DataConfig, build_data, pad_id_of
from rlhf_jax.run_config import OptimConfig, RunConfig
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.train import run as common
from rlhf_jax.train.loop import Loop, batch_steps, run_loop
from rlhf_jax.train.optim import make_optimizer, make_schedule
from rlhf_jax.train.state import create_train_state
from rlhf_jax.train.step import StepMetrics, make_eval_step, make_train_step

REWARD_STATS_FILE = "reward_stats.json"


@dataclasses.dataclass(frozen=True)
class RMConfig:
    """Reward-model run (preference data: prompt/chosen/rejected, or HH-RLHF via data.adapter)."""

    model: common.ModelLoadConfig  # usually the SFT export; the scalar head is added (zero-initialised)
    data: DataConfig  # preference rows (eval: data.eval_path or data.eval_fraction)
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    mesh: MeshConfig = MeshConfig()
    batch_size: int = 8  # GLOBAL pairs per optimizer step
    num_micro_batches: int = 1  # gradient accumulation over batch_size / num_micro_batches pairs
    eval_batch_size: Optional[int] = None  # global eval pairs per forward; null = batch_size
    margin: Optional[float] = None  # constant Bradley-Terry margin m; null = none
    reward_stats: bool = True  # compute reward mean/std over the train set and store them with the model
    export: bool = True  # write a Hugging Face folder (scalar head) to <output_dir>/model

    def __post_init__(self):
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.num_micro_batches >= 1, "num_micro_batches", f"must be >= 1, got {self.num_micro_batches}")
        require(self.batch_size % self.num_micro_batches == 0, "num_micro_batches",
                f"must divide batch_size={self.batch_size}, got {self.num_micro_batches}")












def build_steps(cfg: RMConfig, model, mesh, *, tx, state_sh, params_shardings, total: int):
    """The jitted ``(train_step, eval_step)`` of a reward-model run (also lowered, with abstract arguments, by
    ``rlhf-jax plan``)."""
    def loss_fn(params, batch, key):
        return rm_loss(model, params, batch, key, margin=cfg.margin)

    step = make_train_step(loss_fn, tx=tx, num_micro_batches=cfg.num_micro_batches,
                           lr_schedule=make_schedule(cfg.optim, total), mesh=mesh, state_shardings=state_sh,
                           **cfg.model.program_dtypes())
    eval_step = make_eval_step(lambda p, b: loss_fn(p, b, None), mesh=mesh, params_shardings=params_shardings,
                               **cfg.model.program_dtypes())
    return step, eval_step


def train(cfg: RMConfig, *, stop_at_step: Optional[int] = None) -> dict:
    """Train the reward model; returns the last metrics, data stats, reward mean/std and paths."""
    out = common.start_run(cfg, cfg.run)
    mesh = common.make_mesh(cfg.mesh)
    loaded = common.load_model(cfg.model, mesh=mesh, head="scalar")
    host_bs = common.host_batch_size(cfg.batch_size, mesh)
    eval_bs = common.host_batch_size(cfg.eval_batch_size or cfg.batch_size, mesh)
    splits = build_data(cfg.data, loaded.tokenizer, task="preference", batch_size=host_bs,
                        eval_batch_size=eval_bs, process_index=jax.process_index(),
                        process_count=jax.process_count(), soft_labels=True)
    if distributed.is_main_process():
        print(f"[rlhf_jax] train data: {splits.stats.summary()}", flush=True)
    total = common.total_steps_of(cfg.run, splits.train.batches_per_epoch)
    tx = make_optimizer(cfg.optim, total)
    state, state_sh = create_train_state(loaded.params, tx, mesh=mesh, params_shardings=loaded.shardings)

    step, eval_step = build_steps(cfg, loaded.model, mesh, tx=tx, state_sh=state_sh,
                                  params_shardings=loaded.shardings, total=total)

    def describe(m: StepMetrics) -> dict[str, float]:
        base = common.base_metrics(m)
        return {**base, **pair_metrics(float(m.loss) * float(m.aux.pairs), m.aux)}

    evaluate = None
    if splits.eval is not None:
        def evaluate(state) -> dict[str, float]:
            (loss_sum, _), aux = common.sum_over(eval_step, state.params, splits.eval, mesh)
            return pair_metrics(loss_sum, aux)

    stats: dict[str, float] = {}

    def finish(state):
        """Reward statistics over the train set (for normalisation in RL), then the export."""
        extra = {}
        if cfg.reward_stats:
            ordered = BatchIterator(splits.train.data, cfg.data, batch_size=eval_bs,
                                    pad_id=pad_id_of(loaded.tokenizer), process_index=jax.process_index(),
                                    process_count=jax.process_count(), shuffle=False, drop_last=False, num_epochs=1)
            moments = make_eval_step(lambda p, b: reward_moments(loaded.model, p, b), mesh=mesh,
                                     params_shardings=loaded.shardings, **cfg.model.program_dtypes())
            n, s1, s2 = (float(x) for x in common.sum_over(moments, state.params, ordered, mesh))
            mean = s1 / n
            std = math.sqrt(max(s2 / n - mean * mean, 0.0))
            extra = {rewards.REWARD_MEAN_KEY: mean, rewards.REWARD_STD_KEY: std}
            stats.update(reward_mean=mean, reward_std=std)
            if distributed.is_main_process():
                (out / REWARD_STATS_FILE).write_text(json.dumps({"mean": mean, "std": std, "count": n}, indent=2))
        if not cfg.export:
            return None
        export_dir = common.export_model(loaded, state.params, out / "model", extra_config=extra)
        if extra and distributed.is_main_process():
            (export_dir / REWARD_STATS_FILE).write_text((out / REWARD_STATS_FILE).read_text())
        return export_dir

    loop = Loop(name="rm", run=cfg.run, output_dir=out, total=total, data={"train": splits.train},
                step=batch_steps(step, splits.train, mesh, seed=cfg.run.seed), describe=describe,
                evaluate=evaluate, export=finish, stop_at_step=stop_at_step)
    res = run_loop(loop, state)
    result = {**res.latest, **stats, "output_dir": str(out), "steps": int(res.state.step),
              "data": splits.stats.as_dict(), "data_skipped_rows": sum(splits.stats.skipped.values())}
    if res.export_dir:
        result["export_dir"] = res.export_dir
    return result
