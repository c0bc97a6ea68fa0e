"""Multi-process start-up (``jax.distributed``) and bounded-time failure detection.

One process per host (TPU VM worker, SLURM task, or local process). Configuration, first match wins:

1. Explicit arguments / environment: ``RLHF_JAX_COORDINATOR`` (``host:port`` of process 0),
   ``RLHF_JAX_NUM_PROCESSES``, ``RLHF_JAX_PROCESS_ID`` (all three, or none), optionally
   ``RLHF_JAX_LOCAL_DEVICE_COUNT`` (simulated CPU devices per process).
2. Cluster auto-detection by JAX (``jax.distributed.initialize()`` with no arguments) on TPU pods
   and SLURM: used when ``RLHF_JAX_DISTRIBUTED=auto`` (set by ``launch/tpu_pod.sh`` and
   ``launch/slurm.sbatch``) or when SLURM reports more than one task.
3. Otherwise a single process: nothing to initialise.

A dead or hung host must end the job with an error, not a hang. Three layers bound the time:
``jax.distributed``'s own ``initialization_timeout`` (peers that never connect) and
``heartbeat_timeout_seconds`` (peers that stop), then :func:`wait_for_peers` (a coordination-service
barrier that names the absent processes) and :func:`watchdog` (a timer around the first real
collective, which exits the process naming the processes that stopped responding).

Only process 0 writes logs, checkpoints' metadata and exports (:func:`is_main_process`). Each host
loads its own slice of the data: ``rlhf_jax.sharding.host_data_shard(mesh)`` tells a loader which
``(shard_index, num_shards)`` to read — ``(jax.process_index(), jax.process_count())`` when the batch
is split over every host. This module never names mesh axes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
from collections.abc import Iterator, Mapping

import jax
import numpy as np

ENV_COORDINATOR = "RLHF_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "RLHF_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "RLHF_JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_COUNT = "RLHF_JAX_LOCAL_DEVICE_COUNT"
ENV_MODE = "RLHF_JAX_DISTRIBUTED"
ENV_HEARTBEAT_S = "RLHF_JAX_HEARTBEAT_TIMEOUT_S"

#: Exit status of a process that gives up because a peer failed (distinct from Python's 1).
EXIT_PEER_FAILURE = 75


class PeerFailure(RuntimeError):
    """A peer process did not reach a synchronisation point in time."""


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """What :func:`init_distributed` set up.

    Attributes:
      mode: ``"single"`` (no jax.distributed), ``"explicit"`` (coordinator given) or ``"auto"``.
      process_index: This process's id, 0 ... process_count − 1.
      process_count: Number of processes.
      local_device_count: Devices attached to this process.
      device_count: Devices in the whole job.
    """

    mode: str
    process_index: int
    process_count: int
    local_device_count: int
    device_count: int


def _env_int(env: Mapping[str, str], key: str) -> int | None:
    raw = env.get(key)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {key}={raw!r} is not an integer") from None


def _wants_auto(env: Mapping[str, str]) -> bool:
    if env.get(ENV_MODE, "") not in ("", "auto", "off"):
        raise ValueError(f"{ENV_MODE}={env[ENV_MODE]!r}: expected 'auto' or 'off'")
    if env.get(ENV_MODE) == "off":
        return False
    slurm_tasks = _env_int(env, "SLURM_NTASKS") or _env_int(env, "SLURM_NPROCS") or 1
    return env.get(ENV_MODE) == "auto" or ("SLURM_JOB_ID" in env and slurm_tasks > 1)


def init_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_count: int | None = None,
    timeout_s: int = 300,
    heartbeat_timeout_s: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> DistributedInfo:
    """Initialises ``jax.distributed`` (call before any other JAX work).

    Args:
      coordinator_address: ``host:port`` of process 0 (else ``RLHF_JAX_COORDINATOR``).
      num_processes: Number of processes (else ``RLHF_JAX_NUM_PROCESSES``).
      process_id: This process's id (else ``RLHF_JAX_PROCESS_ID``).
      local_device_count: Simulated CPU devices per process (else ``RLHF_JAX_LOCAL_DEVICE_COUNT``);
        affects only the CPU backend (tests, local runs).
      timeout_s: Peers that have not connected by then make initialisation fail.
      heartbeat_timeout_s: A peer silent this long is declared dead by the coordination service
        (else ``RLHF_JAX_HEARTBEAT_TIMEOUT_S``, else 100 s, JAX's default).
      environ: Environment to read (defaults to ``os.environ``).

    Returns:
      The resulting :class:`DistributedInfo`.

    Raises:
      ValueError: if only some of the three explicit settings are given (naming the missing ones).
    """
    env = os.environ if environ is None else environ
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(env, ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(env, ENV_PROCESS_ID)
    if local_device_count is None:
        local_device_count = _env_int(env, ENV_LOCAL_DEVICE_COUNT)
    if heartbeat_timeout_s is None:
        heartbeat_timeout_s = _env_int(env, ENV_HEARTBEAT_S) or 100
    if local_device_count is not None:
        if local_device_count < 1:
            raise ValueError(f"local_device_count ({ENV_LOCAL_DEVICE_COUNT}) must be >= 1, got {local_device_count}")
        jax.config.update("jax_num_cpu_devices", local_device_count)

    explicit = {ENV_COORDINATOR: coordinator_address, ENV_NUM_PROCESSES: num_processes, ENV_PROCESS_ID: process_id}
    given = [k for k, v in explicit.items() if v is not None]
    timeouts = dict(initialization_timeout=int(timeout_s), heartbeat_timeout_seconds=int(heartbeat_timeout_s),
                    shutdown_timeout_seconds=int(timeout_s))
    if given and len(given) < 3:
        missing = sorted(set(explicit) - set(given))
        raise ValueError(f"distributed setup needs all of {sorted(explicit)}; missing {missing}")
    if given:
        if not 0 <= process_id < num_processes:
            raise ValueError(f"{ENV_PROCESS_ID}={process_id} must be in [0, {ENV_NUM_PROCESSES}={num_processes})")
        mode = "explicit"
        if num_processes > 1:
            jax.distributed.initialize(coordinator_address, num_processes, process_id, **timeouts)
    elif _wants_auto(env):
        mode = "auto"
        jax.distributed.initialize(**timeouts)  # TPU pod / SLURM cluster auto-detection
    else:
        mode = "single"
    return DistributedInfo(mode=mode, process_index=jax.process_index(), process_count=jax.process_count(),
                           local_device_count=jax.local_device_count(), device_count=jax.device_count())


def is_main_process() -> bool:
    """True on process 0, the only one that writes logs, metrics files and exports."""
    return jax.process_index() == 0


def _client():
    from jax._src import distributed as _d  # the coordination-service client has no public handle

    return _d.global_state.client


def _call_with_timeout(fn, timeout_s: float):
    """Runs ``fn()`` in a daemon thread; returns its result, or None if it fails or overruns."""
    box: list = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join(timeout_s)
    return box[0] if box else None


def missing_processes(timeout_s: float = 5.0) -> list[int] | None:
    """Process ids the coordination service reports dead (None if it cannot tell in time).

    The service declares a process dead only after ``heartbeat_timeout_s``; before that a killed
    process still counts as alive. :func:`watchdog` therefore also names processes that never
    checked in.
    """
    client = _client()
    if client is None:
        return []
    n = jax.process_count()
    live = _call_with_timeout(lambda: client.get_live_nodes(list(range(n))), timeout_s)
    return None if live is None else sorted(set(range(n)) - set(live))


def _checked_in(key: str, timeout_s: float = 5.0) -> list[int] | None:
    client = _client()
    entries = _call_with_timeout(lambda: client.key_value_dir_get(key), timeout_s)
    return None if entries is None else sorted(int(k.rsplit("/", 1)[-1]) for k, _ in entries)


def _diagnose(key: str | None) -> str:
    n = jax.process_count()
    parts = []
    if key is not None:
        arrived = _checked_in(key)
        if arrived is None:
            return "the coordination service (process 0) is unreachable"
        absent = sorted(set(range(n)) - set(arrived))
        if absent:
            parts.append("never arrived: " + ", ".join(f"process {i}" for i in absent))
    dead = missing_processes()
    if dead:
        parts.append("declared dead: " + ", ".join(f"process {i}" for i in dead))
    if not parts:
        return "every process arrived and is alive (one is hung or much slower)"
    return "; ".join(parts)


_WATCHDOG_COUNT = iter(range(1 << 62))


@contextlib.contextmanager
def watchdog(what: str, *, timeout_s: float, exit_code: int = EXIT_PEER_FAILURE) -> Iterator[None]:
    """Exits this process (status ``exit_code``) if the body has not finished within ``timeout_s``.

    Wrap the first real collective (e.g. the first train step *including* ``block_until_ready``):
    a dead peer makes it block inside XLA, where no Python exception can reach. Every process
    checks in under a key of the coordination service on entry, so the message names this
    process and the processes that never arrived (or that the service declared dead).
    ``os._exit`` skips ``atexit`` hooks, which would otherwise wait on the dead peer again.
    Every process must enter the same watchdogs in the same order.
    """
    client = _client()
    key = None
    if client is not None and jax.process_count() > 1:
        key = f"rlhf_jax/checkin/{next(_WATCHDOG_COUNT)}/"
        client.key_value_set(key + str(jax.process_index()), "1")
    done = threading.Event()

    def fire() -> None:
        if done.wait(timeout_s):
            return
        print(f"[rlhf_jax] process {jax.process_index()}/{jax.process_count()}: {what} did not finish within "
              f"{timeout_s:g}s: {_diagnose(key)}; exiting with status {exit_code}", file=sys.stderr, flush=True)
        os._exit(exit_code)

    thread = threading.Thread(target=fire, name=f"rlhf_jax-watchdog-{what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


def wait_for_peers(tag: str, *, timeout_s: float = 60.0) -> None:
    """Barrier of all processes through the coordination service (no device collective), under a
    :func:`watchdog`: if a peer does not arrive within ``timeout_s`` this process exits with
    status :data:`EXIT_PEER_FAILURE`, naming it. Call it right after :func:`init_distributed`."""
    client = _client()
    if client is None or jax.process_count() == 1:
        return
    with watchdog(f"barrier {tag!r}", timeout_s=timeout_s):
        try:
            # the service's own deadline is a backstop; a dead peer is caught by the watchdog first
            client.wait_at_barrier(f"rlhf_jax/{tag}", int(timeout_s * 2000))
        except Exception as e:  # noqa: BLE001 - XlaRuntimeError(DEADLINE_EXCEEDED / UNAVAILABLE)
            raise PeerFailure(f"process {jax.process_index()}/{jax.process_count()}: barrier {tag!r} failed: "
                              f"{_diagnose(None)} ({e})") from e


def allgather_rows(local: np.ndarray) -> np.ndarray:
    """Every host's rows of a small host array, concatenated in process order (the global batch order of
    ``sharding.shard_batch``); the identity on one process. For per-row scores and metrics, never rollouts."""
    local = np.asarray(local)
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


def allgather_objects(obj) -> list:
    """Every host's picklable ``obj``, in process order (small payloads: labelled rows, counts); ``[obj]`` on
    one process."""
    if jax.process_count() == 1:
        return [obj]
    import pickle

    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [pickle.loads(every[i, : int(n)].tobytes()) for i, n in enumerate(sizes)]
