"""`rlhf-jax dpo`: offline preference optimisation — DPO (every TRL loss type), SimPO, ORPO, KTO.

The losses are ``rlhf_jax.algos.preference``. The reference comes from a frozen model
(``ref_model_path``, default the policy's starting point; optionally bf16) whose params are a `jit`
argument, or — ``precompute_ref_logps: true`` — from one pass over the train and eval sets before
training, cached on disk under a dataset + model fingerprint, after which the reference model is dropped
(``rlhf_jax.train.reference``). With ``model.lora`` (and no ``ref_model_path``) the reference is the policy's
own frozen base with the adapters off (PEFT ``disable_adapter``, as TRL's ``DPOTrainer`` with a PEFT model):
no second copy of the base is loaded, live or precomputed. Logged: loss, reward accuracy (TRL: r_c > r_r strictly), chosen/rejected
rewards, margin, chosen/rejected policy log-probs (and z₀ for KTO), on train and held-out data. The
policy is exported with `save_pretrained` to ``<output_dir>/model``.

TRL's DPO options are ``loss.*`` keys with TRL's names (``loss_type`` list + ``loss_weights``, ``rpo_alpha``,
``use_weighting``, ``ld_alpha``; ``kto_kl_pairs``, ``orpo_sft``): see ``rlhf_jax.algos.preference``.

Usage: `rlhf-jax dpo configs/dpo_tiny_cpu.yaml model.path=runs/sft/model loss.loss_type=ipo`
(MPO: `loss.loss_type=[sigmoid,bco_pair,sft] loss.loss_weights=[0.8,0.2,1.0]`; RPO: `loss.rpo_alpha=1.0`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Literal, Optional

import jax

from rlhf_jax.runtime import distributed, xla
from rlhf_jax import sharding as shd
from rlhf_jax.algos.preference import PreferenceLossConfig, make_loss_fn, preference_metrics
from rlhf_jax.config import require
from rlhf_jax.data import BatchIterator, DataConfig, build_data
from rlhf_jax.models.shared_prompt import differentiable
from rlhf_jax.run_config import OptimConfig, RunConfig
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.train import reference as pc
from rlhf_jax.train import run as common
from rlhf_jax.train.loop import Loop, batch_steps, run_loop
from rlhf_jax.train.optim import make_optimizer, make_schedule
from rlhf_jax.train.state import create_train_state
from rlhf_jax.train.step import StepMetrics, make_eval_step, make_train_step





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
    share_prompt: bool = True  # pairs encode their prompt once where that saves >= 1/4 of the tokens (same values)
    export: bool = True  # write the policy as a Hugging Face folder to <output_dir>/model

    def __post_init__(self):
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.num_micro_batches >= 1, "num_micro_batches", f"must be >= 1, got {self.num_micro_batches}")
        require(self.batch_size % self.num_micro_batches == 0, "num_micro_batches",
                f"must divide batch_size={self.batch_size}, got {self.num_micro_batches}")
        require(not self.precompute_ref_logps or self.loss.needs_reference, "precompute_ref_logps",
                f"{self.loss.algorithm} is reference-free; set false")
        require(not self.precompute_ref_logps or self.loss.kto_kl_pairs == "dataset", "precompute_ref_logps",
                "loss.kto_kl_pairs=batch pairs KL rows by batch, so their reference values cannot be precomputed")
        require(not self.reference_is_adapters_off or self.ref_dtype is None, "ref_dtype",
                "with model.lora the reference is the policy's base with the adapters off (its dtype is "
                "model.base_dtype); set null, or set ref_model_path for a separate reference model")

    @property
    def reference_is_adapters_off(self) -> bool:
        """The reference is the policy's frozen base with the adapters off (``model.lora``, no ``ref_model_path``)."""
        return self.model.lora is not None and self.ref_model_path is None and self.loss.needs_reference

    @property
    def task(self) -> str:
        """Batch kind the data must make."""
        return "unpaired" if self.loss.algorithm == "kto" else "preference"














