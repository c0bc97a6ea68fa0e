"""Where one step's time goes inside XLA:CPU: a `jax.profiler` trace of our DPO step (`--program dpo`, the
`dpo.py` workload) or PPO iteration (`--program ppo`, the `ppo.py` workload), read back per compiled program.

Per program (HLO module), per step:
  * its wall time (the executions' "wait for completion" spans) and how much of it XLA:CPU's worker threads
    were busy: each worker's ``ThreadpoolListener`` regions (a pool thread running a task), so work that has
    no op span of its own counts too: Eigen dots run asynchronously (their op span is the ~1 ms launch, the
    product runs afterwards as pool tasks), and a YNN product's helper task runs on the other worker;
  * op time, and the wall time during which exactly one op span was open and during which two were;
  * its top products (YNN dot fusions and plain dots, by time in the program), each then timed ALONE in the
    same process (the same `dot_general`s, shapes and compiler options, random inputs) right after the trace,
    times its calls per step (a decode loop calls each product once per new token), and the worker time left
    idle while it ran (workers × its span − the workers' busy time inside the span).
The traced round's process CPU time over its wall time is printed too (2.0 = both cores busy all along).

A product that takes about twice as long in the program as alone while the other worker is busy shared the
cores with other work: the 2026-12-07 reading of "ran on one thread while the other core idled" (the LM head's
backward product, 2× its alone time) did not hold: beside it the other worker ran the head's weight gradient,
an Eigen dot whose own span is its launch.

Usage: python benchmarks/profile_step.py [--program dpo|ppo] [--model tiny|small] [--steps 3] [--top 12]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: programs that differentiate a model (compiled with `runtime.xla.gradient_compiler_options`)
GRADIENT_PROGRAMS = ("jit_step", "jit_update")
_SKIP = ("ThunkExecutor", "end:")
#: the span of one execution of a program, on the client thread (``args.run_id`` as its ops carry)
_EXECUTION = "ThunkExecutor::Execute (wait for completion)"
#: XLA:CPU's intra-op pool threads (the workers that run the ops and the products' tasks)
_WORKER_PREFIX = "tf_XLAEigen"


# ------------------------------------------------------------------------------------------ trace
def load_events(trace_path: str) -> list[dict]:
    """All events of a ``*.trace.json.gz``; complete ("X") events get their thread's name as ``thread``."""
    with gzip.open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    for e in events:
        if e.get("ph") == "X":
            e["thread"] = names.get((e["pid"], e["tid"]), "")
    return events


def load_ops(trace_path: str, events: list[dict] | None = None) -> list[dict]:
    """The trace's XLA op events (those that carry an ``hlo_module``), executors' own spans left out."""
    events = load_events(trace_path) if events is None else events
    return [e for e in events if e.get("ph") == "X" and "hlo_module" in e.get("args", {})
            and not e["name"].startswith(_SKIP)]


def worker_busy(events: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Per XLA:CPU worker thread, its busy ``(start, end)`` intervals: from each ``ThreadpoolListener::StartRegion``
    to the next ``StopRegion`` (the thread ran pool tasks in between: op thunks, async Eigen dots, YNN helpers)."""
    marks = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("thread", "").startswith(_WORKER_PREFIX) and \
                e["name"] in ("ThreadpoolListener::StartRegion", "ThreadpoolListener::StopRegion"):
            marks[e["thread"]].append((e["ts"], e["name"].endswith("StartRegion")))
    out = {}
    for thread, ms in marks.items():
        spans, opened = [], None
        for t, start in sorted(ms):
            if start and opened is None:
                opened = t
            elif not start and opened is not None:
                spans.append((opened, t))
                opened = None
        out[thread] = spans
    return out


def executions(events: list[dict]) -> dict[str, tuple[float, float]]:
    """``run_id`` → ``(start, end)`` of that execution's "wait for completion" span."""
    return {e["args"]["run_id"]: (e["ts"], e["ts"] + e["dur"]) for e in events
            if e.get("ph") == "X" and e["name"] == _EXECUTION and "run_id" in e.get("args", {})}


def idle_in(window: tuple[float, float], busy: dict[str, list[tuple[float, float]]]) -> float:
    """Worker time left idle inside ``window``: workers × its length − each worker's busy time inside it."""
    lo, hi = window
    return sum((hi - lo) - sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in spans) for spans in busy.values())


