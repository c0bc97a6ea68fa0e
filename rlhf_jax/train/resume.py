"""Which checkpoint a run starts from: `RunConfig.resume` resolved against the run's checkpoint folder.

Separate from `rlhf_jax.checkpoint` (which reads and writes checkpoints through Orbax): this only chooses a
directory and step, from the complete steps `checkpoint.checkpoint_steps` lists.
"""

from __future__ import annotations

import os
import pathlib

from rlhf_jax.checkpoint import checkpoint_steps


def resolve_resume(resume: str, output_checkpoint_dir: str | os.PathLike) -> tuple[pathlib.Path, int] | None:
    """Turn `RunConfig.resume` into `(checkpoint directory, step)` or None (start fresh).

    "never" → None; "auto" → latest step in `output_checkpoint_dir` if any, else None; anything else is a
    path: a Checkpointer directory (its latest step) or one step folder inside it (``.../checkpoints/500``).

    Raises:
      FileNotFoundError: an explicit path that holds no complete checkpoint.
    """
    if resume == "never":
        return None
    if resume == "auto":
        d = pathlib.Path(output_checkpoint_dir)
        if not d.is_dir():
            return None
        step = _latest(d)
        return None if step is None else (d.absolute(), step)
    p = pathlib.Path(resume)
    if p.is_dir() and p.name.isdigit() and (p.parent / p.name).is_dir() and _latest(p.parent) is not None:
        if int(p.name) in checkpoint_steps(p.parent):
            return p.parent.absolute(), int(p.name)
    if p.is_dir():
        step = _latest(p)
        if step is not None:
            return p.absolute(), step
    raise FileNotFoundError(f"resume={resume!r}: no complete checkpoint found there")


def _latest(d: pathlib.Path) -> int | None:
    steps = checkpoint_steps(d)
    return steps[-1] if steps else None
