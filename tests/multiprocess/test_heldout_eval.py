"""Held-out evaluation of the online commands on 2 processes × 4 devices equals 1 process × 8 devices.

Each host samples and scores its slice of every held-out prompt batch; the statistics are over every host's
prompts. Five held-out prompts make the last batch partly padding, and for GRPO (2 prompts per host per
batch) one host's slice of it is all padding.
"""

from __future__ import annotations

import json

import pytest

from tests.multiprocess.test_commands import _commands, _run, _values, assets  # noqa: F401 (fixture)

GOLD = "reward.gold_function=rlhf_jax.tasks:gold_score"


@pytest.mark.slow
@pytest.mark.parametrize("command", ["ppo", "grpo"])
def test_heldout_eval_two_processes_equal_one(command, assets, tmp_path):  # noqa: F811
    rows = open(assets["prompts_eval"]).read().splitlines()[:5]
    eval_path = tmp_path / "heldout.jsonl"
    eval_path.write_text("\n".join(rows) + "\n")
    config, overrides = _commands(assets)[command]
    overrides = overrides + [f"data.eval_path={eval_path}", "run.eval_every=1", GOLD]
    one = _run(command, config, overrides, tmp_path / "one", 1, 8)
    two = _run(command, config, overrides, tmp_path / "two", 2, 4)
    ev1 = _values([r for r in one if r["split"] == "eval"])
    ev2 = _values([r for r in two if r["split"] == "eval"])
    assert [r["step"] for r in ev1] == [1, 2] == [r["step"] for r in ev2]
    for r1, r2 in zip(ev1, ev2):
        assert r1.keys() == r2.keys(), set(r1) ^ set(r2)
        assert {"score", "gold_score", "sampled_score", "response_length", "eos_rate"} <= r1.keys()
        for k in r1:
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-6), (command, r1["step"], k, r1[k], r2[k])
    train1 = _values([r for r in one if r["split"] == "train"])
    train2 = _values([r for r in two if r["split"] == "train"])
    for r1, r2 in zip(train1, train2, strict=True):
        for k in r1:
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-6), (command, k)
    assert json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
