"""launch/ scripts: syntax, usage errors, and failure propagation of local_multiprocess.sh (no JAX)."""

import os
import subprocess
import sys

import pytest

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "launch")


@pytest.mark.parametrize("script", ["local_multiprocess.sh", "tpu_pod.sh", "slurm.sbatch"])
def test_syntax_and_strict_mode(script):
    path = os.path.join(LAUNCH, script)
    subprocess.run(["bash", "-n", path], check=True)
    assert "set -euo pipefail" in open(path).read()


@pytest.mark.parametrize("script,args", [("local_multiprocess.sh", ["2"]), ("local_multiprocess.sh", ["x", "4", "--", "true"]),
                                         ("tpu_pod.sh", ["tpu"]), ("slurm.sbatch", [])])
def test_usage_errors_exit_2(script, args):
    p = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True, text=True)
    assert p.returncode == 2 and "usage" in p.stderr


def test_local_multiprocess_env_prefix_and_first_failure():
    code = ("import os, sys; i = int(os.environ['RLHF_JAX_PROCESS_ID']); "
            "print(os.environ['RLHF_JAX_NUM_PROCESSES'], os.environ['RLHF_JAX_LOCAL_DEVICE_COUNT'], "
            "os.environ['RLHF_JAX_COORDINATOR'].startswith('127.0.0.1:')); sys.exit(3 if i == 1 else 0)")
    p = subprocess.run(["bash", os.path.join(LAUNCH, "local_multiprocess.sh"), "3", "2", "--", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHON=sys.executable))
    assert p.returncode == 3, p.stderr
    for i in range(3):
        assert f"[p{i}] 3 2 True" in p.stdout
    assert "exit statuses: p0=0 p1=3 p2=0" in p.stderr


def test_local_multiprocess_kills_a_hung_survivor_after_grace():
    code = "import os, sys, time; i = int(os.environ['RLHF_JAX_PROCESS_ID']); sys.exit(5) if i == 0 else time.sleep(60)"
    p = subprocess.run(["bash", os.path.join(LAUNCH, "local_multiprocess.sh"), "2", "1", "--", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PYTHON=sys.executable, RLHF_JAX_GRACE_S="2"))
    assert p.returncode == 5, p.stderr
    assert "process 1 still running 2s after process 0 failed; killing it" in p.stderr
    assert "p0=5 p1=124" in p.stderr or "p0=5 p1=143" in p.stderr, p.stderr
