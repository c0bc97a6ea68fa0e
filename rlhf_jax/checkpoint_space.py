"""A full disk during a checkpoint save, reported as one line (used by :class:`rlhf_jax.checkpoint.Checkpointer`).

Orbax writes a step in background threads; a write that fails with ``ENOSPC`` logs a few hundred lines of
tracebacks (one per thread) and surfaces only at the *next* save. Instead:

* before each save, :func:`check_space` compares the state's size with the free space of the checkpoint
  folder's disk and refuses the save that cannot fit (on every process together);
* an error that does come out of Orbax (``save``, ``check_for_errors``, ``wait_until_finished``) and says
  "No space left on device" becomes :class:`DiskFullError`, naming the failed step, the folder and the free
  space, via :func:`translating`; Orbax's own log records of that error are dropped (:class:`_QuietDiskFull`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pathlib
import re
import shutil
from typing import Iterator, Optional

import jax

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


class DiskFullError(RuntimeError):
    """A checkpoint step could not be written: its disk is full. The previous checkpoints are intact."""


def free_bytes(directory: str | os.PathLike) -> int:
    """Free bytes (for this user) on the disk holding `directory` (or its nearest existing parent)."""
    p = pathlib.Path(directory).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def human(n: float) -> str:
    """1536 -> '1.5 KB' (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def message(directory: pathlib.Path, step: int, needed: Optional[int] = None) -> str:
    need = f" (this state needs about {human(needed)})" if needed else ""
    return (f"disk full: checkpoint step {step} could not be written to {directory}: {human(free_bytes(directory))} "
            f"free on that disk{need}. Free some space (or set run.keep_last_n lower, or move run.output_dir) and "
            "rerun the same command: it resumes from the last complete checkpoint")


def state_bytes(tree) -> int:
    """Bytes of every array in `tree` (global sizes: what all processes write together)."""
    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


def check_space(directory: pathlib.Path, step: int, needed: int) -> None:
    """Raise :class:`DiskFullError` on every process when the checkpoint folder's disk (as any process sees
    it) has less than `needed` bytes free."""
    short = free_bytes(directory) < needed
    if jax.process_count() > 1:
        from rlhf_jax.runtime import distributed

        short = any(distributed.allgather_objects(short))
    if short:
        raise DiskFullError(message(directory, step, needed))


def _is_disk_full(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or NO_SPACE in str(e) or "os_error_code='28'" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def translating(directory: pathlib.Path, pending_step: Optional[int]) -> Iterator[None]:
    """Turn a disk-full error out of Orbax into :class:`DiskFullError` (naming the step whose temporary folder
    failed, else `pending_step`); other errors pass through unchanged."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a full disk
        if not _is_disk_full(e):
            raise
        found = re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(e))
        step = int(found.group(1)) if found else pending_step
        raise DiskFullError(message(directory, step if step is not None else -1)) from None


class _QuietDiskFull(logging.Filter):
    """Drop Orbax's log records of a full disk (the error is raised once, as :class:`DiskFullError`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        return not (NO_SPACE in text or "os_error_code='28'" in text)


_FILTER = _QuietDiskFull()


def quiet_orbax_disk_full_logs() -> None:
    """Install the filter on the absl logger Orbax writes to (idempotent)."""
    logger = logging.getLogger("absl")
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
