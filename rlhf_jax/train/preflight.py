"""Checks that need only the config (and the device count), run by the CLI before any model or data is loaded.

A bad warmup or a batch that the mesh cannot split used to surface after the model and the data were
loaded (minutes on a large model); :func:`preflight` raises the same one-line error first:

* every batch size the recipes split over the hosts (``batch_size``, ``eval_batch_size``,
  ``rollout.batch_size``) is divisible by the hosts' data shards (``train.run.host_batch_size``); a
  supervised ``batch_size`` also by the mesh's batch axes (``data × fsdp``), which ``sharding.shard_batch``
  needs;
* with ``run.total_steps`` set, each optimizer's ``warmup_steps`` is below its number of optimizer steps
  (``train.optim.make_schedule``): ``run.total_steps`` × the updates per step of the command (1 for the
  supervised commands; ``algo``/``ppo`` epochs × minibatches, ``raft.sft_steps``,
  ``online.updates_per_iteration`` for the online ones). With ``run.epochs`` instead, the step count
  depends on the data, and the recipe checks it once the data is loaded.

Micro-batch divisibility is checked at config load (each recipe's ``__post_init__``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from rlhf_jax.config import ConfigError
from rlhf_jax.run_config import OptimConfig


def updates_per_step(cfg: Any) -> Optional[int]:
    """Optimizer steps per run step (``run.total_steps`` unit) from the config alone, or None if unknown."""
    if hasattr(cfg, "batch_size") and hasattr(cfg, "num_micro_batches") and not hasattr(cfg, "rollout"):
        return 1  # sft, rm, dpo: one optimizer step per step
    for section, count in (("algo", lambda s: s.epochs * s.num_minibatches),
                           ("ppo", lambda s: s.epochs * s.num_minibatches),
                           ("raft", lambda s: s.sft_steps),
                           ("online", lambda s: s.updates_per_iteration)):
        if hasattr(cfg, section):
            try:
                return int(count(getattr(cfg, section)))
            except AttributeError:
                return None
    return None


def check_warmup(cfg: Any) -> None:
    """``<optim>.warmup_steps`` < optimizer steps of the run, for every decaying schedule (see module doc)."""
    total = getattr(getattr(cfg, "run", None), "total_steps", None)
    per = updates_per_step(cfg)
    if total is None or per is None:
        return
    steps = total * per
    for f in dataclasses.fields(cfg):
        optim = getattr(cfg, f.name)
        if not isinstance(optim, OptimConfig) or optim.schedule == "constant" or optim.warmup_steps < steps:
            continue
        how = f"run.total_steps={total}" + (f" x {per} updates per step" if per != 1 else "")
        raise ConfigError(f"{f.name}.warmup_steps", f"{optim.warmup_steps} must be < the run's {steps} optimizer "
                          f"steps ({how}) for schedule '{optim.schedule}'; lower it or use schedule=constant")


def check_batches(cfg: Any) -> None:
    """The batch sizes against the mesh and the hosts (see module doc). Builds the mesh (no model, no data)."""
    from rlhf_jax import sharding as shd
    from rlhf_jax.train.run import host_batch_size

    if not hasattr(cfg, "mesh"):
        return
    try:
        mesh = shd.make_mesh(cfg.mesh)
    except ValueError as e:
        raise ConfigError("mesh", str(e)) from None
    online = hasattr(cfg, "rollout")
    sizes = ([("rollout.batch_size", getattr(cfg.rollout, "batch_size", None))] if online else
             [("batch_size", getattr(cfg, "batch_size", None)), ("eval_batch_size", getattr(cfg, "eval_batch_size", None))])
    for key, size in sizes:
        if isinstance(size, int):
            try:
                host_batch_size(size, mesh)
            except ValueError as e:
                raise ConfigError(key, str(e)) from None
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if not online and isinstance(getattr(cfg, "batch_size", None), int) and cfg.batch_size % shards:
        raise ConfigError("batch_size", f"{cfg.batch_size} is not divisible by the mesh's batch axes data x fsdp = "
                          f"{mesh.shape['data']} x {mesh.shape['fsdp']} = {shards}")


def preflight(cfg: Any) -> None:
    """Every config-only check (module doc); raises ``ConfigError`` naming the key."""
    check_warmup(cfg)
    check_batches(cfg)