# ------------------------------------------------------------------------------------------- driver
def _reference(cfg: DPOConfig, mesh) -> common.LoadedModel:
    dtype = cfg.ref_dtype or cfg.model.dtype
    ref_cfg = dataclasses.replace(cfg.model, path=cfg.ref_model_path or cfg.model.path,
                                  tokenizer_path=cfg.model.tokenizer_path or cfg.model.path, dtype=dtype,
                                  param_dtype=cfg.ref_dtype or cfg.model.param_dtype, lora=None)
    return common.load_model(ref_cfg, mesh=mesh, head="lm")


def completion_width(data_cfg) -> Optional[int]:
    """Positions per row the LM head must score: the encoder caps completions at ``data.max_completion_len``
    (None when that cap does not shorten the ``max_seq_len − 1`` scored positions)."""
    return data_cfg.max_completion_len if data_cfg.max_completion_len < data_cfg.max_seq_len - 1 else None


def shared_prompt_width(cfg: DPOConfig) -> Optional[int]:
    """``data.max_prompt_len`` = P when each pair's prompt is encoded once for its chosen and rejected rows, and
    KTO's for a row and its KL row (prompt b with another row's completion)
    (`algos.preference_rows.completion_token_logps`; as ``algo.share_prompt`` for GRPO's groups), else None.

    Needs ``share_prompt``, the LM head on W = ``data.max_completion_len`` positions,
    and P + 2W tokens per pair at most 3/4 of the stacked rows' 2 · ``data.max_seq_len``: the prompt's cache is
    copied to both rows and the completions attend to it. At 3/4 (64-token prompts and completions, 128-token
    rows) the tiny benchmark model's step takes 21 % less and ~100M's 12 % less; at 5/6 the tiny step 5 % less,
    at 11/12 nothing (``benchmarks/README.md``).
    Not with scanned, rematerialized layers (`models.shared_prompt.differentiable`).
    """
    width = completion_width(cfg.data)
    if not cfg.share_prompt or width is None or not differentiable(cfg.model):
        return None
    P = cfg.data.max_prompt_len
    return P if 4 * (P + 2 * width) <= 3 * 2 * cfg.data.max_seq_len else None


def _ordered(it: BatchIterator) -> BatchIterator:
    return BatchIterator(it.data, it.cfg, batch_size=it.batch_size, pad_id=it.pad_id, process_index=it.process_index,
                         process_count=it.process_count, shuffle=False, drop_last=False, num_epochs=1)


def _maybe(it: Optional[BatchIterator], kl_pairs: str = "dataset") -> Optional[pc.RefStream]:
    return None if it is None else pc.RefStream(it, kl_pairs=kl_pairs)


def reference_streams(cfg: DPOConfig, splits, mesh, out: pathlib.Path, policy: common.LoadedModel):
    """(train stream, eval stream or None, attach) where `attach(params, batch)` fills live reference values
    (``params``: the policy's current params, read only when the reference is their adapters-off base;
    identity when precomputed or reference-free). ``policy``: the loaded policy (before training)."""
    def identity(params, batch):
        return batch

    pairs = cfg.loss.kto_kl_pairs
    if not cfg.loss.needs_reference:
        return pc.RefStream(splits.train), _maybe(splits.eval), identity
    # model.lora: the policy's own params with the adapters off (`reference_logps` zeroes B); no second base
    own = cfg.reference_is_adapters_off
    ref = policy if own else _reference(cfg, mesh)
    width, pw = completion_width(cfg.data), shared_prompt_width(cfg)
    options = xla.compiler_options(compute_dtype=ref.model.config.dtype, stored_dtypes=xla.leaf_dtypes(ref.params))
    if not cfg.precompute_ref_logps:
        attach = pc.make_ref_attacher(ref.model, mesh=mesh, params_shardings=ref.shardings,
                                      num_chunks=cfg.num_micro_batches, completion_width=width,
                                      ld_alpha=cfg.loss.ld_alpha, compiler_options=options, prompt_width=pw)
        # the policy's params are donated by each step: the adapters-off reference reads the current ones
        return (pc.RefStream(splits.train, kl_pairs=pairs), _maybe(splits.eval, pairs),
                (lambda params, batch: attach(params, batch)) if own else
                (lambda params, batch: attach(ref.params, batch)))
    scores = shd.jit_sharded(lambda p, b: pc.reference_logps(ref.model, p, b, num_chunks=cfg.num_micro_batches,
                                                             completion_width=width, ld_alpha=cfg.loss.ld_alpha,
                                                             prompt_width=pw),
                             mesh, in_shardings=(ref.shardings, shd.batch_sharding(mesh)),
                             out_shardings=shd.replicated(mesh), compiler_options=options)
    cache = pathlib.Path(cfg.ref_logps_cache_dir or out / "ref_logps")
    path = cfg.ref_model_path or cfg.model.path
    dtype = cfg.ref_dtype or cfg.model.dtype
    if own:  # the base's storage dtype changes the values too
        dtype = f"{dtype}|lora_base={cfg.model.base_dtype}"

    def values(it: BatchIterator):
        key = pc.ref_cache_key(it.data, cfg.data.max_seq_len, path, dtype, ld_alpha=cfg.loss.ld_alpha)
        return pc.precompute_ref_logps(_ordered(it), scores, ref.params, mesh=mesh, cache_dir=cache, key=key)

    train_stream = pc.RefStream(splits.train, values(splits.train))
    eval_stream = None if splits.eval is None else pc.RefStream(splits.eval, values(splits.eval))
    del ref  # a separate reference leaves memory: training reads the cached values only
    return train_stream, eval_stream, identity


