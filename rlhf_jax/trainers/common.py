"""Driver pieces every trainer shares: run folder, mesh, model loading, sharded state, resume, host loop.

A trainer (`sft.py`, `rm.py`, later `ppo.py`, ...) is a short script over these pieces:

    out = start_run(cfg, cfg.run)                                   # folder + config.yaml
    mesh = make_mesh(cfg.mesh)
    loaded = load_model(cfg.model, mesh=mesh, head="lm")            # params born on the mesh
    state, state_sh = create_train_state(loaded.params, tx, mesh=mesh, params_shardings=loaded.shardings)
    step = make_train_step(loss_fn, tx=tx, mesh=mesh, state_shardings=state_sh, ...)
    state = train_loop(LoopSpec(...), state)                        # resume, log, eval, checkpoint

The host loop follows STYLE.md §12: it dispatches step N, then fetches step N-1's metrics (a few scalars),
so the device never waits for the host; the non-finite "stop" check therefore fires one step late, and
the loop flushes the pending metrics before every checkpoint so a bad step can never be saved.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import distributed
from rlhf_jax import sharding as shd
from rlhf_jax.checkpoint import Checkpointer, abstract_like, resolve_resume
from rlhf_jax.config import save_config
from rlhf_jax.run_config import RunConfig
from rlhf_jax.train.metrics import MetricsLogger, Progress
from rlhf_jax.train.state import TrainState
from rlhf_jax.train.step import StepMetrics, check_finite


@dataclasses.dataclass(frozen=True)
class ModelLoadConfig:
    """Which pretrained model to start from."""

    path: str = ""  # Hugging Face model folder (config.json + *.safetensors), e.g. an SFT export
    tokenizer_path: Optional[str] = None  # tokenizer folder; null = `path`
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype (bf16 on TPU/GPU; f32 on CPU)
    param_dtype: Optional[Literal["float32", "bfloat16"]] = None  # storage dtype of params; null = `dtype`
    remat: str = "none"  # activation checkpointing: "none", "full" or a jax.checkpoint_policies name
    scan_layers: bool = False  # nn.scan over layers (one compiled block; faster compiles for deep models)

    def __post_init__(self):
        if not self.path:
            raise ValueError("model.path must name a Hugging Face model folder")


# ---------------------------------------------------------------------------------------------- setup
def start_run(cfg: Any, run: RunConfig) -> pathlib.Path:
    """Create `run.output_dir`, write the resolved `config.yaml` there (main process); return the folder."""
    out = pathlib.Path(run.output_dir)
    if distributed.is_main_process():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    return out


def make_mesh(mesh_cfg: shd.MeshConfig) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh over all devices."""
    return shd.make_mesh(mesh_cfg)


def host_batch_size(global_batch_size: int, mesh: jax.sharding.Mesh) -> int:
    """Rows this host loads per step: the global batch split over the hosts' data shards."""
    _, num_shards = shd.host_data_shard(mesh)
    if global_batch_size % num_shards:
        raise ValueError(f"batch_size {global_batch_size} is not divisible by the {num_shards} host data shards")
    return global_batch_size // num_shards


@dataclasses.dataclass
class LoadedModel:
    """A model definition with its params placed on the mesh."""

    model: Any  # rlhf_jax.models.Transformer
    params: Any
    shardings: Any  # NamedShardings of params
    tokenizer: Any


def load_tokenizer(path: str):
    """Hugging Face tokenizer from a local folder (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(model_cfg: ModelLoadConfig, *, mesh: jax.sharding.Mesh, head: str,
               rules: shd.Rules = shd.LOGICAL_RULES) -> LoadedModel:
    """Load a HF folder as `head` ("lm" or "scalar") and place its params with the logical-axis rules."""
    from rlhf_jax import models

    # Each param is born sharded: every host reads only its devices' slices of the safetensors.
    model, params = models.load_pretrained(
        model_cfg.path, dtype=jnp.dtype(model_cfg.dtype), head=head, remat=model_cfg.remat,
        scan_layers=model_cfg.scan_layers,
        param_dtype=None if model_cfg.param_dtype is None else jnp.dtype(model_cfg.param_dtype),
        shardings=lambda m: shd.param_shardings(m, mesh, rules=rules))
    shardings = jax.tree.map(lambda x: x.sharding, params)
    tokenizer = load_tokenizer(model_cfg.tokenizer_path or model_cfg.path)
    return LoadedModel(model=model, params=params, shardings=shardings, tokenizer=tokenizer)


def total_steps_of(run: RunConfig, batches_per_epoch: int) -> int:
    """`run.total_steps`, or `run.epochs` passes over the training data."""
    return run.total_steps if run.total_steps is not None else run.epochs * batches_per_epoch


# -------------------------------------------------------------------------------------------- export
def gather_to_host(tree: Any) -> Any:
    """Full numpy copies of (possibly multi-host sharded) arrays on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def update_hf_config(directory: pathlib.Path | str, extra: dict) -> None:
    """Merge `extra` keys into an exported model's config.json."""
    path = pathlib.Path(directory) / "config.json"
    config = json.loads(path.read_text())
    config.update(extra)
    path.write_text(json.dumps(config, indent=2) + "\n")


