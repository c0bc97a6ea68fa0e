"""Check `rlhf-jax plan` against reality: the plan's per-device peak on cpu-8 vs the peak measured in a real run
of the same config on 8 simulated CPU devices.

    python benchmarks/plan_check.py [--commands ppo grpo dpo] [--size tiny|small|100m] [--steps 3] [--set KEY=VALUE ...]
    flock /work/heavy.lock python benchmarks/plan_check.py --size 100m --set mesh.data=1 mesh.fsdp=8

``--set`` takes the dotted overrides the CLI accepts (``mesh.fsdp=8``, ``model.scan_layers=true``) and gives the
same ones to the plan and to the real run. The tiny configs' mesh is ``data: 8`` (params, grads and Adam
state replicated on every device): at ~100M that is ~3 GB per device, 24 GB for the 8 simulated devices of one
process; ``mesh.data=1 mesh.fsdp=8`` shards them.

Measured peak per device of a real run (XLA:CPU keeps device buffers in host memory, one process for 8 devices):

    resident  = the largest per-device bytes of `jax.live_arrays()` just before an iteration (train states,
                frozen models: real buffers, counted from their shards)
    transient = (VmHWM during the iteration - VmRSS just before it) / 8, with the high-water mark reset
                (`/proc/self/clear_refs` = 5) before each iteration after the first (the first compiles);
                malloc is told to mmap every block >= 64 KiB and unmap it on free (GLIBC_TUNABLES), else a
                buffer freed in one iteration is reused from the retained heap in the next and never seen
    real peak = max over iterations of resident + transient

Host-side work inside an iteration (decoding responses, Python reward functions, numpy batches) is in the
transient too; with the tiny model it is not negligible against the device buffers (see the printed numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZES = {"tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2), "small": dict(hidden=256, layers=4, heads=8, kv_heads=4),
         "100m": dict(hidden=768, layers=12, heads=12, kv_heads=2, intermediate=2048, vocab_size=16384)}  # _common's "small"
CONFIGS = {"ppo": "configs/ppo_tiny_cpu.yaml", "grpo": "configs/grpo_tiny_cpu.yaml", "dpo": "configs/dpo_tiny_cpu.yaml"}


def overrides(command: str, model: pathlib.Path, data: dict, out: pathlib.Path, steps: int) -> list[str]:
    run = [f"run.output_dir={out}", f"run.total_steps={steps}", "run.save_every=0", "run.tensorboard=false",
           "run.resume=never", "run.overwrite=true", "run.log_every=1"]
    if command == "dpo":
        return [f"model.path={model}", f"data.path={data['pref_train']}", "data.eval_path=null", *run]
    extra = [f"reward.model_path={model}", "reward.normalize=false"] if command == "ppo" else []
    return [f"model.path={model}", f"data.path={data['prompts_train']}", "sample_every=0", *extra, *run]


def worker_commands(command: str, config: str, ovr: list[str], plan_json: pathlib.Path) -> tuple[list, list]:
    """argv of the plan worker (cpu-8, no knobs) and of the real-run worker, both with the same overrides."""
    plan = [sys.executable, "-m", "rlhf_jax.plan.worker", command, config, "cpu-8", "1", "-", str(plan_json), "0",
            *ovr]
    real = [sys.executable, __file__, "--worker", command, config, "--", *ovr]
    return plan, real


def _run(argv: list, env: dict, what: str) -> subprocess.CompletedProcess | None:
    """Runs a worker; on failure prints its whole stderr (and stdout) and the exit status, returns None."""
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode == 0:
        return proc
    why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    print(f"plan_check: the {what} failed ({why}{', e.g. out of memory' if proc.returncode == -9 else ''})\n"
          f"--- stdout ---\n{proc.stdout}--- stderr ---\n{proc.stderr}", file=sys.stderr, flush=True)
    return None


def _status(key: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(command: str, config: str, ovr: list[str]) -> dict:
    """In a process with 8 CPU devices: run the recipe, measure each iteration after the first."""
    import gc
    import importlib

    import jax

    from rlhf_jax.plan.analyze import per_chip_bytes
    from rlhf_jax.recipes import REGISTRY, load_trainer_config

    cfg = load_trainer_config(command, config, ovr)
    module = importlib.import_module(REGISTRY[command][0])
    original = module.run_loop
    samples = []

    def run_loop(loop, state):
        inner, calls = loop.step, []

        def step(index, st):
            calls.append(index)
            if len(calls) == 1:  # the first iteration compiles every program: not measured
                return inner(index, st)
            gc.collect()
            resident = per_chip_bytes(jax.live_arrays())
            pathlib.Path("/proc/self/clear_refs").write_text("5")
            rss0 = _status("VmRSS")
            out = inner(index, st)
            jax.block_until_ready(out[0])
            transient = (_status("VmHWM") - rss0) / len(jax.devices())
            samples.append({"resident": resident, "transient": transient, "peak": resident + transient})
            return out

        loop.step = step
        return original(loop, state)

    module.run_loop = run_loop
    module.train(cfg)
    mesh = {k: getattr(cfg.mesh, k) for k in ("data", "fsdp", "tensor")}
    return {"iterations": samples, "peak": max(s["peak"] for s in samples[1:] or samples), "mesh": mesh}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--commands", nargs="+", default=["ppo", "grpo", "dpo"], choices=sorted(CONFIGS))
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--steps", type=int, default=6)  # > the tiny configs' warmup_steps
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="sets",
                   help="dotted config overrides for both the plan and the real run (e.g. mesh.data=1 mesh.fsdp=8)")
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(measure(a.worker[0], a.worker[1], a.rest)), flush=True)
        return 0
    from rlhf_jax import fixtures, tasks

    work = pathlib.Path(tempfile.mkdtemp(prefix="plan_check_"))
    tok = fixtures.build_tokenizer(work / "tokenizer")
    model = fixtures.build_tiny_model(work / "model", "llama", tokenizer=tok, max_positions=256, **SIZES[a.size])
    data = tasks.write_task_data(work / "data", n_sft=64, n_pref=128, n_eval=16, n_prompts=64, seed=0)
    # Buffers >= 64 KiB are mmap'd and unmapped on free (no dynamic threshold, no retained heap), so VmRSS
    # follows the live buffers: a buffer freed in the first iteration is not reused unseen in the next.
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", RLHF_JAX_HOST_TUNABLES="0",
               GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=65536",
               XLA_FLAGS="--xla_force_host_platform_device_count=8", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    rows = []
    _print([], a, header=True)
    for command in a.commands:
        ovr = overrides(command, model, data, work / f"run_{command}", a.steps) + list(a.sets)
        config = str(ROOT / CONFIGS[command])
        out = work / f"plan_{command}.json"
        plan_argv, real_argv = worker_commands(command, config, ovr, out)
        if _run(plan_argv, env, f"plan of {command}") is None:
            return 1
        planned = json.loads(out.read_text())
        proc = _run(real_argv, env, f"real run of {command}")
        if proc is None:
            return 1
        real = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
        print(f"{command}: plan mesh {planned['mesh']}, real run mesh {real['mesh']}; per program (plan MiB): "
              + ", ".join(f"{r['name']} {r['peak'] / 2 ** 20:.1f}" for r in planned["programs"])
              + "; real iterations (resident + transient MiB): "
              + ", ".join(f"{s['resident'] / 2 ** 20:.1f} + {s['transient'] / 2 ** 20:.1f}"
                          for s in real["iterations"]), flush=True)
        rows.append((command, planned["peak"], real["peak"], real["iterations"][-1]))
        _print(rows[-1:], a, header=False)
    return 0


def _print(rows, a, *, header: bool) -> None:
    mib = 1024 ** 2
    if header:
        sets = f", --set {' '.join(a.sets)}" if a.sets else ""
        print(f"plan vs real per-device peak on 8 simulated CPU devices ({a.size} model, {a.steps} iterations{sets})")
        print(f"{'command':<8}{'plan MiB':>10}{'real MiB':>10}{'plan/real':>10}   real = resident + transient "
              "(last iteration)")
    for command, plan_b, real_b, last in rows:
        print(f"{command:<8}{plan_b / mib:>10.1f}{real_b / mib:>10.1f}{plan_b / real_b:>10.2f}   "
              f"{last['resident'] / mib:.1f} + {last['transient'] / mib:.1f}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
