"""Run plumbing every recipe shares: the run folder, the mesh, model loading onto it, export.

    out = start_run(cfg, cfg.run)                                   # folder + config.yaml
    mesh = make_mesh(cfg.mesh)
    loaded = load_model(cfg.model, mesh=mesh, head="lm")            # params born on the mesh
    ...                                                             # the recipe's step
    train.loop.run_loop(Loop(..., export=lambda s: export_model(loaded, s.params, out / "model")), state)
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Callable, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.runtime import distributed
from rlhf_jax import sharding as shd
from rlhf_jax.config import save_config
from rlhf_jax.run_config import RunConfig
from rlhf_jax.train.step import StepMetrics


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
    j > k and resumed from checkpoint k then logs each step exactly once. The kept records go to a new file
    that replaces the old one atomically (a kill never leaves a truncated file); a torn last line (a kill
    mid-write) is dropped with a warning naming the file."""
    if not distributed.is_main_process() or not path.exists():
        return
    keep, lines = [], path.read_text().splitlines()
    for n, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            record = json.loads(ln)
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                print(f"[rlhf_jax] warning: {path}: dropped a torn last line (line {n + 1})", flush=True)
                continue
            raise ValueError(f"{path}: line {n + 1} is not JSON; fix or remove it to resume") from None
        if record.get("step", 0) <= after_step:
            keep.append(ln)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


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








