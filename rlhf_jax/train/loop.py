"""THE host loop of every command: resume, step, log, samples, evaluation, checkpoints, export.

A recipe supplies one ``step(index, state) -> (state, metrics, samples)`` (an optimizer step for
``sft``/``rm``/``dpo``; a whole sample → score → update iteration for the online commands) and
:func:`run_loop` does the rest:

* **resume** (``run.resume``): the state, every data iterator's position and the step come back from
  the chosen checkpoint; ``metrics.jsonl`` records after that step are dropped, so each step is logged
  exactly once. Randomness inside ``step`` must come from ``fold_in(seed, index)``.
* **deferred metrics**: step N is dispatched before step N−1's metrics are fetched (a few scalars), so the
  device never waits for the host (``train.metrics.DeferredMetrics``); the non-finite check therefore
  fires one step late, and the pending metrics are flushed before every evaluation and checkpoint so a
  bad step is never saved.
* **non-finite steps** (``run.nan_policy``): "stop" raises :class:`NonFiniteError` naming the logged
  step; "skip" goes on (the update was not applied) until ``run.max_nan_skips`` in a row.
* **cadence**: ``run.log_every``, ``run.eval_every`` (and at the end), ``run.save_every`` (and at the
  end; keep-last-N and keep-best by ``run.keep_best_metric``, a logged ``train/<name>`` or
  ``eval/<name>``), sample tables every ``sample_every`` steps.
* **export** of the final params when the run reaches its last step.
* **time to first step**: when the first step of this process (fresh or resumed) has finished, the seconds
  since the process started are printed and appended to ``first_step.jsonl`` (one line per start: the step
  it started from, the seconds, the compilation-cache folder), so a resume's compile time is visible.
* **preemption** (``train/preempt.py``): on SIGTERM/SIGINT the current step finishes, a checkpoint is
  written and committed, and :class:`Preempted` is raised (the CLI exits 143 / 130); the same command
  resumes. Multi-process runs agree on the stop step with one tiny all-gather per step.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable, Optional

import jax

from rlhf_jax.runtime import clock, distributed
from rlhf_jax.checkpoint import Checkpointer, abstract_like
from rlhf_jax.rewards import RewardFunctionError
from rlhf_jax.run_config import RunConfig
from rlhf_jax.train.metrics import DeferredMetrics, MetricsLogger, Progress
from rlhf_jax.train.preempt import Preempted, StopSignals, signal_name
from rlhf_jax.train.resume import resolve_resume
from rlhf_jax.train.run import commit_config, truncate_metrics
from rlhf_jax.train.step import NonFiniteError

#: ``step(index, state) -> (state, metrics, samples)``; metrics are a device pytree (fetched one step late)
#: or host floats; samples are table rows (or None).
StepFn = Callable[[int, Any], tuple[Any, Any, Optional[list]]]


@dataclasses.dataclass
class Loop:
    """What :func:`run_loop` needs (host-side objects; nothing here crosses ``jit``).

    Attributes:
      name: the command (progress bar, messages).
      run: the run config (cadence, nan policy, resume, loggers).
      output_dir: run folder (``metrics.jsonl``, ``checkpoints/``).
      total: steps of the whole run (optimizer steps, or iterations for the online commands).
      step: see :data:`StepFn`.
      data: checkpointable iterators (``state()``/``restore()``) whose positions are saved with the state.
      describe: fetched metrics → named floats (logged under ``train/``); default: the dict itself.
      finite: fetched metrics → whether the step's update was applied; default: ``metrics["finite"]``
        (or ``metrics.finite``), True when absent.
      evaluate: optional ``state -> named floats``, logged under ``eval/``.
      export: optional ``state -> folder``, called once the last step is done.
      sample_every: log the step's sample table every N steps (and at the first); 0 = never.
      progress_keys: values shown on the progress bar.
      stop_at_step: stop after this step as if killed (tests); checkpoints as usual until then.
      export_dir: where ``export`` writes (default ``output_dir/model``): a run whose last checkpoint is at
        ``total`` and whose export holds a ``config.json`` is finished, and is not run again.
    """

    name: str
    run: RunConfig
    output_dir: pathlib.Path
    total: int
    step: StepFn
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    describe: Callable[[Any], dict[str, float]] = dict
    finite: Optional[Callable[[Any], bool]] = None
    evaluate: Optional[Callable[[Any], dict[str, float]]] = None
    export: Optional[Callable[[Any], pathlib.Path]] = None
    sample_every: int = 0
    progress_keys: tuple[str, ...] = ("loss",)
    stop_at_step: Optional[int] = None
    export_dir: Optional[pathlib.Path] = None


@dataclasses.dataclass
class LoopResult:
    """The final state, the latest ``"<split>/<name>"`` metrics, every logged step's values, the export."""

    state: Any
    latest: dict[str, float]
    history: list[dict[str, float]]
    steps: int
    export_dir: Optional[str] = None


