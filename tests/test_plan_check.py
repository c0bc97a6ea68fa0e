"""benchmarks/plan_check.py: ``--set`` overrides reach both the plan and the real run (tiny DPO on an fsdp mesh),
and a worker that fails prints its whole error."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.plan_check import worker_commands  # noqa: E402


def _check(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "plan_check.py"), *args], env=env,
                          capture_output=True, text=True, timeout=900)


def test_worker_commands_carry_the_same_overrides(tmp_path):
    ovr = ["model.path=m", "mesh.data=1", "mesh.fsdp=8"]
    plan, real = worker_commands("dpo", "c.yaml", ovr, tmp_path / "p.json")
    assert plan[2:10] == ["rlhf_jax.plan.worker", "dpo", "c.yaml", "cpu-8", "1", "-", str(tmp_path / "p.json"), "0"]
    assert plan[-3:] == ovr and real[-4:] == ["--", *ovr] and real[2:5] == ["--worker", "dpo", "c.yaml"]


@pytest.mark.slow
def test_set_overrides_shard_both_the_plan_and_the_real_run():
    proc = _check("--commands", "dpo", "--steps", "3", "--set", "mesh.data=1", "mesh.fsdp=8", "optim.warmup_steps=1")
    assert proc.returncode == 0, proc.stderr
    mesh = "{'data': 1, 'fsdp': 8, 'tensor': 1}"
    assert f"dpo: plan mesh {mesh}, real run mesh {mesh}" in proc.stdout, proc.stdout
    assert "--set mesh.data=1 mesh.fsdp=8 optim.warmup_steps=1" in proc.stdout
    row = next(ln.split() for ln in proc.stdout.splitlines() if ln.startswith("dpo "))
    plan_mib, real_mib, ratio = float(row[1]), float(row[2]), float(row[3])
    assert plan_mib > 0 and real_mib > 0 and abs(ratio - plan_mib / real_mib) < 0.01


def test_a_failing_worker_prints_its_whole_error():
    proc = _check("--commands", "dpo", "--steps", "3", "--set", "mesh.data=-1", "mesh.fsdp=3")
    assert proc.returncode == 1
    assert "plan_check: the plan of dpo failed (exit status 1)" in proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr  # the whole stderr, from its first line
    last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1]
    assert "does not fit topology cpu-8 (8 chips)" in last, last
