"""The sampler on a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 simulated CPU devices (subprocess, since the
device count is fixed when the backend starts)."""

import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.slow
@pytest.mark.multidevice
def test_sharded_generate_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(HERE.parents[1]))
    proc = subprocess.run([sys.executable, str(HERE / "sharded_worker.py")], capture_output=True, text=True,
                          env=env, timeout=900, cwd=HERE.parents[1])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "SHARDED_OK" in proc.stdout