def export_model(loaded: LoadedModel, params: Any, directory: pathlib.Path | str, *,
                 extra_config: Optional[dict] = None) -> pathlib.Path:
    """Save `params` as a Hugging Face folder with the tokenizer (main process writes); returns the folder."""
    from rlhf_jax import models

    directory = pathlib.Path(directory)
    # Every process: gathers tensor by tensor (collectives); process 0 writes.
    models.save_pretrained(directory, loaded.model, params, tokenizer=loaded.tokenizer)
    if distributed.is_main_process():
        if extra_config:
            update_hf_config(directory, extra_config)
        print(f"[rlhf_jax] exported Hugging Face model to {directory}", flush=True)
    return directory


# ------------------------------------------------------------------------------------------ evaluation
def sum_over(eval_step: Callable, params: Any, batches: Any, mesh: jax.sharding.Mesh) -> Any:
    """Run `eval_step(params, batch) -> sums` over one pass of `batches` (rewound first); host numpy sums."""
    if hasattr(batches, "restore"):
        batches.restore({"epoch": 0, "index": 0})
    total = None
    for batch in batches:
        out = eval_step(params, shd.shard_batch(batch, mesh))
        total = out if total is None else jax.tree.map(jnp.add, total, out)
    if total is None:
        raise ValueError("evaluation data yielded no batch")
    return jax.tree.map(np.asarray, jax.device_get(total))


# --------------------------------------------------------------------------------------------- logging
def truncate_metrics(path: pathlib.Path, *, after_step: int) -> None:
    """Drop metrics.jsonl records with step > `after_step` (main process): a run killed after logging step
    j > k and resumed from checkpoint k then logs each step exactly once."""
    if distributed.is_main_process() and path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= after_step]
        path.write_text("".join(ln + "\n" for ln in keep))


def read_jsonl(path: pathlib.Path | str) -> list[dict]:
    """All records of a metrics.jsonl."""
    return [json.loads(ln) for ln in pathlib.Path(path).read_text().splitlines() if ln.strip()]


def base_metrics(m: StepMetrics) -> dict[str, float]:
    """loss / grad_norm / lr / count / skipped of fetched step metrics (logged under split "train")."""
    out = {"loss": float(m.loss), "grad_norm": float(m.grad_norm), "count": float(m.count),
           "skipped_updates": float(m.num_skipped)}
    if m.lr is not None:
        out["lr"] = float(m.lr)
    return out


# ------------------------------------------------------------------------------------------- host loop
@dataclasses.dataclass
class LoopSpec:
    """What `train_loop` needs (all host-side objects; nothing here crosses jit).

    Attributes:
      run: RunConfig (seed, logging/eval/save cadence, nan policy, resume).
      output_dir: run folder (metrics.jsonl, checkpoints/).
      mesh: device mesh (batches are placed with `sharding.shard_batch`).
      train_step: jitted `(state, batch, key) -> (state, StepMetrics)`.
      batches: checkpointable iterator of host batches (`state()` / `restore()`).
      total_steps: optimizer steps of the whole run.
      describe: fetched StepMetrics -> named floats, logged under split "train".
      evaluate: optional `state -> named floats`, logged under split "eval" every `run.eval_every` steps and
        at the end.
      stop_at_step: stop after this step as if killed (tests); checkpoints as usual until then.
      extra_meta: optional `() -> dict` saved in the checkpoint meta (e.g. a KL controller's host state).
      name: label of the progress bar.
    """

    run: RunConfig
    output_dir: pathlib.Path
    mesh: jax.sharding.Mesh
    train_step: Callable
    batches: Any
    total_steps: int
    describe: Callable[[StepMetrics], dict[str, float]] = base_metrics
    evaluate: Optional[Callable[[TrainState], dict[str, float]]] = None
    stop_at_step: Optional[int] = None
    extra_meta: Optional[Callable[[], dict]] = None
    name: str = "train"


