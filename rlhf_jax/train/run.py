"""Run plumbing every recipe shares: the run folder, the mesh, model loading onto it, export.

    out = start_run(cfg, cfg.run)                                   # folder, lock (config.yaml: run_loop)
    mesh = make_mesh(cfg.mesh)
    loaded = load_model(cfg.model, mesh=mesh, head="lm")            # params born on the mesh
    ...                                                             # the recipe's step
    train.loop.run_loop(Loop(..., export=lambda s: export_model(loaded, s.params, out / "model")), state)
"""

from __future__ import annotations

import atexit
import dataclasses
import fnmatch
import json
import os
import pathlib
import shutil
import socket
import time
from typing import Any, Callable, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from rlhf_jax.runtime import distributed
from rlhf_jax import sharding as shd
from rlhf_jax.config import save_config, to_dict
from rlhf_jax.models.lora import LoRAConfig
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
    lora: Optional[LoRAConfig] = None  # low-rank adapters: only they (and a scalar head) train; null = full fine-tune
    base_dtype: Optional[Literal["float32", "bfloat16"]] = None  # with lora: storage dtype of the frozen base

    def __post_init__(self):
        if not self.path:
            raise ValueError("model.path must name a Hugging Face model folder")

    def program_dtypes(self, *frozen: Optional[str]) -> dict:
        """``compute_dtype`` and ``stored_dtypes`` (params, LoRA base, and the ``frozen`` copies' dtypes) of the
        programs that run this model: the keywords of `runtime.xla.compiler_options` / `make_train_step`."""
        stored = (self.param_dtype, self.base_dtype if self.lora is not None else None, *frozen)
        return {"compute_dtype": self.dtype, "stored_dtypes": stored}


# ---------------------------------------------------------------------------------------------- setup
LOCK_FILE = "run.lock"
#: Run files a `run.resume=never run.overwrite=true` start clears (nothing else in the folder is touched).
RUN_FILES = ("checkpoints", "metrics.jsonl", "samples.jsonl", "tensorboard", "model", "config.yaml", "plots")
#: Keys a resume may change freely: cadence, logging and where the run lives; any other difference from the
#: saved config.yaml changes the math and is refused unless `run.allow_config_change=true`.
RESUME_FREE_KEYS = ("run.total_steps", "run.log_every", "run.eval_every", "run.save_every", "run.keep_last_n",
                    "run.progress", "run.tensorboard", "run.wandb*", "sample_every", "num_samples", "run.resume",
                    "run.output_dir", "run.preempt_grace_s", "run.allow_config_change", "run.overwrite")
_PENDING_CONFIG: dict[pathlib.Path, Any] = {}  # output_dir -> config, written by run_loop once the run starts


def start_run(cfg: Any, run: RunConfig) -> pathlib.Path:
    """Prepare `run.output_dir` (main process): check it is a writable folder, take its lock (one run per
    folder), apply `run.resume=never` / `run.overwrite`, remove stale temporary exports. `config.yaml` is
    written later, by `train.loop.run_loop`, once the run is known to start. Returns the folder.

    Raises (on every process, so none is left waiting in a collective):
      ValueError: the folder is a file or not writable, another live run holds it, or `run.resume=never`
        on a folder with a previous run's files and no `run.overwrite=true`.
    """
    out = pathlib.Path(run.output_dir)
    error = None
    if distributed.is_main_process():
        try:
            _prepare_output_dir(out, run)
        except ValueError as e:
            error = str(e)
    if jax.process_count() > 1:
        error = distributed.allgather_objects(error)[0]
    if error:
        raise ValueError(error)
    _PENDING_CONFIG[out.absolute()] = cfg
    return out


