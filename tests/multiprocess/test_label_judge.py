"""``label`` with the judge ranker (the LM head on each row's last real position only) on 2 processes × 4 devices
writes the same pairs and verdict log-probs as 1 process × 8 devices."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

_spec = importlib.util.spec_from_file_location("_mp_commands", pathlib.Path(__file__).with_name("test_commands.py"))
_tc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tc)
assets = _tc.assets  # the shared fixture: tiny Llama + task data
ROOT = _tc.ROOT


@pytest.mark.slow
def test_judge_label_two_processes_equal_one(assets, tmp_path):
    # the judge is the (random) policy itself; ' the' is one token of the fixture BPE
    overrides = [f"model.path={assets['model']}", f"data.path={assets['prompts_eval']}", "rollout.batch_size=6",
                 "rollout.max_new_tokens=8", "ranker=judge", "judge.verdict=' the'"]
    env = dict(os.environ, PYTHON=sys.executable, RLHF_JAX_HOST_TUNABLES="0")
    rows = {}
    for procs, devices in ((1, 8), (2, 4)):
        out = tmp_path / f"{procs}x{devices}.jsonl"
        cmd = ["bash", str(ROOT / "launch" / "local_multiprocess.sh"), str(procs), str(devices), "--", sys.executable,
               "-m", "rlhf_jax", "label", str(ROOT / "configs" / "label_tiny_cpu.yaml"), *overrides, *_tc.MESH,
               f"output_path={out}"]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
        assert p.returncode == 0, f"{procs}x{devices} label failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        rows[procs] = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(rows[1]) > 0 and all(r["score_chosen"] > r["score_rejected"] for r in rows[1])
    assert all(r["score_chosen"] < 0 for r in rows[1])  # log-probabilities
    assert [r["prompt"] for r in rows[2]] == [r["prompt"] for r in rows[1]]
    for a, b in zip(rows[1], rows[2]):
        assert (a["chosen"], a["rejected"]) == (b["chosen"], b["rejected"])
        assert b["score_chosen"] == pytest.approx(a["score_chosen"], rel=1e-5, abs=1e-6)
        assert b["score_rejected"] == pytest.approx(a["score_rejected"], rel=1e-5, abs=1e-6)