def concurrency(intervals: list[tuple[float, float]]) -> tuple[dict[int, float], dict[int, float]]:
    """``(by_count, solo)``: the time covered by exactly k of the ``(start, end)`` intervals, for each k ≥ 1
    (gaps are not counted), and for each interval (by index) the time during which it was the only one open."""
    starts = [(s, 1, i) for i, (s, _) in enumerate(intervals)]
    ends = [(e, -1, i) for i, (_, e) in enumerate(intervals)]
    points = sorted(starts + ends, key=lambda p: (p[0], p[1]))  # at equal times, ends first
    by_count: dict[int, float] = collections.Counter()
    solo: dict[int, float] = collections.Counter()
    open_, last = set(), None
    for t, d, i in points:
        if open_ and last is not None:
            by_count[len(open_)] += t - last
            if len(open_) == 1:
                solo[next(iter(open_))] += t - last
        (open_.add if d > 0 else open_.discard)(i)
        last = t
    return dict(by_count), dict(solo)


# ------------------------------------------------------------------------------------------- HLO
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* (\w[\w-]*)\(([^)]*)\)(.*)$")


def parse_module(text: str) -> tuple[dict[str, tuple], dict[str, str], dict[str, list[str]]]:
    """``shapes`` (instruction → (dtype, dims)), ``calls`` (fusion → computation) and ``bodies`` (computation →
    its instruction lines) of one optimized HLO module's text."""
    shapes, calls, bodies, current = {}, {}, {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) ", line)
        if head and line.rstrip().endswith("{"):
            current = head.group(1)
            bodies[current] = []
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, dtype, dims, op = m.group(1), m.group(2), m.group(3), m.group(4)
        shapes[name] = (dtype, tuple(int(d) for d in dims.split(",") if d))
        if current is not None:
            bodies[current].append(line)
        if op == "fusion":
            c = re.search(r"calls=%([^,\s]+)", m.group(6))
            if c:
                calls[name] = c.group(1)
    return shapes, calls, bodies


def _dims(attr: str, key: str) -> tuple[int, ...]:
    m = re.search(key + r"=\{([\d,]*)\}", attr)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def products(op: str, shapes: dict, calls: dict, bodies: dict) -> list[dict]:
    """The dots that op ``op`` runs: each ``{lhs, rhs, dtype, dims: (contract, batch)}`` (a YNN fusion may hold
    several, whose results it adds)."""
    lines = bodies.get(calls[op], []) if op in calls else [ln for b in bodies.values() for ln in b
                                                            if re.match(r"^\s*(?:ROOT )?%" + re.escape(op) + " ", ln)]
    out = []
    for line in lines:
        m = _INSTR.match(line)
        if not m or m.group(4) != "dot":
            continue
        lhs, rhs = [a.strip().lstrip("%") for a in m.group(5).split(",")[:2]]
        attr = m.group(6)
        out.append({"lhs": shapes[lhs][1], "rhs": shapes[rhs][1], "dtype": shapes[lhs][0],
                    "dims": ((_dims(attr, "lhs_contracting_dims"), _dims(attr, "rhs_contracting_dims")),
                             (_dims(attr, "lhs_batch_dims"), _dims(attr, "rhs_batch_dims")))})
    return out


def flops(dot: dict) -> float:
    """2 · (product of all lhs dims) · (rhs dims that are neither contracted nor batch)."""
    (_, rc), (_, rb) = dot["dims"]
    free_r = math.prod(d for i, d in enumerate(dot["rhs"]) if i not in rc and i not in rb)
    return 2.0 * math.prod(dot["lhs"]) * free_r


