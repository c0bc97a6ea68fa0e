"""PPO on a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 simulated CPU devices (subprocess: the device count is
fixed when the backend starts): four models placed, one trace per jitted piece, finite metrics."""

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.multidevice
def test_ppo_runs_on_a_2x2x2_mesh():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(HERE.parents[1]))
    proc = subprocess.run([sys.executable, str(HERE / "ppo_sharded_worker.py")], capture_output=True, text=True,
                          env=env, timeout=1500, cwd=HERE.parents[1])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "PPO_SHARDED_OK" in proc.stdout
