"""How long this process has been alive: the time-to-first-step of a run (fresh start or resume).

Compile time dominates the first step of a JAX program, and every resume after a preemption pays it again
unless the persistent compilation cache (:func:`rlhf_jax.runtime.xla.enable_compilation_cache`) serves the
programs. The host loop reports the seconds from the process's start to the end of its first step.
"""

from __future__ import annotations

import os
import time

#: Fallback origin where /proc is not available: when this module was first imported.
_IMPORTED = time.monotonic()
#: Where the process table lives (a module constant so a test can point it elsewhere).
PROC = "/proc"


def seconds_since_process_start() -> float:
    """Seconds since the kernel started this process (Linux ``/proc/self/stat`` starttime against
    ``/proc/uptime``); elsewhere, since ``rlhf_jax.runtime.clock`` was imported (python start-up not counted)."""
    try:
        with open(os.path.join(PROC, "self", "stat")) as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may contain spaces
        start_ticks = int(fields[19])  # field 22 of stat(5): starttime, in clock ticks since boot
        with open(os.path.join(PROC, "uptime")) as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED
