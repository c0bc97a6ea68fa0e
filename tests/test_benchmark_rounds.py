"""benchmarks/_rounds.py: the interleaved-round protocol between the benchmark drivers and their long-lived peer
workers, the gate in our recipes' loop, and the ratio statistics (no timing assertions: the machine is shared)."""

import dataclasses
import pathlib
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _rounds as R  # noqa: E402


def test_ratio_stats_hand_values():
    s = R.ratio_stats([4.0, 6.0, 3.0], [2.0, 2.0, 3.0])
    assert s["per_round"] == [2.0, 3.0, 1.0]
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.0, 3.0)
    assert R.fmt_ratio(s) == "2.00x  [1.00 – 3.00] over 3 rounds"
    with pytest.raises(ValueError, match="equal, non-empty"):
        R.ratio_stats([1.0], [1.0, 2.0])


def _worker(tmp_path, body: str) -> list[str]:
    script = tmp_path / "worker.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n" + textwrap.dedent(body))
    return [sys.executable, str(script)]


def test_peer_rounds_and_exit(tmp_path):
    argv = _worker(tmp_path, """
        from benchmarks import _rounds as R
        R.peer_ready({"framework": "fake"})
        for r in range(3):
            R.peer_round_done({"rows": [{"iteration_s": float(r)}]}, wait=r < 2)
    """)
    peer = R.Peer("fake", argv)
    try:
        assert peer.wait_ready() == {"framework": "fake"}
        got = [peer.round()["rows"][0]["iteration_s"] for _ in range(3)]
    finally:
        peer.close()
    assert got == [0.0, 1.0, 2.0]
    assert peer.proc.returncode == 0


def test_peer_failure_names_the_peer_and_its_error(tmp_path):
    peer = R.Peer("broken", _worker(tmp_path, "raise SystemExit('no torch here')\n"))
    with pytest.raises(RuntimeError, match=r"(?s)peer broken exited \(rc 1\).*no torch here"):
        peer.wait_ready()
    peer.close()


def test_tunix_gated_iterator_protocol(tmp_path):
    """bench_tunix.gated: READY after the warm-up steps, one ROUND per `iters` steps, exit after the last."""
    argv = _worker(tmp_path, """
        import time
        from benchmarks import bench_tunix
        for batch in bench_tunix.gated(lambda i: i, warmup=2, iters=2, rounds=3, info=lambda: {"ok": 1},
                                       sync=lambda: None):
            print("BATCH", batch, flush=True)
        raise SystemExit("the iterator should have ended the process")
    """)
    peer = R.Peer("gated", argv)
    try:
        assert peer.wait_ready() == {"ok": 1}
        rows = [peer.round()["rows"] for _ in range(3)]
    finally:
        peer.close()
    assert [len(r) for r in rows] == [2, 2, 2]
    assert all(row["iteration_s"] >= 0 for r in rows for row in r)
    assert peer.proc.returncode == 0


@dataclasses.dataclass
class _Loop:
    step: object
    total: int


def test_gated_run_loop_calls_rounds_before_their_first_step():
    events = []

    class Recipe:  # stands in for a recipe module: it calls its module-level run_loop
        @staticmethod
        def run_loop(loop, state):
            for i in range(loop.total):
                state = loop.step(i, state)
            return state

    def step(i, state):
        events.append(("step", i))
        return state + 1

    undo = R.gated_run_loop(Recipe, warmup=1, iters=2, rounds=3, before_round=lambda r: events.append(("round", r)))
    assert Recipe.run_loop(_Loop(step=step, total=7), 0) == 7
    undo()
    assert events == [("step", 0), ("round", 0), ("step", 1), ("step", 2), ("round", 1), ("step", 3), ("step", 4),
                      ("round", 2), ("step", 5), ("step", 6)]
    events.clear()
    Recipe.run_loop(_Loop(step=step, total=2), 0)  # undone: no rounds any more
    assert events == [("step", 0), ("step", 1)]