def time_alone(dots: list[dict], *, gradient: bool, iters: int = 10) -> float:
    """Median seconds of the same dots in a program alone (summed when their shapes agree, as a fusion that holds
    several adds them; else returned side by side)."""
    import jax
    import numpy as np
    from jax import lax

    from rlhf_jax.runtime import xla

    def fn(*args):
        outs = [lax.dot_general(args[2 * i], args[2 * i + 1], d["dims"]) for i, d in enumerate(dots)]
        return sum(outs[1:], outs[0]) if len({o.shape for o in outs}) == 1 else tuple(outs)

    key = jax.random.key(0)
    args = [jax.random.normal(jax.random.fold_in(key, i), s, dtype=d["dtype"].replace("f32", "float32")
                              .replace("bf16", "bfloat16"))
            for i, (d, s) in enumerate((d, s) for d in dots for s in (d["lhs"], d["rhs"]))]
    f = jax.jit(fn, compiler_options=xla.gradient_compiler_options() if gradient else None)
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


# ------------------------------------------------------------------------------------------- runs
def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def run_traced(program: str, size: str, *, steps: int, work: pathlib.Path,
               trace_dir: pathlib.Path) -> tuple[list[float], float]:
    """Our DPO step or PPO iteration: 2 warm-up steps, one untraced round, then one traced round of ``steps``.
    Returns the traced steps' seconds and the process CPU seconds (user + system) over the traced round."""
    import jax

    from benchmarks import _common as Cm

    cpu = {}

    def before_round(r):
        if r == 1:
            jax.profiler.start_trace(str(trace_dir))
            cpu[1] = _cpu_s()
        elif r == 2:
            cpu[2] = _cpu_s()
            jax.profiler.stop_trace()

    if program == "dpo":
        from benchmarks import dpo

        res = dpo.run_ours(Cm.build_llama(work / f"llama-{size}", size), steps, 2, 3, before_round)
        return res["rounds"][1], cpu[2] - cpu[1]
    from benchmarks import ppo

    model_dir, prompts = ppo.build_models(work, size)
    res = ppo.run_ours(model_dir, prompts, work / "ours", warmup=2, iters=steps, rounds=3, micro_batches=1,
                       before_round=before_round)
    return [r["iteration_s"] for r in res["rounds"][1]], cpu[2] - cpu[1]


