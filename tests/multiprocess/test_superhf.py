"""SuperHF (`rlhf-jax raft` with `algo.preset: superhf`) and the TRL DPO options (`rlhf-jax dpo`) on
2 processes × 4 devices give the same metrics as 1 process × 8 devices (helpers of test_commands.py)."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # importlib mode: make the sibling helpers importable
from test_commands import _online, _run, _values, assets  # noqa: E402, F401 (fixture)


def _commands(a: dict) -> dict[str, tuple[str, str, list[str]]]:
    return {
        "superhf": ("raft", "superhf_tiny_cpu.yaml", _online(a) + ["rollout.batch_size=4", "raft.kl_coef=2.0"]),
        "dpo_options": ("dpo", "dpo_tiny_cpu.yaml", [
            f"model.path={a['model']}", f"data.path={a['pref_train']}", f"data.eval_path={a['pref_eval']}",
            "batch_size=8", "run.eval_every=0", "optim.warmup_steps=1", "loss.loss_type=[sigmoid,bco_pair,sft]",
            "loss.loss_weights=[0.8,0.2,1.0]", "loss.use_weighting=true", "loss.ld_alpha=0.5"]),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["superhf", "dpo_options"])
def test_two_processes_equal_one(name, assets, tmp_path):
    command, config, overrides = _commands(assets)[name]
    one = _values(_run(command, config, overrides, tmp_path / "one", 1, 8))
    two = _values(_run(command, config, overrides, tmp_path / "two", 2, 4))
    assert len(one) == len(two) and len(one) >= 2, (one, two)
    if name == "superhf":
        assert all("kl" in r and "kl_term" in r and "nll" in r for r in one)
        assert any(r["kl"] > 0 for r in one[1:])  # the policy moved off the reference after the first update
    for r1, r2 in zip(one, two):
        assert r1.keys() == r2.keys(), set(r1) ^ set(r2)
        for k in r1:
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-6), (name, r1["step"], k, r1[k], r2[k])
