"""Every command on 2 processes × 4 simulated devices gives the same metrics as 1 process × 8 devices.

Real ``jax.distributed`` runs through ``launch/local_multiprocess.sh`` (gloo collectives on 127.0.0.1),
``data × fsdp`` spanning the processes and ``tensor`` within one; the same global batch and seed, so
losses, scores and KL agree to float rounding (rtol 1e-5). One set of outputs is written by process 0.
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
_TIMING = ("time", "per_s", "elapsed")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mp_assets")
    tok = fixtures.build_tokenizer(root / "tokenizer")
    model = fixtures.build_tiny_model(root / "model", "llama", tokenizer=tok, hidden=32, layers=2, heads=4,
                                      kv_heads=2, max_positions=128)
    data = tasks.write_task_data(root / "data", n_sft=64, n_pref=64, n_eval=16, n_prompts=64, seed=0)
    return {"model": str(model), **{k: str(v) for k, v in data.items()}}


def _online(a: dict) -> list[str]:
    return [f"model.path={a['model']}", f"data.path={a['prompts_train']}", "rollout.max_new_tokens=8",
            "sample_every=0"]


def _commands(a: dict) -> dict[str, tuple[str, list[str]]]:
    gold = "reward.functions=['rlhf_jax.tasks:gold_score']"
    return {
        "sft": ("sft_tiny_cpu.yaml", [f"model.path={a['model']}", f"data.path={a['sft_train']}",
                                       f"data.eval_path={a['sft_eval']}", "batch_size=8", "run.eval_every=0"]),
        "rm": ("rm_tiny_cpu.yaml", [f"model.path={a['model']}", f"data.path={a['pref_train']}",
                                     f"data.eval_path={a['pref_eval']}", "batch_size=8", "run.eval_every=0"]),
        "dpo": ("dpo_tiny_cpu.yaml", [f"model.path={a['model']}", f"data.path={a['pref_train']}",
                                       f"data.eval_path={a['pref_eval']}", "batch_size=8", "run.eval_every=0"]),
        "ppo": ("ppo_tiny_cpu.yaml", _online(a) + [f"reward.model_path={a['model']}", "reward.normalize=false", gold,
                                                    "rollout.batch_size=8", "ppo.num_minibatches=2"]),
        "grpo": ("grpo_tiny_cpu.yaml", _online(a) + ["rollout.batch_size=4"]),
        "rloo": ("rloo_tiny_cpu.yaml", _online(a) + ["rollout.batch_size=4"]),
        "reinforce_pp": ("reinforce_pp_tiny_cpu.yaml", _online(a) + ["rollout.batch_size=4"]),
        "remax": ("remax_tiny_cpu.yaml", _online(a) + ["rollout.batch_size=4"]),
        "raft": ("raft_tiny_cpu.yaml", _online(a) + ["rollout.batch_size=4"]),
        "online_dpo": ("online_dpo_tiny_cpu.yaml", _online(a) + ["rollout.batch_size=4"]),
    }


def _run(command: str, config: str, overrides: list[str], out: pathlib.Path, procs: int, devices: int):
    env = dict(os.environ, PYTHON=sys.executable, RLHF_JAX_LAUNCH_TIMEOUT_S="600", RLHF_JAX_GRACE_S="30",
               RLHF_JAX_HOST_TUNABLES="0")
    cmd = ["bash", str(ROOT / "launch" / "local_multiprocess.sh"), str(procs), str(devices), "--", sys.executable,
           "-m", "rlhf_jax", command, str(ROOT / "configs" / config), *overrides, *MESH, "run.total_steps=2",
           "run.log_every=1", "run.tensorboard=false", "run.progress=off", f"run.output_dir={out}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert p.returncode == 0, f"{procs}x{devices} {command} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _values(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if isinstance(v, (int, float)) and not any(t in k for t in _TIMING)}
            for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "ppo", "grpo", "rloo", "reinforce_pp", "remax", "raft",
                                     "online_dpo"])
def test_two_processes_equal_one(command, assets, tmp_path):
    config, overrides = _commands(assets)[command]
    one = _values(_run(command, config, overrides, tmp_path / "one", 1, 8))
    two = _values(_run(command, config, overrides, tmp_path / "two", 2, 4))
    assert len(one) == len(two) and len(one) >= 2, (one, two)
    for r1, r2 in zip(one, two):
        assert r1.keys() == r2.keys(), set(r1) ^ set(r2)
        for k in r1:
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-6), (command, r1["step"], k, r1[k], r2[k])
    assert (tmp_path / "two" / "model" / "config.json").exists()  # process 0 exported