def build_steps(cfg: DPOConfig, model, mesh, *, tx, state_sh, params_shardings, total: int):
    """The jitted ``(train_step, eval_step)`` of a preference run (also lowered, with abstract arguments, by
    ``rlhf-jax plan``); batches are ``PairBatch``/``KTOBatch`` with the reference values attached."""
    loss_fn = make_loss_fn(model, cfg.loss, completion_width=completion_width(cfg.data),
                           prompt_width=shared_prompt_width(cfg))
    step = make_train_step(loss_fn, tx=tx, num_micro_batches=cfg.num_micro_batches,
                           lr_schedule=make_schedule(cfg.optim, total), mesh=mesh, state_shardings=state_sh,
                           **cfg.model.program_dtypes())
    eval_step = make_eval_step(lambda p, b: loss_fn(p, b, None), mesh=mesh, params_shardings=params_shardings,
                               **cfg.model.program_dtypes())
    return step, eval_step


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
    train_stream, eval_stream, attach = reference_streams(cfg, splits, mesh, out, loaded)
    total = common.total_steps_of(cfg.run, splits.train.batches_per_epoch)
    tx = make_optimizer(cfg.optim, total)
    state, state_sh = create_train_state(loaded.params, tx, mesh=mesh, params_shardings=loaded.shardings)
    step, eval_step = build_steps(cfg, loaded.model, mesh, tx=tx, state_sh=state_sh,
                                  params_shardings=loaded.shardings, total=total)
    kto = cfg.loss.algorithm == "kto"

    def describe(m: StepMetrics) -> dict[str, float]:
        return {**common.base_metrics(m), **preference_metrics(float(m.loss) * float(m.aux.pairs), m.aux, kto=kto)}

    evaluate = None
    if eval_stream is not None:
        def evaluate(state) -> dict[str, float]:
            (loss_sum, _), aux = common.sum_over(lambda p, b: eval_step(p, attach(p, b)), state.params, eval_stream,
                                                 mesh)
            return preference_metrics(loss_sum, aux, kto=kto)

    loop = Loop(name=cfg.loss.algorithm, run=cfg.run, output_dir=out, total=total, data={"train": train_stream},
                step=batch_steps(step, train_stream, mesh, seed=cfg.run.seed,
                                 transform=lambda s, b: attach(s.params, b)), describe=describe,
                evaluate=evaluate, stop_at_step=stop_at_step,
                export=(lambda s: common.export_model(loaded, s.params, out / "model")) if cfg.export else None)
    res = run_loop(loop, state)
    result = {**res.latest, "output_dir": str(out), "steps": int(res.state.step), "data": splits.stats.as_dict()}
    if res.export_dir:
        result["export_dir"] = res.export_dir
    return result
