"""Plan one config on one topology: build its programs, compile each, and print the table.

Runs in a process whose devices are the topology's (``rlhf_jax.plan.cli`` starts it): abstract TPU devices
from libtpu, or N simulated CPU devices.
"""

from __future__ import annotations

import re
from typing import Any

from rlhf_jax import sharding as shd
from rlhf_jax.plan.abstract import RunPrograms
from rlhf_jax.plan.analyze import COLLECTIVES, ProgramReport, analyse, per_chip_bytes
from rlhf_jax.plan.topology import GIB, Topology, topology_devices

#: command -> builder(cfg, mesh) -> RunPrograms
BUILDERS = {
    "sft": "rlhf_jax.plan.offline:plan_sft",
    "rm": "rlhf_jax.plan.offline:plan_rm",
    "dpo": "rlhf_jax.plan.offline:plan_dpo",
    "raft": "rlhf_jax.plan.sampling:plan_raft",
    "online_dpo": "rlhf_jax.plan.sampling:plan_online_dpo",
    "label": "rlhf_jax.plan.sampling:plan_label",
    "critique": "rlhf_jax.plan.sampling:plan_critique",
    "ilql": "rlhf_jax.plan.offline:plan_ilql",
    "ppo": "rlhf_jax.plan.online:plan_ppo",
    "grpo": "rlhf_jax.plan.online:plan_critic_free",
    "rloo": "rlhf_jax.plan.online:plan_critic_free",
    "reinforce_pp": "rlhf_jax.plan.online:plan_critic_free",
    "remax": "rlhf_jax.plan.online:plan_critic_free",
}


def build(command: str, cfg: Any, mesh) -> RunPrograms:
    import importlib

    if command not in BUILDERS:
        raise ValueError(f"rlhf-jax plan: no planner for command {command!r} yet (planned: {sorted(BUILDERS)})")
    module, fn = BUILDERS[command].split(":")
    return getattr(importlib.import_module(module), fn)(cfg, mesh)


def make_mesh(cfg_mesh: shd.MeshConfig, topo: Topology):
    """The run's mesh on the topology's devices; a mesh that does not cover the chips says so."""
    devices = topology_devices(topo)
    try:
        shape = cfg_mesh.shape(len(devices))
    except ValueError as e:
        raise ValueError(f"mesh {dict(data=cfg_mesh.data, fsdp=cfg_mesh.fsdp, tensor=cfg_mesh.tensor)} does not fit "
                         f"topology {topo.name} ({len(devices)} chips): {e}") from None
    return shd.make_mesh(shd.MeshConfig(*shape), devices)


def lower(p, mesh) -> Any:
    """``jax.stages.Lowered`` of a planned program, traced under the mesh and its rules (as ``jit_sharded`` calls)."""
    if hasattr(p.fn, "jitted") or hasattr(p.fn, "lower"):
        with shd.mesh_context(mesh, p.rules):
            return getattr(p.fn, "jitted", p.fn).lower(*p.args)
    return p.fn()


_NEEDED = re.compile(r"HLO temporaries \(([0-9.]+)([KMGT]?)\)")


