"""`rlhf-jax ilql` on 2 processes × 4 simulated devices gives the same metrics as 1 process × 8 devices
(data × fsdp spanning the processes, tensor within one; the heads sharded by their logical axes; the held-out
decoding evaluation split over the hosts)."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # importlib mode: make the sibling module importable
from test_commands import _run, _values, assets  # noqa: E402,F401  (assets: the shared fixture)

from rlhf_jax import tasks  # noqa: E402


@pytest.fixture(scope="module")
def scored_rows(assets, tmp_path_factory) -> str:  # noqa: F811
    """The SFT corpus with a varied reward per row (its gold score)."""
    rows = tasks.sft_rows(64, seed=0)
    for r in rows:
        r["reward"] = tasks.response_score(r["completion"])
    return str(tasks.write_jsonl(tmp_path_factory.mktemp("ilql_mp") / "rows.jsonl", rows))


@pytest.mark.slow
def test_ilql_two_processes_equal_one(assets, scored_rows, tmp_path):  # noqa: F811
    overrides = [f"model.path={assets['model']}", f"data.path={scored_rows}", f"eval.prompts={assets['prompts_eval']}",
                 "eval.batch_size=8", "batch_size=8", "run.eval_every=2", "optim.warmup_steps=1",
                 "gen_kwargs.max_new_tokens=6", "ilql.steps_for_target_q_sync=1"]
    one = _values(_run("ilql", "ilql_tiny_cpu.yaml", overrides, tmp_path / "one", 1, 8))
    two = _values(_run("ilql", "ilql_tiny_cpu.yaml", overrides, tmp_path / "two", 2, 4))
    assert len(one) == len(two) and len(one) >= 2, (one, two)
    assert any("gold_score" in r for r in one)  # the evaluation ran
    for r1, r2 in zip(one, two):
        assert r1.keys() == r2.keys(), set(r1) ^ set(r2)
        for k in r1:
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-6), (r1["step"], k, r1[k], r2[k])
    assert (tmp_path / "two" / "model" / "config.json").exists()  # process 0 exported the LM
