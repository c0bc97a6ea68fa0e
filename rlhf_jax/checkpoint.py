"""Checkpoints: the only module that talks to Orbax.

A checkpoint step holds two items:
  * ``state``: any pytree of arrays (params, optimizer state, step counter, RNG keys, controller state such
    as an adaptive-KL `NamedTuple`), written with `ocp.args.StandardSave` (sharded, async where available);
  * ``meta``: a JSON dict (data-iterator position, last metrics, config) written with `ocp.args.JsonSave`.

Restoring always needs an abstract *target* built from the live state (`abstract_like(state)`): it carries
the shardings (so a checkpoint can be restored onto another mesh) and the pytree types (without it Orbax
turns optax `NamedTuple`s into lists).

RNG keys: typed keys (`jax.random.key`) are stored as their raw `uint32` key data and re-wrapped with the
target's key implementation on restore, so the state may hold typed keys or raw `uint32` keys alike.

Atomicity: Orbax writes each step into ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete; a
process killed mid-save leaves the previous steps loadable, unfinished tmp dirs are never listed as steps
and are deleted when a `Checkpointer` next opens the directory (tests/test_checkpoint.py kills a saver).

Multi-process: every process must call `save`/`restore` with its own shards; Orbax coordinates the writes
(the primary process writes `meta` and metadata) and barriers across processes. Process-local arrays
(e.g. an unsharded `jnp.int32(step)`) are saved as numpy by the primary process and put back on the
target's device on restore: they must hold the same value on every process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from rlhf_jax import checkpoint_space as space
from rlhf_jax.models import lora

__all__ = ["Checkpointer", "abstract_like", "checkpoint_steps"]

log = logging.getLogger(__name__)


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_lora_params(x: Any) -> bool:
    """A model's params tree with LoRA adapters: only its trainable part is saved (`models.lora`)."""
    return isinstance(x, dict) and "embed" in x and lora.has_adapters(x)


def _drop_frozen(tree: Any) -> Any:
    return jax.tree.map(lambda x: lora.trainable(x) if _is_lora_params(x) else x, tree, is_leaf=_is_lora_params)


def _rejoin_frozen(restored: Any, target: Any) -> Any:
    """Put the target's (live) frozen base back next to the restored adapters."""
    return jax.tree.map(lambda t, r: lora.join(r, lora.split_trainable(t)[1]) if _is_lora_params(t) else r,
                        target, restored, is_leaf=_is_lora_params)


def abstract_like(state: Any) -> Any:
    """Restore target from a live state: `jax.ShapeDtypeStruct(shape, dtype, sharding)` per jax array.

    numpy arrays and Python scalars are kept as they are (Orbax restores them as the same type). The frozen
    base of a LoRA params tree is not checkpointed: it stays live in the target and is reused on restore.
    """

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    def node(x):
        if _is_lora_params(x):
            train, frozen = lora.split_trainable(x)
            return lora.join(jax.tree.map(leaf, train), frozen)
        return leaf(x)

    return jax.tree.map(node, state, is_leaf=_is_lora_params)


def _key_data_sharding(sharding: Any, ndim: int) -> Any:
    """Sharding for `key_data(k)`, which has one more trailing (unsharded) dim than the key array `k`."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim + 1 - len(sharding.spec))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return sharding  # single-device / replicated shardings apply to any rank


def _encode_keys(tree: Any) -> Any:
    """Typed PRNG keys → raw uint32 key data (Orbax stores plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _encode_key_targets(target: Any) -> Any:
    def leaf(x):
        if not _is_key(x):
            return x
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
        sharding = getattr(x, "sharding", None)
        if sharding is not None:
            sharding = _key_data_sharding(sharding, len(x.shape))
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)

    return jax.tree.map(leaf, target)


def _decode_keys(restored: Any, target: Any) -> Any:
    """Re-wrap key data as typed keys wherever the target holds a typed key (same implementation)."""

    def leaf(r, t):
        if not _is_key(t):
            return r
        return jax.random.wrap_key_data(r, impl=t.dtype._impl)

    return jax.tree.map(leaf, restored, target)


def _host_local(x: Any) -> bool:
    """A jax array (or abstract one) living only on this process's devices, in a multi-process run."""
    sharding = getattr(x, "sharding", None)
    return jax.process_count() > 1 and sharding is not None and sharding.is_fully_addressable


