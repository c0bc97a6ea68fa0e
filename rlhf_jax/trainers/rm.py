"""Reward model: a scalar head on the decoder, trained with the Bradley–Terry pairwise loss.

    L = mean over pairs of  -log sigma(r(x, y_c) - r(x, y_r) - m)

(Bradley & Terry 1952; Ouyang et al. 2022, InstructGPT; constant margin m as in Llama 2 / TRL
`RewardTrainer`), where r is the scalar head's output at the LAST real token of prompt + response.
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
import pathlib
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlhf_jax import distributed, ops
from rlhf_jax.config import require
from rlhf_jax.run_config import OptimConfig, RunConfig
from rlhf_jax.data import BatchIterator, DataConfig, PreferenceBatch, build_data, pad_id_of
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.train.optim import make_optimizer, make_schedule
from rlhf_jax.train.state import create_train_state
from rlhf_jax.train.step import StepMetrics, make_eval_step, make_train_step
from rlhf_jax.trainers import common

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


class RMAux(NamedTuple):
    """Sums over the real pairs of a batch."""

    pairs: jax.Array
    correct: jax.Array  # pairs with r_c > r_r
    chosen_sum: jax.Array
    rejected_sum: jax.Array


def pair_scores(model, params, batch: PreferenceBatch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(r_chosen_B, r_rejected_B, valid_B): scores at each side's last real token, one 2B-row forward."""
    ids_2BxS = jnp.concatenate([batch.chosen_ids_BxS, batch.rejected_ids_BxS], axis=0)
    mask_2BxS = jnp.concatenate([batch.chosen_mask_BxS, batch.rejected_mask_BxS], axis=0)
    scores_2BxS = model.apply({"params": params}, ids_2BxS, mask_2BxS)
    last_2B = ops.last_token(scores_2BxS.astype(jnp.float32), mask_2BxS)
    b = batch.chosen_ids_BxS.shape[0]
    valid_B = (jnp.sum(batch.chosen_mask_BxS, axis=1) > 0) & (jnp.sum(batch.rejected_mask_BxS, axis=1) > 0)
    return last_2B[:b], last_2B[b:], valid_B


def rm_loss(model, params, batch: PreferenceBatch, key: jax.Array, *, margin: Optional[float] = None):
    """`((loss_sum, pairs), RMAux)` of the Bradley–Terry loss over the real pairs of `batch`."""
    del key
    chosen_B, rejected_B, valid_B = pair_scores(model, params, batch)
    loss_B = ops.bradley_terry_loss(chosen_B, rejected_B, margin=margin)
    v_B = valid_B.astype(jnp.float32)
    zero = jnp.zeros_like(loss_B)
    aux = RMAux(pairs=jnp.sum(v_B), correct=jnp.sum(v_B * (chosen_B > rejected_B)),
                chosen_sum=jnp.sum(jnp.where(valid_B, chosen_B, zero)),
                rejected_sum=jnp.sum(jnp.where(valid_B, rejected_B, zero)))
    return (jnp.sum(jnp.where(valid_B, loss_B, zero)), aux.pairs), aux


