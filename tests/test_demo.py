"""The README's main command, in quick mode: every stage runs and the outputs it announces exist."""

from __future__ import annotations

import json
import pathlib

import pytest

from rlhf_jax import cli, demo


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--quick"]) == 0
    out = capsys.readouterr().out
    root = tmp_path / "demo"
    summary = json.loads((root / "demo_summary.json").read_text())
    assert list(summary["results"]) == [name for name, _ in demo.STAGES]
    assert "reward model held-out pairwise accuracy" in out
    assert 0.0 <= summary["rm_heldout_accuracy"] <= 1.0
    for stage in ("sft", "rm"):
        assert (root / stage / "metrics.jsonl").exists()
        assert any(p.name.isdigit() for p in (root / stage / "checkpoints").iterdir())
        export = pathlib.Path(summary["results"][stage]["export_dir"])
        assert (export / "config.json").exists() and (export / "tokenizer.json").exists()
        assert str(export) in out
    assert (root / "rm" / "model" / "reward_stats.json").exists()
    assert (root / "data" / "pref_eval.jsonl").exists() and (root / "base_model" / "config.json").exists()
    # PPO: held-out prompts evaluated before (SFT policy) and after (PPO policy); curves show score and gold
    assert "PPO: held-out prompts" in out
    heldout = summary["ppo_heldout"]
    assert set(heldout) == set(demo.HELDOUT_KEYS)
    assert all(0 <= v[k] <= 1 for k in ("before", "after") for v in (heldout["eos_rate"],))
    assert (root / "ppo" / "curves.png").exists()
    evals = [json.loads(ln) for ln in (root / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["split"] == "eval"] == [demo.QUICK_STEPS]
