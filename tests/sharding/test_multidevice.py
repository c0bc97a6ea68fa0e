"""Runs multidevice_checks.py in a subprocess with N simulated CPU devices (N = RLHF_JAX_TEST_DEVICES,
default 8; meshes from RLHF_JAX_TEST_MESHES), so this pytest process keeps its single device."""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
@pytest.mark.multidevice
def test_sharding_invariance_on_simulated_devices():
    n = int(os.environ.get("RLHF_JAX_TEST_DEVICES", "8"))
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "--rootdir", str(REPO_ROOT),
         os.path.join(HERE, "multidevice_checks.py")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout
