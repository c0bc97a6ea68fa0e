"""Run-time reporting: metrics to JSONL / TensorBoard / W&B, a progress bar, time splits, and the
"read step N−1's metrics after dispatching step N" helper (`DeferredMetrics`, used by `train.loop`).

End-of-run plots and the summary table live in `rlhf_jax.train.plots`.

Files written under `output_dir` (process 0 only):
  metrics.jsonl   one JSON object per `log` call: {"step", "split", "time" (s since start), <metrics>}
  samples.jsonl   one JSON object per table row: {"step", "table", <row columns>}
  tensorboard/    event files (scalars as "<split>/<name>", tables as markdown text)
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import jax
import numpy as np

__all__ = ["DeferredMetrics", "MetricsLogger", "Progress", "Timer", "to_floats"]


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Host floats from scalar metrics (python, numpy or jax; blocks on device values).

    Raises:
      ValueError: a non-scalar value, naming its key.
    """
    host = jax.device_get(dict(metrics))
    out = {}
    for k, v in host.items():
        arr = np.asarray(v)
        if arr.size != 1:
            raise ValueError(f"metric '{k}' must be a scalar, got shape {arr.shape}")
        out[k] = float(arr.reshape(()))
    return out


class MetricsLogger:
    """Write scalar metrics and sample tables to JSONL, TensorBoard and (optionally) Weights & Biases.

    Args:
      output_dir: run directory; created if missing.
      tensorboard: also write TensorBoard event files (tensorboardX) to `output_dir/tensorboard`.
      wandb: also log to W&B; raises if enabled but `wandb` is not installed.
      wandb_project: W&B project name.
      is_main: only the main process (`jax.process_index() == 0`) writes; others are no-ops.
      config: optional dict stored with the W&B run.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        wandb_project: str | None = None,
        is_main: bool = True,
        config: Mapping[str, Any] | None = None,
    ):
        self.output_dir = pathlib.Path(output_dir)
        self.is_main = is_main
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self.samples_path = self.output_dir / "samples.jsonl"
        self.tensorboard_dir = self.output_dir / "tensorboard" if tensorboard else None
        self._start = time.time()
        self._tb = None
        self._wandb = None
        self._metrics_f = self._samples_f = None
        if not is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._metrics_f = open(self.metrics_path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=str(self.tensorboard_dir))
        if wandb:
            if importlib.util.find_spec("wandb") is None:
                raise ImportError("run.wandb=true but wandb is not installed: pip install 'rlhf_jax[wandb]'")
            import wandb as wandb_lib

            self._wandb = wandb_lib.init(project=wandb_project, dir=str(self.output_dir), config=dict(config or {}))

    def log(self, step: int, metrics: Mapping[str, Any], *, split: str = "train") -> dict[str, float]:
        """Record scalar `metrics` at `step` under `split` ("train", "eval", ...); returns them as floats.

        Non-finite values are kept (JSON `NaN`/`Infinity`, readable by Python's json module).
        """
        values = to_floats(metrics)
        if not self.is_main:
            return values
        record = {"step": int(step), "split": split, "time": round(time.time() - self._start, 3), **values}
        self._metrics_f.write(json.dumps(record) + "\n")
        self._metrics_f.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{split}/{k}", v, global_step=int(step))
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in values.items()}, step=int(step))
        return values

    def log_table(self, step: int, rows: Sequence[Mapping[str, Any]], *, name: str = "samples") -> None:
        """Record a table (e.g. prompt / response / reward per sample) to samples.jsonl and TB text."""
        if not self.is_main or not rows:
            return
        if self._samples_f is None:
            self._samples_f = open(self.samples_path, "a", encoding="utf-8")
        columns = list(dict.fromkeys(k for r in rows for k in r))
        for r in rows:
            clean = {k: _jsonable(v) for k, v in r.items()}
            self._samples_f.write(json.dumps({"step": int(step), "table": name, **clean}) + "\n")
        self._samples_f.flush()
        if self._tb is not None:
            self._tb.add_text(name, _markdown_table(columns, rows), global_step=int(step))
        if self._wandb is not None:
            import wandb as wandb_lib

            data = [[_jsonable(r.get(c)) for c in columns] for r in rows]
            self._wandb.log({name: wandb_lib.Table(columns=columns, data=data)}, step=int(step))

    def close(self) -> None:
        """Flush and close every sink."""
        for f in (self._metrics_f, self._samples_f):
            if f is not None:
                f.close()
        self._metrics_f = self._samples_f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.generic, np.ndarray, jax.Array)):
        arr = np.asarray(v)
        return arr.item() if arr.ndim == 0 else arr.tolist()
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return str(v)


def _markdown_table(columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    def cell(v: Any) -> str:
        s = f"{v:.4g}" if isinstance(v, float) else str(_jsonable(v))
        return s.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
def _progress_is_interactive(enabled: Literal["auto", "on", "off"], stream: Any) -> bool:
    if enabled == "on":
        return True
    if enabled == "off":
        return False
    is_tty = hasattr(stream, "isatty") and stream.isatty()
    return is_tty and not os.environ.get("CI")


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """Progress over `total` steps: a tqdm bar (ETA + key metrics as postfix) on an interactive terminal,
    else a compact line every `print_every` steps (and at the end).

    Args:
      total: number of steps.
      desc: label ("ppo", "sft", ...).
      enabled: "on" = tqdm bar; "off" = silent; "auto" = bar on a TTY without the `CI` env var, compact
        lines otherwise.
      print_every: compact-line period (default: total // 10, at least 1).
      is_main: only process 0 prints.
      stream: where to write (default sys.stdout).
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str = "",
        enabled: Literal["auto", "on", "off"] = "auto",
        print_every: int | None = None,
        is_main: bool = True,
        initial: int = 0,
        stream: Any = None,
    ):
        if enabled not in ("auto", "on", "off"):
            raise ValueError(f"progress must be 'auto', 'on' or 'off', got {enabled!r}")
        self.total, self.desc, self.n = int(total), desc, int(initial)
        self.stream = stream if stream is not None else sys.stdout
        self.print_every = max(1, print_every or self.total // 10)
        self.silent = enabled == "off" or not is_main
        self._bar = None
        self._postfix: dict[str, float] = {}
        self._start, self._start_n = time.time(), self.n
        if not self.silent and _progress_is_interactive(enabled, self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, initial=self.n, file=self.stream, dynamic_ncols=True)

    def update(self, n: int = 1, **metrics: float) -> None:
        """Advance by `n` steps; `metrics` (host floats) become the postfix / the compact line."""
        self.n += n
        if metrics:
            self._postfix.update({k: float(v) for k, v in metrics.items()})
        if self.silent:
            return
        if self._bar is not None:
            if metrics:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in self._postfix.items()}, refresh=False)
            self._bar.update(n)
        elif self.n % self.print_every == 0 or self.n >= self.total:
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        """The compact status line: `desc step n/total (p%) | k=v ... | elapsed, ETA`."""
        elapsed = time.time() - self._start
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.n / self.total if self.total else 100.0
        parts = [f"{self.desc} step {self.n}/{self.total} ({pct:.0f}%)".strip()]
        if self._postfix:
            parts.append(" ".join(f"{k}={v:.4g}" for k, v in self._postfix.items()))
        parts.append(f"{_fmt_seconds(elapsed)} elapsed, ETA {_fmt_seconds(eta)}")
        return " | ".join(parts)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------
class Timer:
    """Wall-clock time splits: `with timer("generate"): ...` accumulates seconds per name.

    JAX dispatches asynchronously: call `.block_until_ready()` on a split's outputs inside the `with`
    block, or the time lands in whichever split first waits for them.
    """

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start
            self.counts[name] = self.counts.get(name, 0) + 1

    def as_metrics(self, prefix: str = "time/") -> dict[str, float]:
        """Total seconds per split plus each split's fraction of their sum (`<prefix><name>_frac`)."""
        total = sum(self.totals.values())
        out = {f"{prefix}{k}": v for k, v in self.totals.items()}
        if total > 0:
            out.update({f"{prefix}{k}_frac": v / total for k, v in self.totals.items()})
        return out

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()


class DeferredMetrics:
    """Hold step N's device metrics and hand back step N−1's as host floats (no pipeline stall).

        deferred = DeferredMetrics()
        for step in ...:
            state, metrics = train_step(state, batch)      # dispatch step N (async)
            ready = deferred.push(step, metrics)           # step N-1's values, now finished
            if ready: logger.log(*ready)
        if (ready := deferred.flush()): logger.log(*ready)
    """

    def __init__(self, convert: Callable[[Any], Any] | None = None):
        self._pending: tuple[int, Any] | None = None
        self._convert = to_floats if convert is None else convert  # e.g. jax.device_get for any pytree

    def push(self, step: int, metrics: Any) -> tuple[int, Any] | None:
        """Store `(step, metrics)`; return the previously stored pair converted to floats (or None)."""
        previous = self.flush()
        self._pending = (int(step), metrics)
        return previous

    def flush(self) -> tuple[int, Any] | None:
        """Convert and return the pending pair (or None), leaving nothing pending."""
        if self._pending is None:
            return None
        step, metrics = self._pending
        self._pending = None
        return step, self._convert(metrics)
