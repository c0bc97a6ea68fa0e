"""SIGTERM / SIGINT during a run: finish the step, checkpoint, exit 143 / 130 (see :func:`train.loop.run_loop`).

:class:`StopSignals` is installed around the loop's steps. The first signal only sets a flag (and starts a
grace timer); the loop checks it after every step, and when set it flushes the metrics, waits for the step,
writes a checkpoint, waits for every pending save to commit and raises :class:`Preempted` (the CLI turns it
into exit status ``128 + signal``). A second signal while stopping is recorded and ignored. If the step has
not finished within ``run.preempt_grace_s`` the process exits at once without saving: Orbax commits a step
by renaming its temp folder, so the checkpoints already on disk stay loadable.

Multi-process runs must save together (Orbax saves are collectives), so each step the processes agree on
the flag with one tiny all-gather (only when ``jax.process_count() > 1``): all of them stop after the same
step even when only one process got the signal.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Raised by ``run_loop`` after a signal: the checkpoint of ``step`` is committed in ``directory``."""

    def __init__(self, signum: int, step: int, directory: str, message: str):
        super().__init__(message)
        self.signum, self.step, self.directory = signum, step, directory

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """Context manager: SIGTERM/SIGINT handlers that ask the loop to stop after the current step.

    Installed only from the main thread (signal handlers cannot be set elsewhere); the previous handlers
    come back on exit.
    """

    def __init__(self, name: str, grace_s: float):
        self.name = name
        self.grace_s = grace_s
        self.signum: Optional[int] = None  # first signal received (locally or agreed)
        self.ignored: list[int] = []  # later signals, recorded and ignored
        self._step_done = threading.Event()
        self._armed = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._step_done.set()
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:  # noqa: ARG002
        if self.signum is not None:
            self.ignored.append(signum)
            print(f"[rlhf_jax] {signal_name(signum)} again: ignored while the run stops cleanly "
                  "(checkpointing; kill -9 to abort without a checkpoint)", file=sys.stderr, flush=True)
            return
        self.signum = signum
        print(f"[rlhf_jax] {self.name}: {signal_name(signum)} received: finishing the current step, then "
              f"checkpointing (within run.preempt_grace_s={self.grace_s:g}s)", file=sys.stderr, flush=True)
        self._arm()

    def _arm(self) -> None:
        if self._armed:
            return
        self._armed = True
        signum = self.signum

        def fire() -> None:
            if self._step_done.wait(self.grace_s):
                return
            print(f"[rlhf_jax] {self.name}: the step did not finish within run.preempt_grace_s={self.grace_s:g}s "
                  f"after {signal_name(signum)}; exiting without a checkpoint (the last saved one is intact)",
                  file=sys.stderr, flush=True)
            os._exit(128 + int(signum))

        threading.Thread(target=fire, name="rlhf_jax-preempt-grace", daemon=True).start()

    def poll(self) -> Optional[int]:
        """The signal to stop on, agreed by every process (one small all-gather when multi-process), or None."""
        import jax  # here, so that the CLI imports Preempted without JAX

        if jax.process_count() == 1:
            return self.signum
        import numpy as np
        from jax.experimental import multihost_utils

        flags = np.asarray(multihost_utils.process_allgather(np.array([self.signum or 0], np.int32))).reshape(-1)
        agreed = next((int(f) for f in flags if f), 0)
        if agreed and self.signum is None:
            self.signum = agreed  # another process got the signal: stop with it
            self._arm()
        return agreed or None  # the gathered value, identical on every process (a late local signal waits)

    def step_finished(self) -> None:
        """The step is done: the grace timer no longer applies (the save runs to completion)."""
        self._step_done.set()