def refused_report(p, lowered, error: Exception, *, other_resident: int, num_devices: int) -> ProgramReport | None:
    """The row of a program the TPU compiler refused for lack of HBM (RESOURCE_EXHAUSTED): its arguments from
    the abstract inputs, its temporaries as the compiler's message states them; None for any other error."""
    text = str(error)
    m = _NEEDED.search(text)
    if "RESOURCE_EXHAUSTED" not in text or m is None:
        return None
    temps = int(float(m.group(1)) * {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[m.group(2)])
    args = per_chip_bytes(p.args) if p.args else 0
    cost = lowered.cost_analysis() or {}
    flops = float(cost.get("flops", 0.0)) / num_devices  # the unpartitioned program's count, split evenly
    return ProgramReport(name=p.name, arguments=args, outputs=0, aliased=0, temporaries=temps, code=0,
                         program_peak=args + temps, other_resident=other_resident,
                         peak=args + temps + other_resident, flops=flops, collectives={},
                         note=f"{p.name}: refused by the compiler: {text.splitlines()[0][:200]}")


def plan(command: str, cfg: Any, topo: Topology) -> dict:
    """Compile every program of ``cfg`` for ``topo``; returns the report (also what ``--json`` writes)."""
    mesh = make_mesh(cfg.mesh, topo)
    run = build(command, cfg, mesh)
    resident = {k: per_chip_bytes(v) for k, v in run.resident.items()}
    rows = []
    for p in run.programs:
        live = run.resident.keys() if p.live is None else p.live
        other = sum(resident[k] for k in live if k not in p.uses)
        lowered = lower(p, mesh)
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - libtpu refuses a program that cannot fit the chip's HBM
            refused = refused_report(p, lowered, e, other_resident=other, num_devices=topo.num_devices)
            if refused is None:
                raise
            rows.append(refused.as_dict())
            continue
        rows.append(analyse(p.name, compiled, other_resident=other, note=p.note, cpu=topo.platform == "cpu").as_dict())
    peak = max(r["peak"] for r in rows)
    worst = max(rows, key=lambda r: r["peak"])
    contributors = dict(resident)
    contributors.update(run.extra)
    contributors[f"activations + temporaries ({worst['name']})"] = worst["temporaries"]
    if worst.get("runtime_scratch"):
        contributors[f"XLA:CPU fused-dot scratch ({worst['name']})"] = worst["runtime_scratch"]
    return {"command": command, "topology": topo.name, "platform": topo.platform, "num_devices": topo.num_devices,
            "num_slices": topo.num_slices, "mesh": dict(mesh.shape), "hbm_bytes": topo.hbm_bytes,
            "note": topo.estimate_note, "programs": rows, "peak": peak, "fits": peak <= topo.hbm_bytes,
            "contributors": dict(sorted(contributors.items(), key=lambda kv: -kv[1]))}


def _b(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024 ** 2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _flops(f: float) -> str:
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if f >= size:
            return f"{f / size:.2f}{unit}"
    return f"{f:.0f}"


def _coll(c: dict) -> str:
    short = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
             "collective-permute": "CP"}
    parts = [f"{short[k]} {v['count']}x/{_b(v['bytes'])}" for k, v in c.items() if k in COLLECTIVES]
    return ", ".join(parts) or "-"


def format_report(rep: dict) -> str:
    """The table: program | per-chip args / outputs / temps / peak vs HBM | FLOPs | collectives | fits."""
    hbm = rep["hbm_bytes"]
    head = ("program", "arguments", "outputs", "temps", "peak/chip", "of HBM", "GFLOPs/chip", "collectives", "fits")
    lines = [f"rlhf-jax plan: {rep['command']} on {rep['topology']} ({rep['num_devices']} devices, mesh "
             f"{rep['mesh']}, {_b(hbm)} per device)", f"note: {rep['note']}"]
    table = [head]
    for r in rep["programs"]:
        table.append((r["name"], _b(r["arguments"]), _b(r["outputs"]), _b(r["temporaries"]), _b(r["peak"]),
                      f"{100 * r['peak'] / hbm:.0f}%", f"{r['flops'] / 1e9:.2f}", _coll(r["collectives"]),
                      "yes" if r["peak"] <= hbm else "NO"))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for k, row in enumerate(table):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("peak/chip = arguments + outputs - donated + temporaries + resident buffers the program does not "
                 "read (train states, frozen models)" + (" + XLA:CPU's fused-dot scratch (cpu-N only)"
                                                         if rep["platform"] == "cpu" else "")
                 + "; collectives: count x bytes in the program text (a loop body once)")
    lines += [f"  {r['note']}" for r in rep["programs"] if r.get("note")]
    lines.append(f"run peak {_b(rep['peak'])} per device of {_b(hbm)}: {'fits' if rep['fits'] else 'DOES NOT FIT'}")
    lines.append("largest contributors (per device):")
    for k, v in list(rep["contributors"].items())[:8]:
        lines.append(f"  {k:<48} {_b(v)}")
    for kn in rep.get("knobs", []):
        lines.append(f"  try {kn['override']:<40} -> peak {_b(kn['peak'])} ({'fits' if kn['fits'] else 'no'})"
                     if "peak" in kn else f"  try {kn['override']:<40} -> {kn['error']}")
    return "\n".join(lines)
