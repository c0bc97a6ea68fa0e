"""Offline preference optimisation: DPO (every TRL loss type, f-divergences), SimPO, ORPO and KTO.

Pairs (prompt, chosen y_c, rejected y_r) are scored by ONE forward pass over the 2B rows chosen ++
rejected; a row's log-prob is the sum of its completion tokens' log-probs (`preference_common`). Then

* ``dpo``: ``ops.dpo_loss`` (Rafailov et al. 2023 and TRL 1.x's variants, ``loss.loss_type``) on
  policy and reference sums; implicit rewards β(log π − log π_ref).
* ``simpo``: ``ops.simpo_loss`` on average log-probs, margin γ, no reference (Meng et al. 2024).
* ``orpo``: ``ops.orpo_loss``: chosen NLL (per-row token mean) + λ·odds-ratio term, no reference
  (Hong et al. 2024).
* ``kto``: ``ops.kto_loss`` on unpaired prompt/completion/label rows, with the reference point
  z₀ = max(0, mean over the (micro-)batch of log π − log π_ref on mismatched KL rows) (Ethayarajh et al.
  2024; TRL ``KTOTrainer``). Rows and KL rows share one forward pass.

The loss is the mean over real pairs (rows), exact under gradient accumulation and data parallelism
((sum, count) in `train.step`). ``aot``/``aot_unpaired`` sort within a micro-batch. The reference comes
from a frozen model (``ref_model_path``, default the policy's starting point; optionally bf16) whose
params are a `jit` argument, or — ``precompute_ref_logps: true`` — from one pass over the train and eval
sets before training, cached on disk under a dataset + model fingerprint, after which the reference model
is dropped. Logged: loss, reward accuracy (TRL: r_c > r_r strictly), chosen/rejected rewards, margin,
chosen/rejected policy log-probs (and z₀ for KTO), on train and held-out data. The policy is exported
with `save_pretrained` to ``<output_dir>/model``.

Usage: `rlhf-jax dpo configs/dpo_tiny_cpu.yaml model.path=runs/sft/model loss.loss_type=ipo`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlhf_jax import distributed, ops
from rlhf_jax import sharding as shd
from rlhf_jax.config import require
from rlhf_jax.run_config import OptimConfig, RunConfig
from rlhf_jax.data import BatchIterator, DataConfig, build_data, pad_id_of
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.train.optim import make_optimizer, make_schedule
from rlhf_jax.train.state import create_train_state
from rlhf_jax.train.step import StepMetrics, make_eval_step, make_train_step
from rlhf_jax.trainers import common
from rlhf_jax.trainers import preference_common as pc

ALGORITHMS = ("dpo", "simpo", "orpo", "kto")
_WITH_REFERENCE = ("dpo", "kto")


@dataclasses.dataclass(frozen=True)
class PreferenceLossConfig:
    """Which preference loss and its hyperparameters (names as TRL's configs)."""

    algorithm: Literal["dpo", "simpo", "orpo", "kto"] = "dpo"
    loss_type: Optional[str] = None  # dpo: one of ops.DPO_LOSS_TYPES (null = sigmoid); kto: kto | apo_zero_unpaired
    beta: float = 0.1  # β (DPO/KTO/SimPO temperature; IPO τ; ORPO λ)
    label_smoothing: float = 0.0  # ε: cDPO / robust / exo_pair / aot; SimPO's smoothing
    f_divergence: str = "reverse_kl"  # dpo: reverse_kl | forward_kl | js_divergence | alpha_divergence
    f_alpha: float = 0.5  # α of alpha_divergence
    discopop_tau: float = 0.05  # τ of discopop
    simpo_gamma: float = 0.5  # SimPO target margin γ (TRL CPOConfig.simpo_gamma)
    desirable_weight: float = 1.0  # KTO λ_D
    undesirable_weight: float = 1.0  # KTO λ_U

    def __post_init__(self):
        require(self.beta > 0, "loss.beta", f"must be > 0, got {self.beta}")
        if self.algorithm == "dpo":
            require(self.loss_type is None or self.loss_type in ops.DPO_LOSS_TYPES, "loss.loss_type",
                    f"dpo loss_type must be one of {ops.DPO_LOSS_TYPES}, got {self.loss_type!r}")
        elif self.algorithm == "kto":
            require(self.loss_type is None or self.loss_type in ops.KTO_LOSS_TYPES, "loss.loss_type",
                    f"kto loss_type must be one of {ops.KTO_LOSS_TYPES}, got {self.loss_type!r}")
        else:
            require(self.loss_type is None, "loss.loss_type", f"{self.algorithm} has no loss_type; set null")
        require(self.f_divergence in ops.F_DIVERGENCES, "loss.f_divergence",
                f"must be one of {ops.F_DIVERGENCES}, got {self.f_divergence!r}")
        require(self.f_divergence == "reverse_kl" or (
            self.algorithm == "dpo" and self.resolved_loss_type in ops.F_DIVERGENCE_LOSS_TYPES), "loss.f_divergence",
            f"applies to algorithm=dpo with loss_type in {ops.F_DIVERGENCE_LOSS_TYPES} only (as TRL 1.16)")
        require(0 <= self.label_smoothing < 1, "loss.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        require(self.resolved_loss_type != "exo_pair" or self.label_smoothing > 0, "loss.label_smoothing",
                "exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)")
        require(self.resolved_loss_type != "robust" or self.label_smoothing < 0.5, "loss.label_smoothing",
                "robust needs label_smoothing < 0.5")

    @property
    def resolved_loss_type(self) -> Optional[str]:
        """The loss type in effect (defaults: sigmoid for dpo, kto for kto, None otherwise)."""
        return self.loss_type or {"dpo": "sigmoid", "kto": "kto"}.get(self.algorithm)

    @property
    def needs_reference(self) -> bool:
        return self.algorithm in _WITH_REFERENCE


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Offline preference run: DPO family / SimPO / ORPO on pairs, KTO on unpaired labelled rows."""

    model: common.ModelLoadConfig  # the policy to train (usually an SFT export)
    data: DataConfig  # prompt/chosen/rejected rows (kto: prompt/completion/label); eval via eval_path/fraction
    loss: PreferenceLossConfig = PreferenceLossConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    mesh: MeshConfig = MeshConfig()
    batch_size: int = 8  # GLOBAL pairs (kto: rows) per optimizer step
    num_micro_batches: int = 1  # gradient accumulation over batch_size / num_micro_batches pairs
    eval_batch_size: Optional[int] = None  # global eval pairs per forward; null = batch_size
    ref_model_path: Optional[str] = None  # frozen reference HF folder; null = model.path (the starting policy)
    ref_dtype: Optional[Literal["float32", "bfloat16"]] = None  # reference compute + storage dtype; null = model.dtype
    precompute_ref_logps: bool = False  # score the data with the reference once (cached), then drop the reference
    ref_logps_cache_dir: Optional[str] = None  # cache of precomputed values; null = <output_dir>/ref_logps
    export: bool = True  # write the policy as a Hugging Face folder to <output_dir>/model

    def __post_init__(self):
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.num_micro_batches >= 1, "num_micro_batches", f"must be >= 1, got {self.num_micro_batches}")
        require(self.batch_size % self.num_micro_batches == 0, "num_micro_batches",
                f"must divide batch_size={self.batch_size}, got {self.num_micro_batches}")
        require(not self.precompute_ref_logps or self.loss.needs_reference, "precompute_ref_logps",
                f"{self.loss.algorithm} is reference-free; set false")

    @property
    def task(self) -> str:
        """Batch kind the data must make."""
        return "unpaired" if self.loss.algorithm == "kto" else "preference"


class PrefAux(NamedTuple):
    """Sums over the real pairs (KTO: rows; chosen = desirable, rejected = undesirable) of a batch."""

    pairs: jax.Array
    chosen_n: jax.Array
    rejected_n: jax.Array
    correct: jax.Array  # pairs with r_c > r_r (0 for KTO)
    chosen_reward: jax.Array
    rejected_reward: jax.Array
    chosen_logp: jax.Array
    rejected_logp: jax.Array
    kl: jax.Array  # KTO: z0 x rows (so the sum over micro-batches divides by rows)


def _sum_where(valid_B, x_B) -> jax.Array:
    return jnp.sum(jnp.where(valid_B, x_B, 0.0))


def pair_loss_from_logps(logp_2B, n_2B, batch: pc.PairBatch, *, loss: PreferenceLossConfig):
    """`((loss_sum, pairs), PrefAux)` of a DPO-family / SimPO / ORPO loss given the policy's completion
    log-prob sums `logp_2B` and token counts `n_2B` of the rows chosen ++ rejected."""
    b = logp_2B.shape[0] // 2
    lc, lr, nc, nr = logp_2B[:b], logp_2B[b:], n_2B[:b], n_2B[b:]
    valid = (nc > 0) & (nr > 0)
    if loss.algorithm == "dpo":
        losses, rc, rr = ops.dpo_loss(
            lc, lr, batch.ref_chosen_logps_B, batch.ref_rejected_logps_B, beta=loss.beta,
            loss_type=loss.resolved_loss_type, label_smoothing=loss.label_smoothing, chosen_lengths_B=nc,
            rejected_lengths_B=nr, f_divergence=loss.f_divergence, alpha=loss.f_alpha,
            discopop_tau=loss.discopop_tau)
    else:
        avg_c, avg_r = lc / jnp.maximum(nc, 1.0), lr / jnp.maximum(nr, 1.0)
        if loss.algorithm == "simpo":
            losses, rc, rr = ops.simpo_loss(avg_c, avg_r, beta=loss.beta, gamma=loss.simpo_gamma,
                                            label_smoothing=loss.label_smoothing)
        elif loss.algorithm == "orpo":
            losses, rc, rr = ops.orpo_loss(avg_c, avg_r, beta=loss.beta, chosen_nll_B=-avg_c)
        else:
            raise ValueError(f"pair_loss: algorithm {loss.algorithm!r} does not take pairs")
    v = valid.astype(jnp.float32)
    pairs = jnp.sum(v)
    aux = PrefAux(pairs=pairs, chosen_n=pairs, rejected_n=pairs, correct=jnp.sum(v * (rc > rr)),
                  chosen_reward=_sum_where(valid, rc), rejected_reward=_sum_where(valid, rr),
                  chosen_logp=_sum_where(valid, lc), rejected_logp=_sum_where(valid, lr), kl=jnp.zeros(()))
    return (_sum_where(valid, losses), pairs), aux


def kto_loss_from_logps(logp_2B, n_2B, batch: pc.KTOBatch, *, loss: PreferenceLossConfig):
    """`((loss_sum, rows), PrefAux)` of KTO given the policy's sums/counts of the rows ++ KL rows."""
    b = logp_2B.shape[0] // 2
    lp, lp_kl, n, n_kl = logp_2B[:b], logp_2B[b:], n_2B[:b], n_2B[b:]
    valid = n > 0
    kl = jnp.zeros((), jnp.float32)
    if loss.resolved_loss_type == "kto":  # ops.kto_kl_baseline, restricted to real KL rows
        kl = jax.lax.stop_gradient(jnp.maximum(ops.masked_mean(lp_kl - batch.ref_kl_logps_B, n_kl > 0), 0.0))
    losses, rewards = ops.kto_loss(lp, batch.ref_logps_B, batch.rows.label_B, kl=kl, beta=loss.beta,
                                   desirable_weight=loss.desirable_weight,
                                   undesirable_weight=loss.undesirable_weight, loss_type=loss.resolved_loss_type)
    good, bad = valid & (batch.rows.label_B != 0), valid & (batch.rows.label_B == 0)
    rows = jnp.sum(valid.astype(jnp.float32))
    aux = PrefAux(pairs=rows, chosen_n=jnp.sum(good.astype(jnp.float32)), rejected_n=jnp.sum(bad.astype(jnp.float32)),
                  correct=jnp.zeros(()), chosen_reward=_sum_where(good, rewards),
                  rejected_reward=_sum_where(bad, rewards), chosen_logp=_sum_where(good, lp),
                  rejected_logp=_sum_where(bad, lp), kl=kl * rows)
    return (_sum_where(valid, losses), rows), aux


def make_loss_fn(model, loss: PreferenceLossConfig, *, completion_width: Optional[int] = None):
    """`(params, batch, key) -> ((loss_sum, count), PrefAux)` for `loss.algorithm`: one forward pass over
    the 2B stacked rows, then `pair_loss_from_logps` / `kto_loss_from_logps`. ``completion_width``: the LM
    head runs on that many positions per row (`preference_common.completion_logps`)."""
    from_logps = kto_loss_from_logps if loss.algorithm == "kto" else pair_loss_from_logps

    def loss_fn(params, batch, key):
        del key
        logp_2B, n_2B = pc.completion_logps(model, params, *pc.stacked_rows(batch),
                                            completion_width=completion_width)
        return from_logps(logp_2B, n_2B, batch, loss=loss)

    return loss_fn


def preference_metrics(loss_sum: float, aux: PrefAux, *, kto: bool) -> dict[str, float]:
    """Host metrics from summed `PrefAux` (TRL names without the slash prefixes)."""
    n = max(float(aux.pairs), 1.0)
    nc, nr = max(float(aux.chosen_n), 1.0), max(float(aux.rejected_n), 1.0)
    chosen, rejected = float(aux.chosen_reward) / nc, float(aux.rejected_reward) / nr
    out = {"loss": float(loss_sum) / n, "rewards_chosen": chosen, "rewards_rejected": rejected,
           "rewards_margin": chosen - rejected, "logps_chosen": float(aux.chosen_logp) / nc,
           "logps_rejected": float(aux.rejected_logp) / nr, "pairs": float(aux.pairs)}
    if kto:
        out["kl"] = float(aux.kl) / n
    else:
        out["rewards_accuracy"] = float(aux.correct) / n
    return out


# ------------------------------------------------------------------------------------------- driver
def _reference(cfg: DPOConfig, mesh) -> common.LoadedModel:
    dtype = cfg.ref_dtype or cfg.model.dtype
    ref_cfg = dataclasses.replace(cfg.model, path=cfg.ref_model_path or cfg.model.path,
                                  tokenizer_path=cfg.model.tokenizer_path or cfg.model.path, dtype=dtype,
                                  param_dtype=cfg.ref_dtype or cfg.model.param_dtype)
    return common.load_model(ref_cfg, mesh=mesh, head="lm")


def completion_width(data_cfg) -> Optional[int]:
    """Positions per row the LM head must score: the encoder caps completions at ``data.max_completion_len``
    (None when that cap does not shorten the ``max_seq_len − 1`` scored positions)."""
    return data_cfg.max_completion_len if data_cfg.max_completion_len < data_cfg.max_seq_len - 1 else None


def _ordered(it: BatchIterator) -> BatchIterator:
    return BatchIterator(it.data, it.cfg, batch_size=it.batch_size, pad_id=it.pad_id, process_index=it.process_index,
                         process_count=it.process_count, shuffle=False, drop_last=False, num_epochs=1)


def _maybe(it: Optional[BatchIterator]) -> Optional[pc.RefStream]:
    return None if it is None else pc.RefStream(it)


def reference_streams(cfg: DPOConfig, splits, mesh, out: pathlib.Path):
    """(train stream, eval stream or None, attach) where `attach(batch)` fills live reference values
    (identity when precomputed or reference-free)."""
    def identity(batch):
        return batch

    if not cfg.loss.needs_reference:
        return pc.RefStream(splits.train), _maybe(splits.eval), identity
    ref = _reference(cfg, mesh)
    width = completion_width(cfg.data)
    if not cfg.precompute_ref_logps:
        attach = pc.make_ref_attacher(ref.model, mesh=mesh, params_shardings=ref.shardings,
                                      num_chunks=cfg.num_micro_batches, completion_width=width)
        return (pc.RefStream(splits.train), _maybe(splits.eval),
                lambda batch: attach(ref.params, batch))
    scores = shd.jit_sharded(lambda p, b: pc.reference_logps(ref.model, p, b, num_chunks=cfg.num_micro_batches,
                                                             completion_width=width),
                             mesh, in_shardings=(ref.shardings, shd.batch_sharding(mesh)),
                             out_shardings=shd.replicated(mesh))
    cache = pathlib.Path(cfg.ref_logps_cache_dir or out / "ref_logps")
    path = cfg.ref_model_path or cfg.model.path
    dtype = cfg.ref_dtype or cfg.model.dtype

    def values(it: BatchIterator):
        key = pc.ref_cache_key(it.data, cfg.data.max_seq_len, path, dtype)
        return pc.precompute_ref_logps(_ordered(it), scores, ref.params, mesh=mesh, cache_dir=cache, key=key)

    train_stream = pc.RefStream(splits.train, values(splits.train))
    eval_stream = None if splits.eval is None else pc.RefStream(splits.eval, values(splits.eval))
    del ref  # the reference leaves memory: training reads the cached values only
    return train_stream, eval_stream, identity


def train(cfg: DPOConfig, *, stop_at_step: Optional[int] = None) -> dict:
    """Run the preference trainer; returns the last metrics plus `output_dir`/`export_dir` paths."""
    out = common.start_run(cfg, cfg.run)
    mesh = common.make_mesh(cfg.mesh)
    loaded = common.load_model(cfg.model, mesh=mesh, head="lm")
    host_bs = common.host_batch_size(cfg.batch_size, mesh)
    eval_bs = common.host_batch_size(cfg.eval_batch_size or cfg.batch_size, mesh)
    splits = build_data(cfg.data, loaded.tokenizer, task=cfg.task, batch_size=host_bs, eval_batch_size=eval_bs,
                        process_index=jax.process_index(), process_count=jax.process_count())
    if distributed.is_main_process():
        print(f"[rlhf_jax] train data: {splits.stats.summary()}", flush=True)
    train_stream, eval_stream, attach = reference_streams(cfg, splits, mesh, out)
    total = common.total_steps_of(cfg.run, splits.train.batches_per_epoch)
    tx = make_optimizer(cfg.optim, total)
    state, state_sh = create_train_state(loaded.params, tx, mesh=mesh, params_shardings=loaded.shardings)
    loss_fn = make_loss_fn(loaded.model, cfg.loss, completion_width=completion_width(cfg.data))
    step = make_train_step(loss_fn, tx=tx, num_micro_batches=cfg.num_micro_batches,
                           lr_schedule=make_schedule(cfg.optim, total), mesh=mesh, state_shardings=state_sh)
    kto = cfg.loss.algorithm == "kto"

    def describe(m: StepMetrics) -> dict[str, float]:
        return {**common.base_metrics(m), **preference_metrics(float(m.loss) * float(m.aux.pairs), m.aux, kto=kto)}

    evaluate = None
    if eval_stream is not None:
        eval_step = make_eval_step(lambda p, b: loss_fn(p, b, None), mesh=mesh, params_shardings=loaded.shardings)

        def evaluate(state) -> dict[str, float]:
            (loss_sum, _), aux = common.sum_over(lambda p, b: eval_step(p, attach(b)), state.params, eval_stream, mesh)
            return preference_metrics(loss_sum, aux, kto=kto)

    spec = common.LoopSpec(run=cfg.run, output_dir=out, mesh=mesh,
                           train_step=lambda s, b, k: step(s, attach(b), k), batches=train_stream,
                           total_steps=total, describe=describe, evaluate=evaluate, stop_at_step=stop_at_step,
                           name=cfg.loss.algorithm)
    state, latest = common.train_loop(spec, state)
    result = {**latest, "output_dir": str(out), "steps": int(state.step), "data": splits.stats.as_dict()}
    if cfg.export and int(state.step) == total:
        result["export_dir"] = str(common.export_model(loaded, state.params, out / "model"))
    return result
