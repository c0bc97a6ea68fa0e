"""Keeps benchmarks/rollout.py from rotting: run it in --quick mode and check its JSON record (no timing
assertions: the machine is shared)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import _common  # noqa: E402


@pytest.mark.slow
def test_quick_benchmark_prints_json(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rollout.py"), "--quick", "--workdir",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = _common.parse_json_line(proc.stdout)
    assert record["benchmark"] == "rollout"
    (res,) = record["results"]
    assert res["model"] == "tiny" and res["new_tokens"] == 8 and res["batch"] == 4
    for k in ("ours_tokens_per_s", "torch_tokens_per_s", "speedup", "ours_compile_s", "decode_step_ms",
              "matmul_floor_ms", "bandwidth_floor_ms", "ours_peak_rss_mb", "torch_peak_rss_mb"):
        assert res[k] > 0, k
    assert res["max_abs_logit_diff_vs_torch"] < 1e-3  # the same weights loaded on both sides
    assert "ours tokens/s" in proc.stdout  # the human-readable table
    # re-executed with the CLI's allocator tunables, like the other benchmarks (both sides run under them)
    from rlhf_jax.runtime import host_memory

    if env.get(host_memory.ENV, "1") != "0" and "GLIBC_TUNABLES" not in os.environ:
        assert host_memory.tunables_for(env) in record["machine"]["glibc_tunables"]


def test_parse_json_line():
    text = "table\nBENCH_JSON {\"a\": 1}\nmore\nBENCH_JSON {\"a\": 2}\n"
    assert _common.parse_json_line(text) == {"a": 2}
    with pytest.raises(ValueError, match="no BENCH_JSON"):
        _common.parse_json_line("nothing")


def test_time_call_counts_iterations():
    calls = []
    t = _common.time_call(lambda: calls.append(1), warmup=2, iters=3)
    assert len(calls) == 5 and len(t.times_s) == 3 and t.min_s <= t.median_s