def reward_moments(model, params, batch: PreferenceBatch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(n, sum r, sum r^2) over both responses of the real pairs (for the train-set mean/std)."""
    chosen_B, rejected_B, valid_B = pair_scores(model, params, batch)
    r_2B = jnp.concatenate([chosen_B, rejected_B])
    v_2B = jnp.concatenate([valid_B, valid_B])
    r_2B = jnp.where(v_2B, r_2B, 0.0)
    return jnp.sum(v_2B).astype(jnp.float32), jnp.sum(r_2B), jnp.sum(r_2B * r_2B)


def pair_metrics(loss_sum: float, aux: RMAux) -> dict[str, float]:
    """loss / accuracy / mean chosen and rejected reward / margin from summed RMAux."""
    n = max(float(aux.pairs), 1.0)
    chosen, rejected = float(aux.chosen_sum) / n, float(aux.rejected_sum) / n
    return {"loss": float(loss_sum) / n, "accuracy": float(aux.correct) / n, "reward_chosen": chosen,
            "reward_rejected": rejected, "reward_margin": chosen - rejected, "pairs": float(aux.pairs)}


def train(cfg: RMConfig, *, stop_at_step: Optional[int] = None) -> dict:
    """Train the reward model; returns the last metrics, data stats, reward mean/std and paths."""
    out = common.start_run(cfg, cfg.run)
    mesh = common.make_mesh(cfg.mesh)
    loaded = common.load_model(cfg.model, mesh=mesh, head="scalar")
    host_bs = common.host_batch_size(cfg.batch_size, mesh)
    eval_bs = common.host_batch_size(cfg.eval_batch_size or cfg.batch_size, mesh)
    splits = build_data(cfg.data, loaded.tokenizer, task="preference", batch_size=host_bs,
                        eval_batch_size=eval_bs, process_index=jax.process_index(),
                        process_count=jax.process_count())
    if distributed.is_main_process():
        print(f"[rlhf_jax] train data: {splits.stats.summary()}", flush=True)
    total = common.total_steps_of(cfg.run, splits.train.batches_per_epoch)
    tx = make_optimizer(cfg.optim, total)
    state, state_sh = create_train_state(loaded.params, tx, mesh=mesh, params_shardings=loaded.shardings)

    def loss_fn(params, batch, key):
        return rm_loss(loaded.model, params, batch, key, margin=cfg.margin)

    step = make_train_step(loss_fn, tx=tx, num_micro_batches=cfg.num_micro_batches,
                           lr_schedule=make_schedule(cfg.optim, total), mesh=mesh, state_shardings=state_sh)

    def describe(m: StepMetrics) -> dict[str, float]:
        base = common.base_metrics(m)
        return {**base, **pair_metrics(float(m.loss) * float(m.aux.pairs), m.aux)}

    evaluate = None
    if splits.eval is not None:
        eval_step = make_eval_step(lambda p, b: loss_fn(p, b, None), mesh=mesh, params_shardings=loaded.shardings)

        def evaluate(state) -> dict[str, float]:
            (loss_sum, _), aux = common.sum_over(eval_step, state.params, splits.eval, mesh)
            return pair_metrics(loss_sum, aux)

    spec = common.LoopSpec(run=cfg.run, output_dir=out, mesh=mesh, train_step=step, batches=splits.train,
                           total_steps=total, describe=describe, evaluate=evaluate, stop_at_step=stop_at_step,
                           name="rm")
    state, latest = common.train_loop(spec, state)
    result = {**latest, "output_dir": str(out), "steps": int(state.step), "data": splits.stats.as_dict(),
              "data_skipped_rows": sum(splits.stats.skipped.values())}
    if int(state.step) < total:
        return result
    extra = {}
    if cfg.reward_stats:
        ordered = BatchIterator(splits.train.data, cfg.data, batch_size=eval_bs, pad_id=pad_id_of(loaded.tokenizer),
                                process_index=jax.process_index(), process_count=jax.process_count(),
                                shuffle=False, drop_last=False, num_epochs=1)
        moments = make_eval_step(lambda p, b: reward_moments(loaded.model, p, b), mesh=mesh,
                                 params_shardings=loaded.shardings)
        n, s1, s2 = (float(x) for x in common.sum_over(moments, state.params, ordered, mesh))
        mean = s1 / n
        std = math.sqrt(max(s2 / n - mean * mean, 0.0))
        extra = {"rlhf_jax_reward_mean": mean, "rlhf_jax_reward_std": std}
        result.update(reward_mean=mean, reward_std=std)
        if distributed.is_main_process():
            (out / REWARD_STATS_FILE).write_text(json.dumps({"mean": mean, "std": std, "count": n}, indent=2))
    if cfg.export:
        export_dir = common.export_model(loaded, state.params, out / "model", extra_config=extra)
        if extra and distributed.is_main_process():
            (export_dir / REWARD_STATS_FILE).write_text((out / REWARD_STATS_FILE).read_text())
        result["export_dir"] = str(export_dir)
    return result


def load_reward_stats(model_dir) -> tuple[float, float]:
    """(mean, std) stored with an exported reward model (config.json keys written by `train`)."""
    config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    if "rlhf_jax_reward_mean" not in config:
        raise KeyError(f"{model_dir}/config.json has no rlhf_jax_reward_mean/std: not an rlhf_jax reward model export")
    return float(config["rlhf_jax_reward_mean"]), float(config["rlhf_jax_reward_std"])