def _finite(metrics: Any) -> bool:
    value = metrics.get("finite", 1.0) if isinstance(metrics, dict) else getattr(metrics, "finite", True)
    return bool(float(value) >= 1.0) if isinstance(value, (float, int)) else bool(value)


def restore(loop: Loop, state: Any, ckpt: Checkpointer) -> tuple[Any, int, dict]:
    """Apply ``run.resume``: the state, the data positions, the step and the meta of the chosen checkpoint.
    Before restoring, the run's config is checked against the saved one and written (``run.commit_config``)."""
    found = resolve_resume(loop.run.resume, ckpt.directory)
    commit_config(loop.output_dir, loop.run, resuming=found is not None and found[0] == ckpt.directory)
    if found is None:
        return state, 0, {}
    directory, step = found
    source = ckpt if directory == ckpt.directory else Checkpointer(directory, read_only=True)
    state, meta = source.restore(step, target=abstract_like(state))
    for name, it in loop.data.items():
        it.restore(meta["data"][name])
    if distributed.is_main_process():
        print(f"[rlhf_jax] {loop.name} resumed from {directory}/{step} (step {meta['step']})", flush=True)
    return state, int(meta["step"]), meta


def run_loop(loop: Loop, state: Any) -> LoopResult:
    """Resume, then step until ``loop.total`` (or ``stop_at_step``); see the module docstring."""
    run = loop.run
    ckpt = Checkpointer(loop.output_dir / "checkpoints", keep_last_n=run.keep_last_n,
                        keep_best_metric=run.keep_best_metric, keep_best_mode=run.keep_best_mode)
    state, start, meta = restore(loop, state, ckpt)
    export_dir = loop.export_dir or loop.output_dir / "model"
    if start >= loop.total and (loop.export is None or (export_dir / "config.json").exists()):
        ckpt.close()
        if distributed.is_main_process():
            print(f"[rlhf_jax] {loop.name}: {loop.output_dir} is a finished run (step {start} of {loop.total}"
                  + (f", model exported to {export_dir}" if loop.export else "") + "); nothing to do. Raise "
                  "run.total_steps to train further, or choose another run.output_dir", flush=True)
        return LoopResult(state=state, latest=dict(meta.get("metrics") or {}), history=[], steps=start,
                          export_dir=str(export_dir) if loop.export else None)
    truncate_metrics(loop.output_dir / "metrics.jsonl", after_step=start)
    main = distributed.is_main_process()
    logger = MetricsLogger(loop.output_dir, tensorboard=run.tensorboard, wandb=run.wandb,
                           wandb_project=run.wandb_project, is_main=main)
    progress = Progress(loop.total, desc=loop.name, enabled=run.progress, is_main=main, initial=start)
    last = min(loop.total, loop.stop_at_step or loop.total)
    finite_of = loop.finite or _finite
    deferred = DeferredMetrics(convert=jax.device_get)
    latest: dict[str, float] = {}
    history: list[dict[str, float]] = []
    skips = 0
    clock = [time.perf_counter(), start]

    def report(ready: Optional[tuple[int, Any]]) -> None:
        nonlocal skips
        if ready is None:
            return
        done, fetched = ready
        values = loop.describe(fetched)
        if finite_of(fetched):
            skips = 0
        else:
            skips += 1
            if run.nan_policy == "stop":
                raise NonFiniteError(
                    f"{loop.name}: non-finite loss or gradient at step {done}; the update was not applied and no "
                    "later checkpoint was written. Lower the learning rate, check the data, or set "
                    "run.nan_policy=skip.")
            if skips >= run.max_nan_skips:
                raise NonFiniteError(f"{loop.name}: {skips} consecutive non-finite steps (last at step {done}); "
                                     f"stopping (run.max_nan_skips={run.max_nan_skips})")
        history.append(values)
        progress.update(1, **{k: values[k] for k in loop.progress_keys if k in values})
        if done % run.log_every == 0 or done == last:
            now = time.perf_counter()
            values = dict(values, steps_per_s=(done - clock[1]) / max(now - clock[0], 1e-9))
            clock[:] = [now, done]
            latest.update({f"train/{k}": v for k, v in logger.log(done, values).items()})

    try:
        with StopSignals(loop.name, run.preempt_grace_s) as signals:
            state = _steps(loop, state, start, last, ckpt, logger, deferred, report, latest, signals, main)
        report(deferred.flush())
    finally:
        progress.close()
        logger.close()
        ckpt.close()
    result = LoopResult(state=state, latest=latest, history=history, steps=last)
    if loop.export is not None and last == loop.total:
        exported = loop.export(state)
        result.export_dir = None if exported is None else str(exported)
    return result


