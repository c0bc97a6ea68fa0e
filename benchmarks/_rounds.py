"""Interleaved rounds: the peer and our side alternate (peer, ours, peer, ours, ...) after warm-up, in one run,
so that both see the same machine state; each benchmark then reports the ratio of each round and their median
and min–max, with the machine's state (XLA and torch 2048³ f32 matmul rates before and after, load average,
free memory, ``GLIBC_TUNABLES``).

A peer (TRL, Tunix) runs in its own virtualenv as ONE long-lived subprocess: it loads, warms up, prints
``PEER_READY {json}`` and waits; then for each ``go`` line on its stdin it runs one round and prints
``PEER_ROUND {json}``; after the last round it waits for the driver to close its stdin (after OUR last round),
then exits, so that its teardown (the trainer's end, interpreter exit) never runs beside a timed round of ours
(it did: our last round of the tiny PPO ran 2.9 s against 2.3 s in the others). Its start-up and warm-up are
therefore never counted; a round counts only the peer's steps (its own timer, as its trainer sees them). While
one side runs, the other is blocked on a pipe (idle).

Our recipes run in this process with :func:`gated_run_loop`: the recipe's loop is unchanged except that before
the first step of each round (after ``warmup`` steps) a callback runs the peers' round.

This file is imported on both sides (the peer venvs have numpy but no jax/rlhf_jax): keep its top level
standard-library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

READY, ROUND = "PEER_READY ", "PEER_ROUND "


# ------------------------------------------------------------------------------------ peer side (worker)
def peer_ready(info: dict[str, Any]) -> None:
    """Worker: announce that loading and warm-up are done, then wait for the first ``go``."""
    print(READY + json.dumps(info), flush=True)
    peer_wait()


def peer_round_done(record: dict[str, Any], *, wait: bool = True) -> None:
    """Worker: report one round; then (``wait``) block until the driver says ``go`` for the next one."""
    print(ROUND + json.dumps(record), flush=True)
    if wait:
        peer_wait()


def peer_wait() -> None:
    """Worker: block until the driver sends ``go`` (EOF: the driver is gone, exit)."""
    line = sys.stdin.readline()
    if not line:
        sys.exit(0)


def trainer_round_callback(*, warmup: int, iters: int, rounds: int, info: Callable[[], dict[str, Any]],
                           split: dict[str, float] | None = None) -> Any:
    """Worker: a ``transformers.TrainerCallback`` that times each optimizer step (from the end of the previous
    one, so data loading and the trainer's own bookkeeping count), reports ``PEER_READY`` after ``warmup``
    steps and ``PEER_ROUND {"rows": [...]}`` after each further ``iters`` steps, and blocks between rounds
    (the wait is not counted). ``split``: named seconds that the worker's wrappers accumulate during a step
    (reset after each step; copied into its row)."""
    from transformers import TrainerCallback

    if warmup < 1 or iters < 1 or rounds < 1:
        raise ValueError(f"need warmup >= 1, iters >= 1, rounds >= 1; got {warmup}, {iters}, {rounds}")
    split = split if split is not None else {}

    class RoundTimer(TrainerCallback):
        def __init__(self):
            self.n, self.rows, self.t = 0, [], None

        def _reset(self):
            for k in split:
                split[k] = 0.0
            self.t = time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            self._reset()

        def on_step_end(self, args, state, control, **kw):
            row = {"iteration_s": time.perf_counter() - self.t, **split}
            self.n += 1
            if self.n == warmup:
                peer_ready(info())
            elif self.n > warmup:
                self.rows.append(row)
                if (self.n - warmup) % iters == 0:
                    peer_round_done({"rows": self.rows})  # the last one waits for EOF (see module docstring)
                    self.rows = []
            self._reset()

    return RoundTimer()


# ------------------------------------------------------------------------------------------- driver side
class Peer:
    """One peer worker subprocess kept alive across rounds. ``rounds()`` are driven with :meth:`round`."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None):
        self.name = name
        self._err = tempfile.NamedTemporaryFile("w+", prefix=f"peer-{name}-", suffix=".log", delete=False)
        self.t_start = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err,
                                     text=True, env=env, cwd=cwd, bufsize=1)
        self.ready: dict[str, Any] | None = None
        self.startup_s = float("nan")

    def _read(self, prefix: str) -> dict[str, Any]:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return json.loads(line[len(prefix):])
        self.proc.wait()
        self._err.flush()
        self._err.seek(0)
        raise RuntimeError(f"peer {self.name} exited (rc {self.proc.returncode}) before '{prefix.strip()}':\n"
                           f"{self._err.read()[-4000:]}")

    def wait_ready(self) -> dict[str, Any]:
        """Block until the peer has loaded and warmed up (not counted in any round)."""
        self.ready = self._read(READY)
        self.startup_s = time.perf_counter() - self.t_start
        return self.ready

    def round(self) -> dict[str, Any]:
        """Run one round (the worker's own timer; the pipe round-trip is not counted)."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self._read(ROUND)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._err.close()
        os.unlink(self._err.name)


def gated_run_loop(recipe_module: Any, *, warmup: int, iters: int, rounds: int,
                   before_round: Callable[[int], None]) -> Callable[[], None]:
    """Patch ``recipe_module.run_loop`` so that ``before_round(r)`` runs before step ``warmup + r * iters``
    (r = 0 .. rounds-1), after the previous step's results are ready. Returns the undo function."""
    import dataclasses

    import jax

    original = recipe_module.run_loop
    starts = {warmup + r * iters: r for r in range(rounds)}

    def run_loop(loop, state):
        inner = loop.step

        def step(index, st):
            if index in starts:
                jax.block_until_ready(st)
                before_round(starts[index])
            return inner(index, st)

        return original(dataclasses.replace(loop, step=step), state)

    recipe_module.run_loop = run_loop
    return lambda: setattr(recipe_module, "run_loop", original)


