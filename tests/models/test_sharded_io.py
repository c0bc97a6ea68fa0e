"""`load_pretrained(shardings=...)` / `save_pretrained` of sharded params, on simulated CPU devices.

The device count is fixed when jax starts, so the checks run in subprocesses (`sharded_io_worker.py`):
8 devices in one process, and (slow) 2 processes x 4 devices joined by `jax.distributed`.
"""

import os
import pathlib
import subprocess
import sys

import pytest

WORKER = pathlib.Path(__file__).with_name("sharded_io_worker.py")
LAUNCH = pathlib.Path(__file__).resolve().parents[2] / "launch" / "local_multiprocess.sh"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_JAX_") and k != "XLA_FLAGS"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def _checked(p: subprocess.CompletedProcess) -> list[str]:
    assert p.returncode == 0, f"worker failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return [ln.split("CHECKED ", 1)[1] for ln in p.stdout.splitlines() if "CHECKED " in ln]


def test_sharded_load_and_save_equal_unsharded_on_8_devices(tmp_path):
    """Per case (the worker asserts each): sharded params == unsharded load, leaf by leaf and shard by
    shard, carrying the requested NamedShardings; elements read from safetensors == elements of the
    distinct addressable shards (no whole tensor read where the mesh splits it); saving the sharded
    params writes byte-identical files."""
    p = subprocess.run([sys.executable, str(WORKER), "checks", str(tmp_path)], capture_output=True, text=True,
                       env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"), timeout=1200)
    got = _checked(p)
    loads = [f"load {f} scan={s} mesh={m}" for f in ("gpt2", "llama", "qwen2", "qwen3") for s in (False, True)
             for m in ("train", "infer")]
    saves = ["save gpt2 scan=False", "save gpt2 scan=True", "save llama scan=False", "save qwen2 scan=False",
             "save qwen3 scan=False", "save qwen3 scan=True"]
    bf16 = [f"{op} bf16 {f} scan={s}" for f in ("llama", "gpt2") for s in (False, True) for op in ("load", "save")]
    bf16 += ["load bf16->f32 llama", "load bf16->f32 gpt2"]
    other = ["load multi-file qwen2", "save multi-file qwen2", "load scalar gpt2", "save scalar gpt2",
             "load scalar-from-lm llama"]
    assert sorted(got) == sorted(loads + saves + bf16 + other)


@pytest.mark.slow
def test_two_hosts_read_their_own_shards_and_process_0_writes(tmp_path):
    """2 processes x 4 devices: each process reads exactly its addressable shards' elements; params span
    both processes; save all-gathers tensor by tensor and process 0 writes the same bytes as the source."""
    p = subprocess.run(["bash", str(LAUNCH), "2", "4", "--", sys.executable, str(WORKER), "multihost", str(tmp_path)],
                       capture_output=True, text=True, env=_env(RLHF_JAX_LAUNCH_TIMEOUT_S="900"), timeout=1000)
    got = _checked(p)
    assert sorted(got) == sorted(f"multihost {op} llama scan={s}" for op in ("load", "save") for s in (False, True))
