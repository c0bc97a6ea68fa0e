"""LoRA with adapter dropout (and the actor's EMA) on 2 processes × 4 devices equals 1 process × 8 devices:
adapters sharded like their weights over data × fsdp × tensor spanning the processes, the frozen base shared,
the dropout masks drawn for the global batch from keys of (run seed, step, micro-batch / minibatch, role), not
of the process or device layout, the PEFT export written once.

One run per command checks both the adapter-only training and the dropout masks (dropout 0.2 keeps every
path of a LoRA run without dropout, and adds the masks)."""

from __future__ import annotations

import json

import pytest

from _compare import _commands, two_equal_one

LORA = ["model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=[all]", "model.lora.dropout=0.2"]
EXTRA = {"sft": ["model.lora.export_format=peft"],
         "dpo": [],
         "ppo": ["ppo.ema_decay=0.9", "model.base_dtype=bfloat16", "ppo.critic_shares_base=true"],
         "grpo": ["algo.ema_decay=0.9"]}


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sft", "dpo", "ppo", "grpo"])
def test_lora_two_processes_equal_one(command, assets, tmp_path):
    config, overrides = _commands(assets)[command]
    two_equal_one(command, config, overrides + LORA + EXTRA[command], tmp_path)
    if command == "sft":
        adapter = json.loads((tmp_path / "two" / "model" / "adapter_config.json").read_text())
        assert adapter["r"] == 4 and adapter["lora_dropout"] == pytest.approx(0.2)
    else:
        assert (tmp_path / "two" / "model" / "config.json").exists()
    if command in ("ppo", "grpo"):
        assert (tmp_path / "two" / "model_ema" / "config.json").exists()