# ------------------------------------------------------------------------------------------- machine state
def torch_matmul_gflops(n: int = 2048, iters: int = 5) -> float | None:
    """This CPU's f32 ``n``³ matmul rate through torch (median of ``iters``), GFLOP/s; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    a = torch.randn(n, n)
    torch.mm(a, a)
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        torch.mm(a, a)
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(ts) / 1e9


def free_gb() -> float:
    """MemAvailable in GB."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def machine_state() -> dict[str, Any]:
    """XLA and torch f32 2048³ matmul rates, load averages (1, 5, 15 min), free memory, UTC time."""
    from benchmarks import _common as C

    return {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "loadavg": list(os.getloadavg()),
            "xla_matmul_gflops": C.matmul_gflops(), "torch_matmul_gflops": torch_matmul_gflops(),
            "mem_available_gb": free_gb()}


def ratio_stats(peer_s: list[float], ours_s: list[float]) -> dict[str, Any]:
    """Per-round ratios peer/ours (speed-up: > 1 means we are faster) with their median, min and max."""
    if len(peer_s) != len(ours_s) or not peer_s:
        raise ValueError(f"ratio_stats: need equal, non-empty round lists, got {len(peer_s)} and {len(ours_s)}")
    r = [p / o for p, o in zip(peer_s, ours_s)]
    return {"per_round": r, "median": statistics.median(r), "min": min(r), "max": max(r)}


def fmt_ratio(s: dict[str, Any]) -> str:
    return f"{s['median']:.2f}x  [{s['min']:.2f} – {s['max']:.2f}] over {len(s['per_round'])} rounds"


def state_rows(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, str]]:
    """Table rows describing the machine state around the rounds."""
    tm = lambda s: "n/a" if s["torch_matmul_gflops"] is None else f"{s['torch_matmul_gflops']:.0f}"  # noqa: E731
    return [("f32 2048^3 matmul XLA before / after (GFLOP/s)",
             f"{before['xla_matmul_gflops']:.0f} / {after['xla_matmul_gflops']:.0f}"),
            ("f32 2048^3 matmul torch before / after (GFLOP/s)", f"{tm(before)} / {tm(after)}"),
            ("load average 1/5/15 min before", " ".join(f"{x:.2f}" for x in before["loadavg"])),
            ("load average 1/5/15 min after", " ".join(f"{x:.2f}" for x in after["loadavg"])),
            ("MemAvailable before / after (GB)", f"{before['mem_available_gb']:.1f} / {after['mem_available_gb']:.1f}"),
            ("GLIBC_TUNABLES", os.environ.get("GLIBC_TUNABLES", "") or "(unset)"),
            ("measured (UTC)", f"{before['utc']} – {after['utc']}")]
