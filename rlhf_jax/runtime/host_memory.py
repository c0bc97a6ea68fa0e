"""Host memory for XLA:CPU: keep large buffers mapped between executions, on transparent huge pages.

XLA:CPU allocates each execution's temporary buffers with ``malloc`` from worker threads; for the ~100M
PPO update they add up to ~10 GB. glibc serves requests that large with a fresh ``mmap`` and unmaps them
on ``free``, so every execution faults them in again and the kernel zeroes every page: that is kernel
time on the same cores the program computes on. Two layers of glibc tunables (``GLIBC_TUNABLES``):

- ``glibc.malloc.hugetlb=1`` (glibc ≥ 2.35, every host): malloc asks for transparent huge pages
  (``madvise(MADV_HUGEPAGE)``), 2 MiB per fault instead of 4 KiB.
- On hosts without an accelerator (XLA's buffers ARE host memory), also ``mmap_max=0`` (large blocks
  come from the heap), ``arena_max=1`` (one heap for all threads; a worker thread's own arena unmaps its
  heaps when they empty) and ``trim_threshold`` = 1 TiB (freed memory is never handed back). The next
  execution reuses the same pages: no faults, no zeroing (``benchmarks/host_memory.py`` measures it;
  numbers in ``benchmarks/README.md``).

The second layer must be set from process start: applied at run time (``mallopt`` after JAX has started
its threads) the heap fragments instead. On GPU/TPU hosts (``/dev/nvidia*``, ``/dev/accel*``, ``/dev/vfio/*`` present and
``JAX_PLATFORMS`` not ``cpu``) only the first layer is set: device buffers are not malloc'd, and one arena
would serialise the host threads' allocations for nothing.

A tunable is read at process start only, so :func:`reexec_with_host_tunables` re-executes the current
command once with it set. The CLI (``rlhf-jax``) and the benchmarks call it first thing (the benchmarks'
peer runs inherit the environment, so both sides of a comparison get the same allocator); the commands that
only sample (``eval``, ``generate``, ``chat``) get the first layer only.
``RLHF_JAX_HOST_TUNABLES=0`` turns it off; a user who sets any of these tunables keeps their own setting.
"""

from __future__ import annotations

import glob
import os
import platform
import sys
from collections.abc import Sequence

ENV = "RLHF_JAX_HOST_TUNABLES"
TUNABLE = "glibc.malloc.hugetlb=1"
# Only where XLA's buffers live in host memory (no accelerator): reuse the heap instead of mapping afresh.
HEAP_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=1099511627776"
_DONE = "RLHF_JAX_HOST_TUNABLES_SET"
_ACCELERATOR_DEVICES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")


def host_is_cpu_only(environ: dict[str, str]) -> bool:
    """Whether JAX will compute in host memory: ``JAX_PLATFORMS=cpu``, or no GPU/TPU device file."""
    if environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return True
    return not any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES)


def tunables_for(environ: dict[str, str], *, heap: bool = True) -> str:
    """The tunables this host gets (:data:`TUNABLE`, plus :data:`HEAP_TUNABLES` on a CPU-only host when
    ``heap``)."""
    return f"{TUNABLE}:{HEAP_TUNABLES}" if heap and host_is_cpu_only(environ) else TUNABLE


def host_tunables_env(environ: dict[str, str], *, heap: bool = True) -> dict[str, str] | None:
    """The environment to re-exec with, or None when nothing is to change (off, not glibc, already set).
    ``heap=False`` leaves out :data:`HEAP_TUNABLES` (see :func:`reexec_with_host_tunables`)."""
    if environ.get(ENV, "1") == "0" or environ.get(_DONE) or not sys.platform.startswith("linux"):
        return None
    if platform.libc_ver()[0] != "glibc":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    ours = tunables_for(environ, heap=heap)
    user_keys = {t.split("=")[0] for t in current.split(":")}
    if any(t.split("=")[0] in user_keys for t in ours.split(":")):  # the user set one of them: their choice wins
        return None
    return {**environ, "GLIBC_TUNABLES": f"{current}:{ours}" if current else ours, _DONE: "1"}


def reexec_with_host_tunables(argv: Sequence[str], *, heap: bool = True) -> None:
    """Replace this process by ``python *argv`` with :func:`tunables_for` set; returns only when nothing changes.

    ``heap=False`` is for processes that only sample (``rlhf-jax eval``, ``generate``, ``chat``): they have no
    large per-execution temporaries to keep mapped, and with the heap layer the weights they stream every
    decode step come from the brk heap instead of their own mappings; the ~86M eval pass (16 prompts × 64
    tokens) took 2.70–2.82 s with the heap layer and 2.47–2.57 s without it (two alternations, 2026-12-07).

    Call it before anything else happens (no threads, no open work): ``os.execve`` does not return.
    """
    env = host_tunables_env(dict(os.environ), heap=heap)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)
