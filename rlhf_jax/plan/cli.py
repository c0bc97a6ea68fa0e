"""The ``plan`` command: parses the flags here, compiles in a child process whose devices are the topology's.

The child gets ``JAX_PLATFORMS=cpu`` (no TPU is probed, libtpu only compiles) and, for ``cpu-N``,
``XLA_FLAGS=--xla_force_host_platform_device_count=N``; so the parent never initialises a JAX backend.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys

HELP = "per-chip memory / FLOPs / collectives of every program of a run, compiled ahead of time for a topology"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config of any training command")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as for the command itself")
    p.add_argument("--topology", required=True, help="v5e-256, v6e-64, v4-32, v5p-128, v5e:4x4, cpu-N, or h100-N / h200-N "
                   "(cpu-N compared against that GPU's memory: an XLA:CPU estimate, not a GPU compile)")
    p.add_argument("--num-slices", type=int, default=1, help="slices over DCN (default 1)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--command", default=None, dest="plan_command",
                   help="the config's command (default: from the file name, e.g. ppo_tiny_cpu.yaml -> ppo)")
    p.add_argument("--hbm-gib", type=float, default=None,
                   help="memory per device to compare against (default: the chip's HBM; cpu-N: host RAM / N)")
    p.add_argument("--no-knobs", action="store_true", help="skip the re-plans that look for a setting that fits")


def infer_command(config: str) -> str:
    """The command whose name starts the config's file name (longest match: ``online_dpo_x`` -> online_dpo)."""
    from rlhf_jax.recipes import REGISTRY

    stem = pathlib.Path(config).stem
    names = [n for n in REGISTRY if stem == n or stem.startswith(n + "_")]
    if stem.startswith(("kto", "simpo", "orpo", "ipo")):
        names.append("dpo")
    if stem.startswith("superhf"):
        names.append("raft")
    if not names:
        raise ValueError(f"{config}: cannot tell the command from the file name; pass --command "
                         f"(one of {', '.join(REGISTRY)})")
    return max(names, key=len)


def child_env(topo, environ=os.environ) -> dict:
    """The compile process's environment (see the module docstring)."""
    env = dict(environ, JAX_PLATFORMS="cpu")
    env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no TPU is opened, so skip libtpu's lockfile
    root = str(pathlib.Path(__file__).resolve().parents[2])
    extra = [root] + ([environ["RLHF_JAX_LIBTPU_DIR"]] if environ.get("RLHF_JAX_LIBTPU_DIR") else [])
    env["PYTHONPATH"] = os.pathsep.join(extra + ([environ["PYTHONPATH"]] if environ.get("PYTHONPATH") else []))
    flags = [f for f in environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    if topo.platform == "cpu":
        flags.append(f"--xla_force_host_platform_device_count={topo.num_devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def main(args: argparse.Namespace) -> int:
    from rlhf_jax.plan.topology import parse_topology

    if not os.path.isfile(args.config):
        raise FileNotFoundError(f"config file {args.config} not found")
    topo = parse_topology(args.topology, num_slices=args.num_slices, hbm_gib=args.hbm_gib)
    command = args.plan_command or infer_command(args.config)
    cmd = [sys.executable, "-m", "rlhf_jax.plan.worker", command, args.config, args.topology, str(args.num_slices),
           "-" if args.hbm_gib is None else str(args.hbm_gib), args.json or "-", "0" if args.no_knobs else "1",
           *args.overrides]
    proc = subprocess.run(cmd, env=child_env(topo), stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        if os.environ.get("RLHF_JAX_TRACEBACK"):
            print(proc.stderr, file=sys.stderr, end="")
        raise ValueError(lines[-1] if lines else f"plan process exited with {proc.returncode}")
    return 0
