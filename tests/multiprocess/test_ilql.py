"""`rlhf-jax ilql` on 2 processes × 4 simulated devices gives the same metrics as 1 process × 8 devices
(data × fsdp spanning the processes, tensor within one; the heads sharded by their logical axes; the held-out
decoding evaluation split over the hosts)."""

from __future__ import annotations

import pytest

from _compare import _values, two_equal_one
from rlhf_jax import tasks


@pytest.fixture(scope="module")
def scored_rows(tmp_path_factory) -> str:
    """The SFT corpus with a varied reward per row (its gold score)."""
    rows = tasks.sft_rows(64, seed=0)
    for r in rows:
        r["reward"] = tasks.response_score(r["completion"])
    return str(tasks.write_jsonl(tmp_path_factory.mktemp("ilql_mp") / "rows.jsonl", rows))


@pytest.mark.slow
def test_ilql_two_processes_equal_one(assets, scored_rows, tmp_path):
    overrides = [f"model.path={assets['model']}", f"data.path={scored_rows}", f"eval.prompts={assets['prompts_eval']}",
                 "eval.batch_size=8", "batch_size=8", "run.eval_every=2", "optim.warmup_steps=1",
                 "gen_kwargs.max_new_tokens=6", "ilql.steps_for_target_q_sync=1"]
    one, _ = two_equal_one("ilql", "ilql_tiny_cpu.yaml", overrides, tmp_path)
    assert any("gold_score" in r for r in _values(one))  # the evaluation ran
    assert (tmp_path / "two" / "model" / "config.json").exists()  # process 0 exported the LM
