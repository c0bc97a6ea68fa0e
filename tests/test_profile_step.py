"""benchmarks/profile_step.py: the trace arithmetic and HLO reading on hand-made inputs, and one real run
(no timing assertions: the machine is shared)."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _common  # noqa: E402
from benchmarks import profile_step as ps  # noqa: E402

# the shape of XLA:CPU's optimized HLO text (`--xla_dump_hlo_as_text`), cut down
HLO = """HloModule jit_step, entry_computation_layout={(f32[64,32]{1,0}, f32[16,32]{1,0})->f32[64,16]{1,0}}

%fused_computation.3 (param_0.1: f32[64,32], param_1.1: f32[16,32], param_2.1: f32[64,32]) -> f32[64,16] {
  %param_0.1 = f32[64,32]{1,0} parameter(0)
  %param_1.1 = f32[16,32]{1,0} parameter(1)
  %dot_general.1 = f32[64,16]{1,0} dot(%param_0.1, %param_1.1), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  %param_2.1 = f32[64,32]{1,0} parameter(2)
  %dot_general.2 = f32[64,16]{1,0} dot(%param_2.1, %param_1.1), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  ROOT %add.1 = f32[64,16]{1,0} add(%dot_general.1, %dot_general.2)
}

ENTRY %main.9 (x.1: f32[64,32], w.1: f32[16,32]) -> f32[64,16] {
  %x.1 = f32[64,32]{1,0} parameter(0)
  %w.1 = f32[16,32]{1,0} parameter(1)
  %ynn_fusion.3 = f32[64,16]{1,0} fusion(%x.1, %w.1, %x.1), kind=kCustom, calls=%fused_computation.3
%dot = f32[4,2,8] dot(%b,%c), lhs_batch_dims={0}, lhs_contracting_dims={2}, rhs_batch_dims={0}, rhs_contracting_dims={1}
  %b = f32[4,2,5]{2,1,0} parameter(2)
  %c = f32[4,5,8]{2,1,0} parameter(3)
  ROOT %copy.1 = f32[64,16]{1,0} copy(%ynn_fusion.3)
}
"""


def test_concurrency_counts_overlap_and_solo_time():
    by_count, solo = ps.concurrency([(0.0, 10.0), (5.0, 15.0), (20.0, 25.0)])
    assert by_count == {1: 15.0, 2: 5.0}  # 0–5, 10–15, 20–25 alone; 5–10 both; the gap 15–20 not counted
    assert solo == {0: 5.0, 1: 5.0, 2: 5.0}


def test_concurrency_back_to_back_intervals_are_not_overlap():
    by_count, solo = ps.concurrency([(0.0, 4.0), (4.0, 6.0)])
    assert by_count == {1: 6.0} and solo == {0: 4.0, 1: 2.0}


def _x(name, ts, dur=0.0, thread="tf_XLAEigen/1", **args):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "thread": thread, "args": args}


def test_worker_busy_pairs_regions_per_worker_thread():
    events = [_x("ThreadpoolListener::StartRegion", 0.0), _x("ThreadpoolListener::StopRegion", 4.0),
              _x("ThreadpoolListener::StartRegion", 6.0), _x("ThreadpoolListener::StopRegion", 10.0),
              _x("ThreadpoolListener::StopRegion", 1.0, thread="tf_XLAEigen/2"),  # opened before the trace
              _x("ThreadpoolListener::StartRegion", 2.0, thread="tf_XLAEigen/2"),
              _x("ThreadpoolListener::StopRegion", 9.0, thread="tf_XLAEigen/2"),
              _x("ThreadpoolListener::StartRegion", 0.0, thread="tf_XLAPjRtCpuClient/3"),  # not a worker
              _x("ThreadpoolListener::StopRegion", 10.0, thread="tf_XLAPjRtCpuClient/3")]
    assert ps.worker_busy(events) == {"tf_XLAEigen/1": [(0.0, 4.0), (6.0, 10.0)], "tf_XLAEigen/2": [(2.0, 9.0)]}


def test_idle_in_counts_each_workers_gaps_inside_the_window():
    busy = {"w1": [(0.0, 4.0), (6.0, 10.0)], "w2": [(2.0, 9.0)]}
    assert ps.idle_in((0.0, 10.0), busy) == 2.0 + 3.0  # w1 idle 4–6, w2 idle 0–2 and 9–10
    assert ps.idle_in((3.0, 5.0), busy) == 1.0  # w1 idle 4–5 only
    assert ps.idle_in((0.0, 10.0), {}) == 0.0


def test_report_reads_wall_busy_share_and_executions():
    events = [_x(ps._EXECUTION, 0.0, 10.0, thread="tf_XLAPjRtCpuClient/3", run_id="7"),
              _x("copy.1", 1.0, 3.0, hlo_module="jit_step", run_id="7"),
              _x("copy.2", 5.0, 2.0, hlo_module="jit_step", run_id="7")]
    assert ps.executions(events) == {"7": (0.0, 10.0)}
    busy = {"w1": [(0.0, 10.0)], "w2": [(0.0, 5.0)]}
    (r,) = ps.report(ps.load_ops("", events), {}, steps=1, top=3, runs=ps.executions(events), busy=busy).values()
    assert r["wall_ms"] == 10.0 / 1e3 and r["workers"] == 2 and r["workers_busy"] == 0.75
    assert r["op_ms"] == 5.0 / 1e3 and r["one_op_running_ms"] == 5.0 / 1e3 and r["products"] == []


def test_products_of_a_ynn_fusion_and_of_a_plain_dot():
    shapes, calls, bodies = ps.parse_module(HLO)
    assert calls == {"ynn_fusion.3": "fused_computation.3"}
    fused = ps.products("ynn_fusion.3", shapes, calls, bodies)
    assert [(d["lhs"], d["rhs"], d["dims"]) for d in fused] == [((64, 32), (16, 32), (((1,), (1,)), ((), ())))] * 2
    assert ps.flops(fused[0]) == 2 * 64 * 32 * 16
    (batched,) = ps.products("dot", shapes, calls, bodies)
    assert batched["lhs"] == (4, 2, 5) and batched["rhs"] == (4, 5, 8) and batched["dtype"] == "f32"
    assert batched["dims"] == (((2,), (1,)), ((0,), (0,)))
    assert ps.flops(batched) == 2 * 4 * 2 * 5 * 8
    assert ps.products("copy.1", shapes, calls, bodies) == []


def test_time_alone_runs_the_same_dots():
    shapes, calls, bodies = ps.parse_module(HLO)
    dots = ps.products("ynn_fusion.3", shapes, calls, bodies) + ps.products("dot", shapes, calls, bodies)
    assert ps.time_alone(dots, gradient=True, iters=2) > 0  # different output shapes: returned side by side


@pytest.mark.slow
def test_profile_step_reads_a_real_trace(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--program", "dpo",
                           "--steps", "1", "--top", "3", "--work", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = _common.parse_json_line(proc.stdout)
    assert record["benchmark"] == "profile_step" and len(record["step_s"]) == 1
    step = record["programs"]["jit_step"]  # the DPO train step, read back from the trace and the HLO dump
    assert step["op_ms"] > 0 and step["one_op_running_ms"] > 0
    assert step["workers"] >= 1 and 0 < step["workers_busy"] <= 1 and step["wall_ms"] > 0
    assert 0 < record["cpu_per_wall"] and len(step["products"]) == 3
    for p in step["products"]:
        assert p["in_program_ms"] > 0 and p["alone_ms"] > 0 and p["gflop"] > 0 and p["calls"] == 1
        assert 0 <= p["idle_beside_ms"] <= step["workers"] * p["in_program_ms"] + 1e-9
    assert "jit_attach" in record["programs"]  # the reference forward, its own program
    assert "workers busy" in proc.stdout  # the human-readable report