def report(ops: list[dict], modules: dict[str, str], *, steps: int, top: int,
           runs: dict[str, tuple[float, float]] | None = None,
           busy: dict[str, list[tuple[float, float]]] | None = None) -> dict:
    """Per module: wall time and the workers' busy share (from ``runs`` and ``busy``, when given), op time,
    one-op / two-op wall time, and the top products in the program against alone, with the worker time idle
    beside each."""
    busy = busy or {}
    by_module = collections.defaultdict(list)
    for e in ops:
        by_module[e["args"]["hlo_module"]].append(e)
    out = {}
    for mod, evs in sorted(by_module.items(), key=lambda kv: -sum(e["dur"] for e in kv[1])):
        open_by_count, solo_i = concurrency([(e["ts"], e["ts"] + e["dur"]) for e in evs])
        per_op, solo, calls, idle = (collections.Counter() for _ in range(4))
        for i, e in enumerate(evs):
            per_op[e["name"]] += e["dur"]
            calls[e["name"]] += 1
            solo[e["name"]] += solo_i.get(i, 0.0)
            idle[e["name"]] += idle_in((e["ts"], e["ts"] + e["dur"]), busy)
        windows = [runs[r] for r in {e["args"].get("run_id") for e in evs} if runs and r in runs]
        wall = sum(b - a for a, b in windows)
        rows = []
        parsed = parse_module(modules[mod]) if mod in modules else None
        for name, us in per_op.most_common():
            if len(rows) == top or parsed is None:
                break
            if not (name.startswith("ynn_fusion") or re.fullmatch(r"dot(\.\d+)?", name)):
                continue
            dots = products(name, *parsed)
            if not dots:
                continue
            alone = time_alone(dots, gradient=mod in GRADIENT_PROGRAMS)
            rows.append({"op": name, "dots": [f"{d['lhs']}·{d['rhs']} c{d['dims'][0]}" for d in dots],
                         "gflop": sum(map(flops, dots)) / 1e9, "in_program_ms": us / steps / 1e3,
                         "solo_ms": solo[name] / steps / 1e3, "calls": calls[name] / steps,
                         "alone_ms": alone * 1e3 * calls[name] / steps})
        for r in rows:  # worker time idle while it ran
            r["idle_beside_ms"] = idle[r["op"]] / steps / 1e3
        out[mod] = {"wall_ms": wall / steps / 1e3 if windows else None,
                    "workers": len(busy),
                    "workers_busy": (1 - sum(idle_in(w, busy) for w in windows) / (len(busy) * wall)
                                     if windows and busy and wall > 0 else None),
                    "op_ms": sum(per_op.values()) / steps / 1e3,
                    "one_op_running_ms": open_by_count.get(1, 0.0) / steps / 1e3,
                    "two_ops_running_ms": sum(v for k, v in open_by_count.items() if k >= 2) / steps / 1e3,
                    "products": rows,
                    "idle_beside_products_ms": sum(r["idle_beside_ms"] for r in rows)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--program", default="dpo", choices=["dpo", "ppo"])
    ap.add_argument("--model", default="tiny", choices=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=3, help="traced steps (one round)")
    ap.add_argument("--top", type=int, default=12, help="products per program timed alone")
    ap.add_argument("--work", default=None, help="folder for models, dump and trace (default: a temp dir)")
    args = ap.parse_args()
    from rlhf_jax.runtime.host_memory import reexec_with_host_tunables

    reexec_with_host_tunables(sys.argv)  # as the benchmarks and the CLI run
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="profile-step-"))
    dump, trace_dir = work / "hlo", work / "trace"
    for d in (dump, trace_dir):  # an earlier run's programs and traces
        shutil.rmtree(d, ignore_errors=True)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} --xla_dump_hlo_as_text"
                               " --xla_dump_hlo_module_re=.*(step|attach|update|generate|evaluate|scores).*").strip()
    os.environ.setdefault("RLHF_JAX_COMPILATION_CACHE", "0")  # compile here, so that the dump holds every program
    from benchmarks import _common as Cm

    step_s, cpu_s = run_traced(args.program, args.model, steps=args.steps, work=work, trace_dir=trace_dir)
    (trace,) = glob.glob(str(trace_dir / "**" / "*.trace.json.gz"), recursive=True)
    events = load_events(trace)
    modules = {}
    for p in glob.glob(str(dump / "*.cpu_after_optimizations.txt")):
        modules[pathlib.Path(p).name.split(".")[1]] = pathlib.Path(p).read_text()
    res = report(load_ops(trace, events), modules, steps=args.steps, top=args.top, runs=executions(events),
                 busy=worker_busy(events))
    print(f"\n== {args.program} {args.model}: {args.steps} traced steps, "
          f"{' / '.join(f'{s:.3f}' for s in step_s)} s each (traced); process CPU time / wall over the round "
          f"{cpu_s / sum(step_s):.2f} ==")
    for mod, r in res.items():
        if r["op_ms"] < 0.01 * sum(x["op_ms"] for x in res.values()):
            continue
        busy = (f"wall {r['wall_ms']:.1f} ms/step, {r['workers']} workers busy {100 * r['workers_busy']:.1f} %; "
                if r["workers_busy"] is not None else "")
        print(f"\n{mod}: {busy}op time {r['op_ms']:.1f} ms/step; one op span open {r['one_op_running_ms']:.1f} ms, "
              f"two {r['two_ops_running_ms']:.1f} ms; worker time idle beside the listed products "
              f"{r['idle_beside_products_ms']:.1f} ms")
        for p in r["products"]:
            print(f"  {p['in_program_ms']:6.2f} ms in program ({p['solo_ms']:6.2f} solo)  {p['alone_ms']:6.2f} alone"
                  f"  ({p['in_program_ms'] / p['alone_ms']:.2f}×, {p['calls']:g} calls)"
                  f"  idle {p['idle_beside_ms']:5.2f}  {p['gflop']:5.2f} GFLOP  {p['op']}: "
                  + "; ".join(p["dots"]))
    Cm.emit_json({"benchmark": "profile_step", "program": args.program, "model": args.model,
                  "machine": Cm.machine_info(), "step_s": step_s, "cpu_per_wall": cpu_s / sum(step_s),
                  "programs": res})


if __name__ == "__main__":
    main()