def _prepare_output_dir(out: pathlib.Path, run: RunConfig) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"run.output_dir {out} is a file, not a folder; choose another run.output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create run.output_dir {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"run.output_dir {out} is not writable by this user; choose another run.output_dir")
    acquire_lock(out)
    if run.resume == "never":
        previous = [n for n in RUN_FILES if (out / n).exists()]
        if previous and not run.overwrite:
            raise ValueError(f"run.output_dir {out} already holds a run ({', '.join(previous)}) and run.resume=never: "
                             "set run.overwrite=true to replace it, or choose another run.output_dir")
        for name in previous:
            (shutil.rmtree if (out / name).is_dir() else os.remove)(out / name)
        if previous:
            print(f"[rlhf_jax] run.overwrite=true: removed the previous run's {', '.join(previous)} from {out}",
                  flush=True)
    for stale in sorted(out.glob(".*.tmp-*")) + sorted(out.glob(".*.old-*")):  # exports a killed run left
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        print(f"[rlhf_jax] removed {stale} (temporary export folder left by an interrupted run)", flush=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(out: pathlib.Path) -> None:
    """Take `out/run.lock` (host, pid) for this process; refuse a folder whose lock a live process holds.

    A lock of this process is kept; one of a dead pid on this host is taken over with a message; one from
    another host is refused (its liveness cannot be checked: remove the file if that run is gone). The lock
    is removed when this process exits normally (a killed run leaves it, and the next start takes it over).
    """
    path = out / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
                host, pid = str(owner["host"]), int(owner["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                owner, host, pid = None, "?", -1
            if owner is not None and host == me["host"] and pid == me["pid"]:
                return  # this process already holds it (a second run in the same process)
            if owner is not None and (host != me["host"] or _pid_alive(pid)):
                started = owner.get("started", "?")
                raise ValueError(f"run.output_dir {out} is in use by pid {pid} on host {host} (started {started}); "
                                 f"wait for that run or stop it, or choose another run.output_dir (if it is gone, "
                                 f"delete {path})")
            why = "unreadable" if owner is None else f"of pid {pid}, which is no longer running"
            print(f"[rlhf_jax] taking over the stale lock {path} ({why})", flush=True)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({**me, "started": time.strftime("%Y-%m-%d %H:%M:%S")}, f)
        atexit.register(release_lock, out)
        return
    raise ValueError(f"could not take the lock {path}: another process keeps creating it")


def release_lock(out: pathlib.Path) -> None:
    """Remove `out/run.lock` if this process holds it."""
    path = out / LOCK_FILE
    try:
        owner = json.loads(path.read_text())
        if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            path.unlink()
    except (OSError, ValueError):
        pass


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_differences(saved: dict, now: dict) -> list[str]:
    """'key: saved -> now' for every key present in both whose value differs (minus `RESUME_FREE_KEYS`)."""
    a, b = _flat(saved), _flat(now)
    free = lambda k: any(fnmatch.fnmatchcase(k, p) for p in RESUME_FREE_KEYS)  # noqa: E731
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in b if k in a and not free(k) and a[k] != b[k]]


def commit_config(out: pathlib.Path, run: RunConfig, *, resuming: bool) -> None:
    """Called by `run_loop` once the run starts (models and data loaded, resume resolved): refuse a resume
    whose config differs from the saved `config.yaml` in a key that changes the math (unless
    `run.allow_config_change=true`), then write `config.yaml` (main process)."""
    cfg = _PENDING_CONFIG.pop(pathlib.Path(out).absolute(), None)
    if cfg is None:
        return
    path = pathlib.Path(out) / "config.yaml"
    now = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))  # the round trip saved configs went through
    diffs = config_differences(yaml.safe_load(path.read_text()) or {}, now) if resuming and path.exists() else []
    if jax.process_count() > 1:  # every process has read the old file before process 0 replaces it
        diffs = distributed.allgather_objects(diffs)[0]
    if diffs and not run.allow_config_change:
        raise ValueError(f"resuming {out} with a config that differs from its config.yaml: {'; '.join(diffs)}; "
                         "set run.allow_config_change=true to resume anyway, or choose a new run.output_dir")
    if diffs and distributed.is_main_process():
        print(f"[rlhf_jax] run.allow_config_change=true: resuming with {'; '.join(diffs)}", flush=True)
    if distributed.is_main_process():
        save_config(cfg, path)


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
    load_config: Any = None  # the ModelLoadConfig it came from (LoRA exports read it)


def load_tokenizer(path: str):
    """Hugging Face tokenizer from a local folder (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_model(model_cfg: ModelLoadConfig, *, mesh: jax.sharding.Mesh, head: str,
               rules: shd.Rules = shd.LOGICAL_RULES) -> LoadedModel:
    """Load a HF folder as `head` ("lm" or "scalar") and place its params with the logical-axis rules."""
    from rlhf_jax import models

    # Each param is born sharded: every host reads only its devices' slices of the safetensors.
    param_dtype = None if model_cfg.param_dtype is None else jnp.dtype(model_cfg.param_dtype)
    base_dtype = None if model_cfg.lora is None or model_cfg.base_dtype is None else jnp.dtype(model_cfg.base_dtype)
    model, params = models.load_pretrained(
        model_cfg.path, dtype=jnp.dtype(model_cfg.dtype), head=head, remat=model_cfg.remat,
        scan_layers=model_cfg.scan_layers, param_dtype=base_dtype or param_dtype,
        shardings=lambda m: shd.param_shardings(m, mesh, rules=rules))
    if model_cfg.lora is not None:
        from rlhf_jax.train.lora_load import attach_adapters

        model, params = attach_adapters(model, params, model_cfg.lora, mesh=mesh, rules=rules,
                                        param_dtype=param_dtype or jnp.dtype(model_cfg.dtype))
    shardings = jax.tree.map(lambda x: x.sharding, params)
    tokenizer = load_tokenizer(model_cfg.tokenizer_path or model_cfg.path)
    return LoadedModel(model=model, params=params, shardings=shardings, tokenizer=tokenizer, load_config=model_cfg)


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
    """Save `params` as a Hugging Face folder with the tokenizer (main process writes); returns the folder.

    With LoRA: the merged model (W + (alpha/r) A B) by default, or a PEFT adapter folder with
    `model.lora.export_format=peft` (`train/lora_load.py`)."""
    from rlhf_jax import models

    directory = pathlib.Path(directory)
    if loaded.model.config.lora is not None:
        from rlhf_jax.train.lora_load import export_lora

        what = export_lora(loaded, params, directory)
    else:  # every process: gathers tensor by tensor (collectives); process 0 writes
        models.save_pretrained(directory, loaded.model, params, tokenizer=loaded.tokenizer)
        what = "Hugging Face model"
    if distributed.is_main_process():
        if extra_config and (directory / "config.json").exists():
            update_hf_config(directory, extra_config)
        print(f"[rlhf_jax] exported {what} to {directory}", flush=True)
    return directory


def export_policy(loaded: LoadedModel, state: Any, out: pathlib.Path | str) -> pathlib.Path:
    """`export_model` of a train state's params to `out/model`, and of its EMA (if kept) to `out/model_ema`."""
    from rlhf_jax.train.state import ema_params

    out = pathlib.Path(out)
    if state.ema is not None:
        export_model(loaded, ema_params(state), out / "model_ema")
    return export_model(loaded, state.params, out / "model")


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








