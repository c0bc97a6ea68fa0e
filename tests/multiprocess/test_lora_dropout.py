"""LoRA dropout on 2 processes × 4 devices equals 1 process × 8 devices: the masks are drawn for the global
batch from keys of (run seed, step, micro-batch / minibatch, role), not of the process or device layout."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # importlib mode: the sibling module's helpers
from test_commands import _commands, _run, _values, assets  # noqa: E402,F401  (assets: the shared fixture)

LORA = ["model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=[all]", "model.lora.dropout=0.2"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sft", "dpo", "ppo", "grpo"])
def test_lora_dropout_two_processes_equal_one(command, assets, tmp_path):  # noqa: F811
    config, overrides = _commands(assets)[command]
    overrides = overrides + LORA
    one = _values(_run(command, config, overrides, tmp_path / "one", 1, 8))
    two = _values(_run(command, config, overrides, tmp_path / "two", 2, 4))
    assert len(one) == len(two) and len(one) >= 2, (one, two)
    for r1, r2 in zip(one, two):
        assert r1.keys() == r2.keys(), set(r1) ^ set(r2)
        for k in r1:
            assert r2[k] == pytest.approx(r1[k], rel=1e-5, abs=1e-6), (command, r1["step"], k, r1[k], r2[k])
