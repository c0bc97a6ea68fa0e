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
DENSE = "reward.functions=['tests/multiprocess/dense.py:dense_reward']"  # varies across samples (see dense.py)


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
            "sample_every=0", DENSE, "reward.weights=[1.0]"]


def _commands(a: dict) -> dict[str, tuple[str, list[str]]]:
    return {
        "sft": ("sft_tiny_cpu.yaml", [f"model.path={a['model']}", f"data.path={a['sft_train']}",
                                       f"data.eval_path={a['sft_eval']}", "batch_size=8", "run.eval_every=0", "optim.warmup_steps=1"]),
        "rm": ("rm_tiny_cpu.yaml", [f"model.path={a['model']}", f"data.path={a['pref_train']}",
                                     f"data.eval_path={a['pref_eval']}", "batch_size=8", "run.eval_every=0", "optim.warmup_steps=1"]),
        "dpo": ("dpo_tiny_cpu.yaml", [f"model.path={a['model']}", f"data.path={a['pref_train']}",
                                       f"data.eval_path={a['pref_eval']}", "batch_size=8", "run.eval_every=0", "optim.warmup_steps=1"]),
        "ppo": ("ppo_tiny_cpu.yaml", _online(a) + [f"reward.model_path={a['model']}", "reward.normalize=false",
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
           "-m", "rlhf_jax", command, str(ROOT / "configs" / config), *MESH, "run.total_steps=2", "run.log_every=1",
           "run.tensorboard=false", "run.progress=off", f"run.output_dir={out}", *overrides]
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


@pytest.mark.slow
def test_label_two_processes_write_one_file_equal_to_one_process(assets, tmp_path):
    """Each host labels its slice of every prompt batch; process 0 writes every host's rows in prompt order."""
    overrides = [f"model.path={assets['model']}", f"data.path={assets['prompts_eval']}", "rollout.batch_size=6",
                 "rollout.max_new_tokens=8", DENSE, "reward.weights=[1.0]"]
    env = dict(os.environ, PYTHON=sys.executable, RLHF_JAX_HOST_TUNABLES="0")
    rows = {}
    for procs, devices in ((1, 8), (2, 4)):
        out = tmp_path / f"{procs}x{devices}.jsonl"
        cmd = ["bash", str(ROOT / "launch" / "local_multiprocess.sh"), str(procs), str(devices), "--", sys.executable,
               "-m", "rlhf_jax", "label", str(ROOT / "configs" / "label_tiny_cpu.yaml"), *overrides,
               "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", f"output_path={out}"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        rows[procs] = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(rows[1]) > 0
    assert [r["prompt"] for r in rows[2]] == [r["prompt"] for r in rows[1]]
    for a, b in zip(rows[1], rows[2]):
        assert (a["chosen"], a["rejected"]) == (b["chosen"], b["rejected"])
        assert b["score_chosen"] == pytest.approx(a["score_chosen"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_resume_across_process_counts(assets, tmp_path):
    """GRPO checkpointed on 2 x 4 after 2 iterations resumes on 1 x 8 (and a 1 x 8 checkpoint on 2 x 4) at the
    same global step with the same data order: iteration 3 equals the uninterrupted 1 x 8 run's."""
    config, overrides = _commands(assets)["grpo"]
    straight = _values(_run(command := "grpo", config, overrides + ["run.total_steps=3"], tmp_path / "straight", 1, 8))
    for first, then in (((2, 4), (1, 8)), ((1, 8), (2, 4))):
        out = tmp_path / f"{first[0]}to{then[0]}"
        _run(command, config, overrides + ["run.save_every=1"], out, *first)  # 2 iterations, checkpointed
        resumed = _values(_run(command, config, overrides + ["run.total_steps=3"], out, *then))
        assert [r["step"] for r in resumed] == [1, 2, 3]  # steps 1-2 kept, 3 appended once
        for k, v in straight[2].items():
            assert resumed[2][k] == pytest.approx(v, rel=1e-5, abs=1e-6), (first, then, k, v, resumed[2][k])