def _host_local_to_numpy(tree: Any) -> Any:
    """Multi-process Orbax cannot write process-local arrays (e.g. `jnp.int32(step)` on device 0): save
    them as numpy (the primary process writes; they must be equal on every process)."""
    return jax.tree.map(lambda x: np.asarray(x) if isinstance(x, jax.Array) and _host_local(x) else x, tree)


def _host_local_targets(target: Any) -> Any:
    return jax.tree.map(
        lambda t: np.zeros(t.shape, t.dtype) if isinstance(t, jax.ShapeDtypeStruct) and _host_local(t) else t, target
    )


def _put_host_local(restored: Any, target: Any) -> Any:
    return jax.tree.map(
        lambda r, t: jax.device_put(r, t.sharding) if isinstance(t, jax.ShapeDtypeStruct) and _host_local(t) else r,
        restored,
        target,
    )


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.generic, jax.Array, np.ndarray)):
        arr = np.asarray(x)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    if isinstance(x, (pathlib.Path,)):
        return str(x)
    if isinstance(x, tuple) and hasattr(x, "_asdict"):
        return x._asdict()
    raise TypeError(f"checkpoint meta value of type {type(x).__name__} is not JSON-serialisable: {x!r}")


class Checkpointer:
    """Keep-last-N (+ keep-best) checkpoints of a state pytree and a JSON meta dict in one directory.

    Args:
      directory: where step folders ``<step>/`` are written (created if missing).
      keep_last_n: keep the N most recent steps (None keeps all).
      keep_best_metric: also keep the single best step by this metric (passed to `save(metrics=...)`).
      keep_best_mode: "min" or "max": which direction of `keep_best_metric` is better.
      async_save: write in a background thread (`save` returns once arrays are copied off device).
      read_only: open an existing directory for restoring only (e.g. a `resume=<path>` source).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep_last_n: int | None = 3,
        keep_best_metric: str | None = None,
        keep_best_mode: Literal["min", "max"] = "min",
        async_save: bool = True,
        read_only: bool = False,
    ):
        if keep_last_n is not None and keep_last_n < 1:
            raise ValueError(f"keep_last_n must be >= 1 or None, got {keep_last_n}")
        if keep_best_mode not in ("min", "max"):
            raise ValueError(f"keep_best_mode must be 'min' or 'max', got {keep_best_mode!r}")
        self.directory = pathlib.Path(directory).absolute()
        self.keep_best_metric = keep_best_metric
        self.keep_best_mode = keep_best_mode
        policies: list[pp.PreservationPolicy] = [pp.LatestN(keep_last_n)]
        extra: dict[str, Any] = {}
        if keep_best_metric is not None:
            metric = keep_best_metric
            policies.append(
                pp.BestN(
                    get_metric_fn=lambda m: m[metric],
                    reverse=keep_best_mode == "min",  # BestN keeps the tail of the ascending sort
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
            # best_fn makes Orbax persist per-step metrics (so "best" survives a restart) and drives best_step().
            extra = dict(best_fn=lambda m: m[metric], best_mode=keep_best_mode)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
            create=not read_only,
            **extra,
        )
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # the step of the last save issued (async: maybe not committed yet)
        space.quiet_orbax_disk_full_logs()

    # -- queries ---------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """Most recent complete step, or None when the directory holds none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Complete steps on disk, ascending (unfinished tmp dirs are not steps)."""
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        """Best step by `keep_best_metric` (None without that option or without scored steps)."""
        if self.keep_best_metric is None:
            return None
        return self._manager.best_step()

    # -- save / restore --------------------------------------------------------------------------
    def save(
        self,
        step: int,
        state: Any,
        *,
        meta: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        force: bool = True,
    ) -> bool:
        """Save `state` and `meta` as `step` (all processes must call it). Returns whether it saved.

        Args:
          step: the step number (folder name); must increase across saves.
          state: pytree of arrays (typed PRNG keys allowed, see module docstring).
          meta: JSON-serialisable dict (numpy/jax scalars are converted).
          metrics: scalars; `metrics[keep_best_metric]` ranks this step for keep-best (a non-finite value
            or a missing key means "not ranked"). Also stored in meta under "metrics".
          force: save even if Orbax's save-interval policy would skip this step.
        """
        meta = dict(meta or {})
        if metrics:
            meta.setdefault("metrics", metrics)
        meta_json = json.loads(json.dumps(meta, default=_json_default, allow_nan=True))
        ranked = None
        if self.keep_best_metric is not None and metrics and self.keep_best_metric in metrics:
            value = float(np.asarray(metrics[self.keep_best_metric]))
            if math.isfinite(value):
                ranked = {self.keep_best_metric: value}
        state = _drop_frozen(state)  # LoRA: a frozen base is not saved (it is reloaded from the model folder)
        args = ocp.args.Composite(state=ocp.args.StandardSave(_host_local_to_numpy(_encode_keys(state))), meta=ocp.args.JsonSave(meta_json))
        self.check_for_errors()  # an earlier async save that failed is reported first, naming its step
        space.check_space(self.directory, int(step), space.state_bytes(state))
        with space.translating(self.directory, int(step)):
            saved = self._manager.save(int(step), args=args, metrics=ranked, force=force)
        self._pending = int(step)
        return saved

    def restore(self, step: int | None = None, *, target: Any) -> tuple[Any, dict[str, Any]]:
        """Restore `(state, meta)` of `step` (latest when None) onto `target`.

        Args:
          target: abstract state with shardings, normally `abstract_like(live_state)` (or the live state
            itself); restored arrays take its shapes, dtypes, shardings and pytree types.

        Raises:
          FileNotFoundError: no complete checkpoint (or not that step) in the directory.
        """
        step = self._resolve_step(step)
        target = abstract_like(target)
        encoded = _encode_key_targets(_drop_frozen(target))
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(_host_local_targets(encoded)),
            meta=ocp.args.JsonRestore(),
        )

        def mismatch(diffs: list[str]) -> ValueError:
            more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
            return ValueError(
                f"checkpoint {self.directory / str(step)} does not fit this run's state: {'; '.join(diffs[:3])}{more}. "
                "The model, optimizer or config changed since it was saved: use a new run.output_dir, or "
                "run.resume=never run.overwrite=true to start over")

        # shapes first (a cheap metadata read): Orbax's own error names no parameter
        shapes = [d for d in self._shape_differences(step, encoded) if ": saved " in d]
        if shapes:
            raise mismatch(shapes)
        try:
            out = self._manager.restore(step, args=args)
        except ValueError as e:
            diffs = self._shape_differences(step, encoded)
            if not diffs:
                raise
            raise mismatch(diffs) from e
        state = _put_host_local(out["state"], encoded)
        return _rejoin_frozen(_decode_keys(state, _drop_frozen(target)), target), dict(out["meta"] or {})

    def _shape_differences(self, step: int, encoded_target: Any) -> list[str]:
        """'name: saved (a, b), now (c, d)' for each array whose saved shape differs from the target's."""
        try:
            with ocp.StandardCheckpointer() as reader:
                meta = reader.metadata(self.directory / str(step) / "state")
        except Exception:  # noqa: BLE001 - diagnosis only; the original error is raised instead
            return []
        meta = getattr(meta, "item_metadata", meta)
        has_shape = lambda x: hasattr(x, "shape")  # noqa: E731
        saved = {_path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(meta, is_leaf=has_shape)[0]}
        wanted = {_path_name(p): tuple(np.shape(x))
                  for p, x in jax.tree_util.tree_flatten_with_path(encoded_target, is_leaf=has_shape)[0]}
        diffs = [f"{k}: saved {saved[k]}, now {v}" if k in saved else f"{k}: not in the checkpoint"
                 for k, v in wanted.items() if saved.get(k) != v]
        return diffs + [f"{k}: only in the checkpoint" for k in saved if k not in wanted]

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        """Only the JSON meta dict of `step` (latest when None)."""
        step = self._resolve_step(step)
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"] or {})

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"checkpoint step {step} not in {self.directory} (have {steps})")
        return step

    def check_for_errors(self) -> None:
        """Raise the error of an async save that has already failed (a full disk: `DiskFullError`)."""
        with space.translating(self.directory, self._pending):
            self._manager.check_for_errors()

    def wait_until_finished(self) -> None:
        """Block until pending async saves are written and committed (a full disk: `DiskFullError`)."""
        with space.translating(self.directory, self._pending):
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release resources."""
        try:
            self.wait_until_finished()
        finally:
            with space.translating(self.directory, self._pending):
                self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _path_name(path: tuple) -> str:
    """'params/layer_0/kernel' for a pytree key path (dict keys, attributes and indices alike)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def checkpoint_steps(directory: str | os.PathLike) -> list[int]:
    """The complete steps in a Checkpointer directory, ascending (unfinished tmp folders are not steps)."""
    d = pathlib.Path(directory)
    return sorted(ocp.utils.checkpoint_steps(d)) if d.is_dir() else []
