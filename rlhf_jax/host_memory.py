"""Host memory for XLA:CPU: back large allocations with transparent huge pages (glibc tunable).

XLA:CPU allocates each execution's temporary buffer with ``malloc`` from a worker thread; for the ~100M
PPO update that buffer is ~4 GB. glibc serves a request that large with a fresh ``mmap`` and unmaps it on
``free``, so every execution faults the whole buffer in again, one 4 KiB page at a time, and the kernel
zeroes each page. ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc ≥ 2.35) makes malloc ask for
transparent huge pages on those mappings (``madvise(MADV_HUGEPAGE)``): 2 MiB per fault.

Measured (``benchmarks``' ~100M Llama, actor + critic forward + backward over 32 × 128 tokens, 4
executions in one process): minor page faults 8.3 M → 0.6 M, kernel time 61 → 44 s, step time min /
median 23.0 / 25.3 → 21.1 / 22.7 s.

Keeping freed memory mapped instead (one arena, no mmap, no trimming: ``mallopt``) removed the faults too
but let the heap fragment: one such run grew to 24 GB and was killed by the OOM killer, so it is not used.

A tunable is read at process start only, so :func:`reexec_with_host_tunables` re-executes the current
command once with it set. The CLI (``rlhf-jax``) and the benchmarks call it first thing (the benchmarks'
peer runs inherit the environment, so both sides of a comparison get the same allocator).
``RLHF_JAX_HOST_TUNABLES=0`` turns it off.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Sequence

ENV = "RLHF_JAX_HOST_TUNABLES"
TUNABLE = "glibc.malloc.hugetlb=1"
_DONE = "RLHF_JAX_HOST_TUNABLES_SET"


def host_tunables_env(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-exec with, or None when nothing is to change (off, not glibc, already set)."""
    if environ.get(ENV, "1") == "0" or environ.get(_DONE) or not sys.platform.startswith("linux"):
        return None
    if platform.libc_ver()[0] != "glibc":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{current}:{TUNABLE}" if current else TUNABLE, _DONE: "1"}


def reexec_with_host_tunables(argv: Sequence[str]) -> None:
    """Replace this process by ``python *argv`` with :data:`TUNABLE` set; returns only when nothing changes.

    Call it before anything else happens (no threads, no open work): ``os.execve`` does not return.
    """
    env = host_tunables_env(dict(os.environ))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv], env)
