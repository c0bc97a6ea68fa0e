"""Tests for RAFT: selection (top-k per group, quantile), rollout → SFT batch, and (slow) that it raises the
demo task's gold score."""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

from rlhf_jax import tasks
from rlhf_jax.config import ConfigError, load_config
from rlhf_jax.rollout.types import Rollout
from rlhf_jax.online import batches as gr
from rlhf_jax.recipes import raft

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # importlib mode: make the sibling helper importable
from _sampling_helpers import sampled_accuracy, sft_export  # noqa: E402


def test_top_k_rows_per_group():
    s = np.array([0.1, 0.9, 0.5, 3, 1, 2], np.float32)
    np.testing.assert_array_equal(gr.top_k_rows(s, group_size=3, k=1), [1, 3])
    np.testing.assert_array_equal(gr.top_k_rows(s, group_size=3, k=2), [1, 2, 3, 5])
    with pytest.raises(ValueError, match="1 <= k"):
        gr.top_k_rows(s, group_size=3, k=4)


def test_select_rows_quantile_masks_instead_of_dropping():
    s = np.array([0, 1, 2, 3], np.float32)
    rows, keep = raft.select_rows(s, group_size=2, top_k=1, quantile=0.5)
    np.testing.assert_array_equal(rows, [0, 1, 2, 3])
    np.testing.assert_array_equal(keep, [False, False, True, True])


def rollout():
    p_ids = np.array([[0, 5, 6], [7, 8, 9]], np.int32)
    p_mask = np.array([[0, 1, 1], [1, 1, 1]], np.int32)
    r_ids = np.array([[11, 4, 0], [12, 13, 4]], np.int32)
    r_mask = np.array([[1, 1, 0], [1, 1, 1]], np.int32)
    z = np.zeros((2, 3), np.float32)
    return Rollout(p_ids, p_mask, r_ids, r_mask, z, z, r_mask.sum(1))


def test_rollout_sft_batch_and_kept_rows():
    b = gr.rollout_sft_batch(rollout())
    np.testing.assert_array_equal(b.input_ids_BxS[0], [0, 5, 6, 11, 4, 0])
    np.testing.assert_array_equal(b.attention_mask_BxS[0], [0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(b.loss_mask_BxS[0], [0, 0, 0, 1, 1, 0])  # response tokens (EOS included) only
    np.testing.assert_array_equal(b.positions_BxS[0], [0, 0, 1, 2, 3, 3])  # left padding keeps real positions
    np.testing.assert_array_equal(b.segment_ids_BxS, b.attention_mask_BxS)
    k = raft.kept_batch(b, np.array([1, 0]), np.array([True, False]))
    np.testing.assert_array_equal(k.input_ids_BxS[0], b.input_ids_BxS[1])
    assert k.loss_mask_BxS[1].sum() == 0 and k.loss_mask_BxS[0].sum() == 3


def test_config_errors():
    with pytest.raises(ConfigError, match="raft.top_k"):
        load_config(raft.RAFTConfig, None, ("model.path=x", "data.path=y", "raft.num_samples=2", "raft.top_k=3"))
    with pytest.raises(ConfigError, match="raft.num_micro_batches"):
        load_config(raft.RAFTConfig, None, ("model.path=x", "data.path=y", "raft.num_micro_batches=3"))


@pytest.mark.slow
def test_raft_raises_demo_gold_score(tmp_path_factory, tmp_path):
    s = sft_export(tmp_path_factory.getbasetemp(), "demo")
    prompts = [tasks.make_prompt(t) for t in tasks.TOPICS] * 4
    before = sampled_accuracy(s["model"], s["tokenizer"], prompts, tasks.gold_score, max_new_tokens=12)
    cfg = load_config(raft.RAFTConfig, None, (
        f"model.path={s['model']}", f"data.path={s['prompts']}", "data.max_prompt_len=16",
        "reward.functions=[rlhf_jax.tasks:gold_score]", "reward.gold_function=rlhf_jax.tasks:gold_score",
        "raft.num_samples=4", "raft.top_k=1", "raft.sft_steps=2", "rollout.batch_size=16", "rollout.max_new_tokens=12",
        "optim.learning_rate=1e-3", "run.total_steps=15", f"run.output_dir={tmp_path}", "run.tensorboard=false",
        "run.log_every=5"))
    res = raft.train(cfg)
    after = sampled_accuracy((res["model"], res["state"].params), s["tokenizer"], prompts, tasks.gold_score,
                             max_new_tokens=12)
    print(f"RAFT demo gold score: before {before:.3f} -> after {after:.3f}; "
          f"kept_score {[round(h['kept_score'], 2) for h in res['history']]}")
    assert after > before + 0.15
    assert (tmp_path / "model" / "config.json").exists()
