"""SuperHF (`rlhf-jax raft` with `algo.preset: superhf`) and the TRL DPO options (`rlhf-jax dpo`, each pair's
prompt encoded once: `share_prompt`) on 2 processes × 4 devices give the same metrics as 1 process × 8 devices
(helpers of _compare.py)."""

from __future__ import annotations

import pathlib

import pytest

from rlhf_jax.config import load_config
from rlhf_jax.recipes import dpo

from _compare import _commands as _base, _online, _values, two_equal_one

REPO = pathlib.Path(__file__).resolve().parents[2]


def _commands(a: dict) -> dict[str, tuple[str, str, list[str]]]:
    return {
        "superhf": ("raft", "superhf_tiny_cpu.yaml", _online(a) + ["rollout.batch_size=4", "raft.kl_coef=2.0"]),
        "dpo_options": ("dpo", "dpo_tiny_cpu.yaml", _base(a)["dpo"][1] + [
            "loss.loss_type=[sigmoid,bco_pair,sft]", "loss.loss_weights=[0.8,0.2,1.0]", "loss.use_weighting=true",
            "loss.ld_alpha=0.5", "data.max_completion_len=16"]),  # 24 + 2 · 16 ≤ 3/4 · 2 · 48: share_prompt on
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["superhf", "dpo_options"])
def test_two_processes_equal_one(name, assets, tmp_path):
    command, config, overrides = _commands(assets)[name]
    one, _ = two_equal_one(command, config, overrides, tmp_path, name)
    if name == "superhf":
        one = _values(one)
        assert all("kl" in r and "kl_term" in r and "nll" in r for r in one)
        assert any(r["kl"] > 0 for r in one[1:])  # the policy moved off the reference after the first update
    else:  # the runs took the shared-prompt path
        cfg = load_config(dpo.DPOConfig, REPO / "configs" / config, overrides)
        assert dpo.shared_prompt_width(cfg) == cfg.data.max_prompt_len == 24
