"""curves.png panels: an online run's losses, score / gold score (train and held-out), KL and response length;
SFT/RM/DPO runs' held-out metrics; and the CLI's output without `datasets` progress bars."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rlhf_jax.train.plots import PANELS, curve_keys, plot_curves

ONLINE = [
    {"step": 1, "split": "train", "loss": 0.5, "policy_loss": 0.1, "value_loss": 0.3, "score": 0.1, "gold_score": 0.0,
     "kl": 0.01, "response_length": 12.0, "eos_rate": 0.5, "time": 1.0},
    {"step": 2, "split": "train", "loss": 0.4, "policy_loss": 0.1, "value_loss": 0.2, "score": 0.3, "gold_score": 0.2,
     "kl": 0.02, "response_length": 10.0, "eos_rate": 0.6, "time": 2.0},
    {"step": 2, "split": "eval", "score": 0.2, "gold_score": 0.1, "sampled_score": 0.15, "sampled_gold_score": 0.05,
     "response_length": 9.0, "sampled_response_length": 11.0, "eos_rate": 0.7, "time": 2.5},
]


def _write(tmp_path, records):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_online_panels_show_losses_scores_gold_kl_and_length(tmp_path):
    path = _write(tmp_path, ONLINE)
    from rlhf_jax.train.plots import read_metrics

    keys = curve_keys(read_metrics(path))
    assert keys == ["loss", "policy_loss", "value_loss", "score", "gold_score", "kl", "response_length", "eos_rate"]
    png = plot_curves(path, tmp_path / "curves.png")
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_supervised_and_preference_panels_show_their_eval_metrics(tmp_path):
    from rlhf_jax.train.plots import read_metrics

    sft = [{"step": 1, "split": "train", "loss": 2.0}, {"step": 1, "split": "eval", "loss": 2.1, "perplexity": 8.0}]
    rm = [{"step": 1, "split": "train", "loss": 0.6, "accuracy": 0.6, "reward_margin": 0.1},
          {"step": 1, "split": "eval", "loss": 0.7, "accuracy": 0.55, "reward_margin": 0.05}]
    dpo = [{"step": 1, "split": "eval", "loss": 0.69, "rewards_accuracy": 0.5, "rewards_margin": 0.0}]
    assert curve_keys(read_metrics(_write(tmp_path, sft))) == ["loss", "perplexity"]
    assert curve_keys(read_metrics(_write(tmp_path, rm))) == ["loss", "accuracy", "reward_margin"]
    assert curve_keys(read_metrics(_write(tmp_path, dpo))) == ["loss", "rewards_accuracy", "rewards_margin"]
    assert set(PANELS) >= {"loss", "score", "gold_score", "kl", "response_length"}
    # a held-out series that only has its sampled variant still gets its panel
    only_sampled = [{"step": 1, "split": "eval", "sampled_score": 0.1}]
    assert curve_keys(read_metrics(_write(tmp_path, only_sampled))) == ["score"]
    with pytest.raises(ValueError, match="logged metrics"):
        plot_curves(_write(tmp_path, [{"step": 1, "split": "train", "lr": 1.0}]), tmp_path / "x.png")


@pytest.mark.slow
def test_cli_run_prints_no_datasets_progress_and_writes_curves(tmp_path):
    """An SFT run through the CLI: no `Generating train split` / `Map:` lines on stdout or stderr, and a
    curves.png in the output folder."""
    from rlhf_jax import fixtures, tasks

    tok = fixtures.build_tokenizer(tmp_path / "tokenizer")
    tiny_model_dir = fixtures.build_tiny_model(tmp_path / "model", "llama", tokenizer=tok, hidden=32, layers=2, heads=4,
                                               kv_heads=2, max_positions=128)
    data = tasks.write_task_data(tmp_path / "data", n_sft=32, n_pref=8, n_eval=8, n_prompts=8, seed=0)
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "HF_DATASETS_DISABLE_PROGRESS_BARS"}
    env.update(RLHF_JAX_HOST_TUNABLES="0", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "rlhf_jax", "sft", "configs/sft_tiny_cpu.yaml", f"model.path={tiny_model_dir}",
                        f"data.path={data['sft_train']}", f"data.eval_path={data['sft_eval']}", "batch_size=8",
                        "run.total_steps=2", "optim.warmup_steps=1", "run.log_every=1", "run.tensorboard=false", "run.progress=off",
                        f"run.output_dir={out}"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for noise in ("Generating train split", "Map:", "examples/s"):
        assert noise not in p.stdout + p.stderr, noise
    assert (out / "curves.png").exists()
