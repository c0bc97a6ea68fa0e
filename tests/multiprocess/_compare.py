"""Shared helpers of the multi-process tests: launch a command on N processes × D simulated devices through
``launch/local_multiprocess.sh``, read its metrics, and check that 2 processes × 4 devices equal 1 × 8.

Real ``jax.distributed`` runs (gloo collectives on 127.0.0.1), ``data × fsdp`` spanning the processes and
``tensor`` within one; the same global batch and seed, so losses, scores and KL agree to float rounding
(rtol 1e-5).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from rlhf_jax import fixtures, tasks

ROOT = pathlib.Path(__file__).resolve().parents[2]
MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
RUN = ["run.log_every=1", "run.tensorboard=false", "run.progress=off"]  # what every training run of these tests sets
_TIMING = ("time", "per_s", "elapsed")
DENSE = "reward.functions=['tests/multiprocess/dense.py:dense_reward']"  # varies across samples (see dense.py)
RTOL, ATOL = 1e-5, 1e-6
_NOISE = ("Gloo", "SPMD", "spmd_partitioner")  # stderr lines of every healthy run, left out of failure messages


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict:
    """The tiny Llama (hidden 32, 2 layers, 4 heads / 2 KV heads) with its tokenizer, and the task data."""
    root = tmp_path_factory.mktemp("mp_assets")
    tok = fixtures.build_tokenizer(root / "tokenizer")
    model = fixtures.build_tiny_model(root / "model", "llama", tokenizer=tok, hidden=32, layers=2, heads=4,
                                      kv_heads=2, max_positions=128)
    data = tasks.write_task_data(root / "data", n_sft=64, n_pref=64, n_eval=16, n_prompts=64, seed=0)
    return {"model": str(model), **{k: str(v) for k, v in data.items()}}


def _online(a: dict) -> list[str]:
    return [f"model.path={a['model']}", f"data.path={a['prompts_train']}", "rollout.max_new_tokens=8",
            "sample_every=0", DENSE, "reward.weights=[1.0]"]


def _commands(a: dict) -> dict[str, tuple[str, list[str]]]:
    """command -> (config file, overrides) of the 2-iteration runs the tests compare."""
    offline = ["batch_size=8", "run.eval_every=0", "optim.warmup_steps=1"]
    return {
        "sft": ("sft_tiny_cpu.yaml", [f"model.path={a['model']}", f"data.path={a['sft_train']}",
                                       f"data.eval_path={a['sft_eval']}", *offline]),
        "rm": ("rm_tiny_cpu.yaml", [f"model.path={a['model']}", f"data.path={a['pref_train']}",
                                     f"data.eval_path={a['pref_eval']}", *offline]),
        "dpo": ("dpo_tiny_cpu.yaml", [f"model.path={a['model']}", f"data.path={a['pref_train']}",
                                       f"data.eval_path={a['pref_eval']}", *offline]),
        "ppo": ("ppo_tiny_cpu.yaml", _online(a) + [f"reward.model_path={a['model']}", "reward.normalize=false",
                                                    "rollout.batch_size=8", "ppo.num_minibatches=2"]),
        "grpo": ("grpo_tiny_cpu.yaml", _online(a) + ["rollout.batch_size=4"]),
        "rloo": ("rloo_tiny_cpu.yaml", _online(a) + ["rollout.batch_size=4"]),
        "reinforce_pp": ("reinforce_pp_tiny_cpu.yaml", _online(a) + ["rollout.batch_size=4"]),
        "remax": ("remax_tiny_cpu.yaml", _online(a) + ["rollout.batch_size=4"]),
        "raft": ("raft_tiny_cpu.yaml", _online(a) + ["rollout.batch_size=4"]),
        "online_dpo": ("online_dpo_tiny_cpu.yaml", _online(a) + ["rollout.batch_size=4"]),
    }


def launch_argv(command: str, config: str, args: list[str], procs: int, devices: int, *,
                grace_s: int = 30) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of ``rlhf-jax COMMAND configs/CONFIG`` on the 2 × 2 × 2 mesh, `procs` × `devices`."""
    env = dict(os.environ, PYTHON=sys.executable, RLHF_JAX_LAUNCH_TIMEOUT_S="600", RLHF_JAX_GRACE_S=str(grace_s),
               RLHF_JAX_HOST_TUNABLES="0")
    cmd = ["bash", str(ROOT / "launch" / "local_multiprocess.sh"), str(procs), str(devices), "--", sys.executable,
           "-m", "rlhf_jax", command, str(ROOT / "configs" / config), *MESH, *args]
    return cmd, env


def launch(command: str, config: str, args: list[str], procs: int, devices: int, *,
           grace_s: int = 30) -> subprocess.CompletedProcess:
    """Run the command to its end; a failure names the layout, with the processes' output (less gloo noise)."""
    cmd, env = launch_argv(command, config, args, procs, devices, grace_s=grace_s)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    err = "\n".join(ln for ln in p.stderr.splitlines() if ln.strip() and not any(n in ln for n in _NOISE))
    assert p.returncode == 0, f"{procs}x{devices} {command} failed:\n{p.stdout[-3000:]}\n{err[-6000:]}"
    return p


def read_metrics(out: pathlib.Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _run(command: str, config: str, overrides: list[str], out: pathlib.Path, procs: int, devices: int) -> list[dict]:
    """A 2-iteration training run (``run.total_steps=2`` unless `overrides` say otherwise) into `out`: its
    metrics records."""
    launch(command, config, ["run.total_steps=2", *RUN, f"run.output_dir={out}", *overrides], procs, devices)
    return read_metrics(out)


def _values(records: list[dict]) -> list[dict]:
    """The numeric, non-timing fields of each record."""
    return [{k: v for k, v in r.items() if isinstance(v, (int, float)) and not any(t in k for t in _TIMING)}
            for r in records]


def assert_runs_equal(one: list[dict], two: list[dict], label: str = "") -> None:
    """Two runs' records (``_values``) agree: as many (at least 2), the same keys, every value to rtol 1e-5."""
    assert len(one) == len(two) and len(one) >= 2, (label, one, two)
    for r1, r2 in zip(one, two):
        assert r1.keys() == r2.keys(), (label, set(r1) ^ set(r2))
        for k in r1:
            assert r2[k] == pytest.approx(r1[k], rel=RTOL, abs=ATOL), (label, r1.get("step"), k, r1[k], r2[k])


def two_equal_one(command: str, config: str, overrides: list[str], tmp_path: pathlib.Path,
                  label: str = "") -> tuple[list[dict], list[dict]]:
    """Run on 1 × 8 (into tmp_path/one) and on 2 × 4 (tmp_path/two), check they agree; their records."""
    one = _run(command, config, overrides, tmp_path / "one", 1, 8)
    two = _run(command, config, overrides, tmp_path / "two", 2, 4)
    assert_runs_equal(_values(one), _values(two), label or command)
    return one, two
