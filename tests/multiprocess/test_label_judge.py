"""``label`` with the judge ranker (the LM head on each row's last real position only) on 2 processes × 4 devices
writes the same pairs and verdict log-probs as 1 process × 8 devices."""

from __future__ import annotations

import json

import pytest

from _compare import launch


@pytest.mark.slow
def test_judge_label_two_processes_equal_one(assets, tmp_path):
    # the judge is the (random) policy itself; ' the' is one token of the fixture BPE
    overrides = [f"model.path={assets['model']}", f"data.path={assets['prompts_eval']}", "rollout.batch_size=6",
                 "rollout.max_new_tokens=8", "ranker=judge", "judge.verdict=' the'"]
    rows = {}
    for procs, devices in ((1, 8), (2, 4)):
        out = tmp_path / f"{procs}x{devices}.jsonl"
        launch("label", "label_tiny_cpu.yaml", overrides + [f"output_path={out}"], procs, devices)
        rows[procs] = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert len(rows[1]) > 0 and all(r["score_chosen"] > r["score_rejected"] for r in rows[1])
    assert all(r["score_chosen"] < 0 for r in rows[1])  # log-probabilities
    assert [r["prompt"] for r in rows[2]] == [r["prompt"] for r in rows[1]]
    for a, b in zip(rows[1], rows[2]):
        assert (a["chosen"], a["rejected"]) == (b["chosen"], b["rejected"])
        assert b["score_chosen"] == pytest.approx(a["score_chosen"], rel=1e-5, abs=1e-6)
        assert b["score_rejected"] == pytest.approx(a["score_rejected"], rel=1e-5, abs=1e-6)