def _steps(loop: Loop, state: Any, start: int, last: int, ckpt: Checkpointer, logger: MetricsLogger,
           deferred: DeferredMetrics, report: Callable, latest: dict, signals: StopSignals, main: bool) -> Any:
    """Steps ``start..last-1`` with their logging, evaluation and checkpoints; stops cleanly on a signal."""
    run = loop.run
    for index in range(start, last):
        done = index + 1
        try:
            state, metrics, samples = loop.step(index, state)
        except RewardFunctionError as e:  # name the iteration (the step logged in metrics.jsonl)
            raise RewardFunctionError(f"{loop.name} iteration {done}: {e}") from e
        if index == start:
            _first_step(loop, start, metrics, main)
        report(deferred.push(done, metrics))  # step N-1's metrics, while step N runs
        every = lambda n: bool(n) and done % n == 0  # noqa: E731
        if samples and (every(loop.sample_every) or (loop.sample_every and index == start)):
            logger.log_table(done, samples)
        want_eval = loop.evaluate is not None and (done == loop.total or every(run.eval_every))
        want_save = done == last or every(run.save_every)
        if want_eval or want_save:
            report(deferred.flush())  # a non-finite step raises here, before anything is saved
        if want_eval:
            ev = logger.log(done, loop.evaluate(state), split="eval")
            latest.update({f"eval/{k}": v for k, v in ev.items()})
            if main:
                print(f"[{loop.name} eval @ {done}] " + " ".join(f"{k}={v:.4g}" for k, v in ev.items()), flush=True)
        if want_save:
            meta = {"step": done, "data": {name: it.state() for name, it in loop.data.items()}}
            ckpt.save(done, state, meta=meta, metrics=dict(latest))
        else:
            ckpt.check_for_errors()  # a background save that failed (full disk) is reported now, naming its step
        signum = signals.poll()
        if signum:
            report(deferred.flush())  # a non-finite step raises here, before anything is saved
            jax.block_until_ready(state)
            signals.step_finished()  # the save always runs to completion
            if not want_save:
                meta = {"step": done, "data": {name: it.state() for name, it in loop.data.items()}}
                ckpt.save(done, state, meta=meta, metrics=dict(latest))
            ckpt.wait_until_finished()
            where = ckpt.directory / str(done)
            msg = (f"{signal_name(signum)} at step {done}: checkpoint saved to {where}; "
                   "resume with the same command")
            if main:
                print(f"[rlhf_jax] {msg}", flush=True)
            raise Preempted(signum, done, str(where), msg)
    return state


def _first_step(loop: Loop, start: int, metrics: Any, main: bool) -> None:
    """Wait for the first step of this process, then report the seconds since the process started."""
    jax.block_until_ready(metrics)
    seconds = clock.seconds_since_process_start()
    if not main:
        return
    cache = jax.config.jax_compilation_cache_dir or None
    record = {"start_step": start, "to_first_step_s": round(seconds, 3), "compilation_cache": cache,
              "processes": jax.process_count(), "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    loop.output_dir.mkdir(parents=True, exist_ok=True)
    with open(loop.output_dir / "first_step.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"[rlhf_jax] {loop.name}: first step {'after resuming at step ' + str(start) if start else 'of a fresh run'}"
          f" done {seconds:.1f} s after the process started (compilation cache: {cache or 'off'})", flush=True)


def batch_steps(train_step: Callable, batches: Any, mesh: jax.sharding.Mesh, *, seed: int,
                transform: Callable[[Any, Any], Any] = lambda state, b: b) -> StepFn:
    """The :data:`StepFn` of a supervised recipe: this host's next batch, placed on the mesh, one jitted
    ``train_step(state, batch, key)`` (the key is the run's; the step folds in ``state.step``).
    ``transform(state, batch)`` may complete the placed batch from the current state (e.g. DPO's reference
    log-probs from the policy's adapters-off base)."""
    from rlhf_jax import sharding as shd

    key = jax.random.key(seed)

    def step(index: int, state: Any):
        del index  # the data iterator and state.step carry the position
        state, metrics = train_step(state, transform(state, shd.shard_batch(next(batches), mesh)), key)
        return state, metrics, None

    return step
