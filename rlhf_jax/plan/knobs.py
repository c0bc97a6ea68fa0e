"""Which of a config's knobs would make a plan fit: each candidate override re-planned, its peak shown."""

from __future__ import annotations

from typing import Any, Sequence

#: command family -> candidate overrides (each tried alone on top of the user's overrides)
_COMMON_MODEL = ("model.remat=full", "model.dtype=bfloat16")


def candidates(command: str, cfg: Any) -> list[str]:
    """Overrides worth trying for ``cfg`` (only knobs the config has and does not already use)."""
    out = [k for k in _COMMON_MODEL if str(getattr(cfg.model, k.split("=")[0].split(".")[1])) != k.split("=")[1]]
    if hasattr(cfg, "frozen_dtype") and cfg.frozen_dtype != "bfloat16":
        out.append("frozen_dtype=bfloat16")
    if hasattr(cfg, "num_micro_batches"):
        out.append(f"num_micro_batches={cfg.num_micro_batches * 2}")
    for section in ("ppo", "algo"):
        h = getattr(cfg, section, None)
        if h is not None and hasattr(h, "num_micro_batches"):
            out.append(f"{section}.num_micro_batches={h.num_micro_batches * 2}")
    if hasattr(cfg, "rollout") and cfg.rollout.batch_size % 2 == 0:
        out.append(f"rollout.batch_size={cfg.rollout.batch_size // 2}")
    m = cfg.mesh
    if m.data != 1 and m.fsdp == 1:  # move the data axis to fsdp: params and optimizer state get split
        out.append(f"mesh.fsdp={m.data if m.data != -1 else -1}")
    return out


def with_knobs(rep: dict, command: str, config: str, overrides: Sequence[str], topo) -> dict:
    """``rep`` plus ``rep["knobs"]``: each candidate re-planned (only when the plan does not fit)."""
    from rlhf_jax.plan.run import plan
    from rlhf_jax.recipes import load_trainer_config

    if rep["fits"]:
        return rep
    cfg = load_trainer_config(command, config, overrides)
    knobs = []
    for o in candidates(command, cfg):
        extra = [o] + (["mesh.data=1"] if o.startswith("mesh.fsdp") else [])
        try:
            r = plan(command, load_trainer_config(command, config, [*overrides, *extra]), topo)
            knobs.append({"override": " ".join(extra), "peak": r["peak"], "fits": r["fits"]})
        except Exception as e:  # a knob the config's validation refuses (divisibility...) is reported, not fatal
            knobs.append({"override": " ".join(extra), "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"})
    return {**rep, "knobs": sorted(knobs, key=lambda k: k.get("peak", float("inf")))}
