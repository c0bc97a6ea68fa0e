"""Time to first step of every command: fresh, and resumed with and without the compilation cache.

Every command's host loop appends one line per process start to ``<output_dir>/first_step.jsonl``: the step
it started from and the seconds from the process's start (interpreter start-up, imports, model and data
loading, compilation, the step itself) to the end of its first step. This script runs each command's tiny
config (``configs/<command>_tiny_cpu.yaml``, the demo's exports as models and data) as a user would, through
``python -m rlhf_jax``, three times in one output folder:

1. **fresh**: N steps from scratch with an empty compilation-cache folder (every program compiles; N = 3
   iterations for the online commands, 12 steps for SFT / RM / DPO, whose configs warm up over 10 steps);
2. **resume, cache on**: the step-N checkpoint and the export are deleted (a preemption after step N − 1),
   and the same command resumes at step N − 1 with that cache folder (the programs load from it);
3. **resume, cache off**: the same again with ``RLHF_JAX_COMPILATION_CACHE=0`` (every program compiles again).

It prints one row per command and the machine state (load average before and after). The demo (``rlhf-jax
demo``) is built in ``--work`` first when absent (a few minutes on 2 cores).

Usage: python benchmarks/first_step.py [--work DIR] [--commands sft,rm,dpo,ppo,grpo,online_dpo,raft]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMANDS = ("sft", "rm", "dpo", "ppo", "grpo", "online_dpo", "raft")
#: steps of a run: the offline configs warm their learning rate up over 10 steps, which must fit in the run
STEPS = {"sft": 12, "rm": 12, "dpo": 12}
ONLINE_STEPS = 3


def run_command(cmd: str, work: pathlib.Path, out: pathlib.Path, cache: str) -> None:
    """One ``python -m rlhf_jax CMD`` process (cwd = ``work``, where ``runs/demo`` is the demo)."""
    argv = [sys.executable, "-m", "rlhf_jax", cmd, str(REPO / "configs" / f"{cmd}_tiny_cpu.yaml"),
            f"run.output_dir={out}", f"run.total_steps={STEPS.get(cmd, ONLINE_STEPS)}", "run.save_every=1", "run.keep_last_n=3",
            "run.eval_every=0", "run.progress=off", "run.tensorboard=false"]
    env = {**os.environ, "RLHF_JAX_COMPILATION_CACHE": cache, "PYTHONPATH": str(REPO)}
    p = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}:\n{p.stderr[-4000:]}")


def preempt_before_last_step(out: pathlib.Path, steps: int) -> None:
    """Leave the run as a kill after step N − 1 would: the step-N checkpoint and the export removed."""
    shutil.rmtree(out / "checkpoints" / str(steps))
    shutil.rmtree(out / "model", ignore_errors=True)


def first_steps(out: pathlib.Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "first_step.jsonl").read_text().splitlines() if ln.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=None, help="folder for the demo and the runs (default: a temp dir)")
    ap.add_argument("--commands", default=",".join(COMMANDS))
    args = ap.parse_args()
    work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="first_step_")).resolve()
    demo = work / "runs" / "demo"
    if not (demo / "rm" / "model" / "config.json").exists():
        print(f"[first_step] building the demo in {demo} ...", flush=True)
        subprocess.run([sys.executable, "-m", "rlhf_jax", "demo", str(demo)], cwd=work, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    load_before = os.getloadavg()
    rows = []
    for cmd in [c for c in args.commands.split(",") if c]:
        out = work / "runs" / f"first_step_{cmd}"
        shutil.rmtree(out, ignore_errors=True)
        cache = work / "xla_cache" / cmd
        shutil.rmtree(cache, ignore_errors=True)
        t0 = time.perf_counter()
        run_command(cmd, work, out, str(cache))
        preempt_before_last_step(out, STEPS.get(cmd, ONLINE_STEPS))
        run_command(cmd, work, out, str(cache))
        preempt_before_last_step(out, STEPS.get(cmd, ONLINE_STEPS))
        run_command(cmd, work, out, "0")
        lines = first_steps(out)
        resumed = STEPS.get(cmd, ONLINE_STEPS) - 1
        assert [r["start_step"] for r in lines] == [0, resumed, resumed], lines
        rows.append({"command": cmd, "fresh_s": lines[0]["to_first_step_s"], "resume_cache_s": lines[1]["to_first_step_s"],
                     "resume_no_cache_s": lines[2]["to_first_step_s"], "wall_s": time.perf_counter() - t0})
        r = rows[-1]
        print(f"[first_step] {cmd:<11} fresh {r['fresh_s']:7.1f} s   resume with cache {r['resume_cache_s']:7.1f} s   "
              f"resume without cache {r['resume_no_cache_s']:7.1f} s", flush=True)
    load_after = os.getloadavg()
    print("\n| command | fresh (empty cache) | resume, cache on | resume, cache off |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['command']} | {r['fresh_s']:.1f} s | {r['resume_cache_s']:.1f} s | {r['resume_no_cache_s']:.1f} s |")
    print(f"\nload average 1/5/15 min before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}; measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("BENCH_JSON " + json.dumps({"benchmark": "first_step", "rows": rows, "load_before": load_before,
                                      "load_after": load_after}))


if __name__ == "__main__":
    main()