def restore_if_any(spec: LoopSpec, state: TrainState, ckpt: Checkpointer) -> tuple[TrainState, int]:
    """Apply `run.resume`: restore state + data position from the chosen checkpoint; returns (state, step)."""
    found = resolve_resume(spec.run.resume, ckpt.directory)
    if found is None:
        return state, 0
    directory, step = found
    source = ckpt if directory == ckpt.directory else Checkpointer(directory, read_only=True)
    state, meta = source.restore(step, target=abstract_like(state))
    spec.batches.restore(meta["data"])
    if distributed.is_main_process():
        print(f"[rlhf_jax] resumed from {directory}/{step} (data position {meta['data']})", flush=True)
    return state, int(state.step)


def train_loop(spec: LoopSpec, state: TrainState) -> tuple[TrainState, dict[str, float]]:
    """Resume, then step until `total_steps`: log, evaluate and checkpoint on the run's cadence.

    Returns:
      (final state, latest metrics as "<split>/<name>" floats, the final evaluation included).
    """
    run = spec.run
    ckpt = Checkpointer(spec.output_dir / "checkpoints", keep_last_n=run.keep_last_n,
                        keep_best_metric=run.keep_best_metric, keep_best_mode=run.keep_best_mode)
    state, start = restore_if_any(spec, state, ckpt)
    truncate_metrics(spec.output_dir / "metrics.jsonl", after_step=start)
    main = distributed.is_main_process()
    logger = MetricsLogger(spec.output_dir, tensorboard=run.tensorboard, wandb=run.wandb,
                           wandb_project=run.wandb_project, is_main=main)
    progress = Progress(spec.total_steps, desc=spec.name, enabled=run.progress, is_main=main, initial=start)
    key = jax.random.key(run.seed)
    last = min(spec.total_steps, spec.stop_at_step or spec.total_steps)
    pending: Optional[StepMetrics] = None
    latest: dict[str, float] = {}
    skips = 0
    clock = [time.perf_counter(), start]

    def flush() -> None:  # fetch and report the pending step's metrics (a few scalars)
        nonlocal pending, skips
        if pending is None:
            return
        m, pending = jax.device_get(pending), None
        check_finite(m, nan_policy=run.nan_policy)
        skips = 0 if bool(m.finite) else skips + 1
        if skips >= run.max_nan_skips:
            raise RuntimeError(f"{skips} consecutive non-finite steps (last at step {int(m.step)}); stopping")
        done = int(m.step) + 1
        values = spec.describe(m)
        progress.update(1, loss=values["loss"])
        if done % run.log_every == 0 or done == last:
            now = time.perf_counter()
            values["steps_per_s"] = (done - clock[1]) / max(now - clock[0], 1e-9)
            clock[:] = [now, done]
            latest.update({f"train/{k}": v for k, v in logger.log(done, values).items()})

    try:
        for step in range(start, last):
            batch = shd.shard_batch(next(spec.batches), spec.mesh)
            state, metrics = spec.train_step(state, batch, key)
            flush()  # step N-1's metrics, while step N runs
            pending = metrics
            done = step + 1
            every = lambda n: bool(n) and done % n == 0  # noqa: E731
            want_eval = spec.evaluate is not None and (done == spec.total_steps or every(run.eval_every))
            want_save = done == last or every(run.save_every)
            if want_eval or want_save:
                flush()  # a non-finite step raises here, before anything is saved
            if want_eval:
                ev = logger.log(done, spec.evaluate(state), split="eval")
                latest.update({f"eval/{k}": v for k, v in ev.items()})
                if main:
                    print(f"[{spec.name} eval @ {done}] " + _short(ev), flush=True)
            if want_save:
                meta = {"data": spec.batches.state(), "step": done, **(spec.extra_meta() if spec.extra_meta else {})}
                ckpt.save(done, state, meta=meta, metrics=dict(latest))
        flush()
    finally:
        progress.close()
        logger.close()
        ckpt.close()
    return state, latest


def _short(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
