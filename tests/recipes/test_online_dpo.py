"""Tests for online DPO: best-vs-worst pairs from groups (ties are not pairs), rollout → preference batch,
config errors, and (slow) that it raises the demo task's gold score."""

from __future__ import annotations

import pathlib
import sys

import jax
import numpy as np
import pytest

from rlhf_jax import tasks
from rlhf_jax.algos import preference as pref
from rlhf_jax.algos import preference_rows as rows_lib
from rlhf_jax.algos.preference_rows import PairBatch
from rlhf_jax.config import ConfigError, load_config
from rlhf_jax.models import ModelConfig, Transformer, init_params
from rlhf_jax.rollout.types import Rollout
from rlhf_jax.online import batches as gr
from rlhf_jax.recipes import online_dpo
from rlhf_jax.train import reference as pc

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # importlib mode: make the sibling helper importable
from _sampling_helpers import sampled_accuracy, sft_export  # noqa: E402


def test_best_worst_pairs():
    s = np.array([0.1, 0.9, 0.5, 2, 2, 2, -1, 3, 3], np.float32)
    best, worst, valid = gr.best_worst(s, group_size=3)
    np.testing.assert_array_equal(best, [1, 3, 7])
    np.testing.assert_array_equal(worst, [0, 3, 6])
    np.testing.assert_array_equal(valid, [True, False, True])


def test_best_worst_never_prefers_an_empty_response_on_a_tie():
    """Ties for the best go to a non-empty response, ties for the worst to an empty one; an empty response that
    strictly outscores the rest is still chosen (and a non-empty one that strictly loses is still rejected)."""
    s = np.array([0, 0, -.5, 0,   1, 0, 0, 1,   1, 0, 0, 0,   0, 0, 0, 0,   .5, 0, .5, 0], np.float32)
    e = np.array([1, 0, 0, 0,     1, 0, 0, 0,   1, 0, 1, 0,   1, 0, 1, 0,   0, 0, 1, 1], bool)
    best, worst, valid = gr.best_worst(s, group_size=4, empty_B=e)
    np.testing.assert_array_equal(best, [1, 7, 8, 13, 16])  # group 2: the empty response wins outright
    np.testing.assert_array_equal(worst, [2, 5, 10, 12, 19])  # group 1: no empty among the worst -> first
    np.testing.assert_array_equal(valid, [True, True, True, False, True])
    old_best, old_worst, _ = gr.best_worst(s, group_size=4)  # without empties: first row of each tie
    np.testing.assert_array_equal(old_best, [0, 4, 8, 12, 16])
    np.testing.assert_array_equal(old_worst, [2, 5, 9, 12, 17])


def test_pair_metrics_count_tied_groups_and_empty_chosen():
    s = np.array([1, 1, 1, 0, 0, 0, 2, 0], np.float32)
    e = np.array([0, 0, 0, 1, 1, 0, 0, 0], bool)
    best, worst, valid = gr.best_worst(s, group_size=2, empty_B=e)
    m = online_dpo.pair_metrics(e, best, valid)
    assert m == {"pairs/tied_fraction": 0.5, "pairs/empty_chosen": 0.0, "empty_fraction": 0.25}
    m = online_dpo.pair_metrics(np.array([1, 0], bool), np.array([0]), np.array([True]))
    assert m["pairs/empty_chosen"] == 1.0 and m["pairs/tied_fraction"] == 0.0


def test_rollout_pair_batch_masks_invalid_pairs():
    p_ids = np.arange(12, dtype=np.int32).reshape(4, 3)
    ones = np.ones((4, 3), np.int32)
    r_ids = 100 + np.arange(12, dtype=np.int32).reshape(4, 3)
    z = np.zeros((4, 3), np.float32)
    ro = Rollout(p_ids, ones, r_ids, ones, z, z, np.full(4, 3))
    pb = gr.rollout_pair_batch(ro, np.array([1, 2]), np.array([0, 3]), np.array([True, False]))
    np.testing.assert_array_equal(pb.chosen_ids_BxS[0], [3, 4, 5, 103, 104, 105])
    np.testing.assert_array_equal(pb.rejected_ids_BxS[0], [0, 1, 2, 100, 101, 102])
    np.testing.assert_array_equal(pb.chosen_loss_mask_BxS[0], [0, 0, 0, 1, 1, 1])
    assert pb.chosen_loss_mask_BxS[1].sum() == 0 and pb.rejected_loss_mask_BxS[1].sum() == 0


def test_rollout_prompt_width_rule():
    assert rows_lib.rollout_prompt_width(32, 16) == 16  # W = P: 48 of 64 tokens, the 3/4 bound
    assert rows_lib.rollout_prompt_width(40, 16) == 24
    assert rows_lib.rollout_prompt_width(30, 16) is None  # P = 14 < W: saves less than a quarter
    assert rows_lib.rollout_prompt_width(32, None) is None and rows_lib.rollout_prompt_width(16, 16) is None


def test_rollout_pairs_share_their_prompt():
    """Pairs of rollout rows (left-padded prompts of different lengths, responses of different lengths, one
    invalid pair) give the same loss, gradients and reference sums with each prompt encoded once as stacked."""
    V, U, G, P, W = 40, 3, 4, 6, 5
    model = Transformer(ModelConfig(model_type="llama", vocab_size=V, hidden_size=32, num_layers=2, num_heads=4,
                                    num_kv_heads=2, head_dim=8, intermediate_size=64, max_position_embeddings=64,
                                    norm_eps=1e-6, activation="silu"), head="lm")
    params = init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    p_len = np.repeat(np.array([6, 3, 4]), G)  # each group shares one prompt
    p_mask = (np.arange(P)[None, :] >= P - p_len[:, None]).astype(np.int32)
    p_ids = np.repeat(rng.integers(3, V, (U, P)), G, axis=0).astype(np.int32) * p_mask
    r_len = rng.integers(1, W + 1, U * G)
    r_mask = (np.arange(W)[None, :] < r_len[:, None]).astype(np.int32)
    r_ids = rng.integers(3, V, (U * G, W)).astype(np.int32) * r_mask
    z = np.zeros((U * G, W), np.float32)
    ro = Rollout(p_ids, p_mask, r_ids, r_mask, z, z, r_len)
    best, worst = np.array([1, 4, 10]), np.array([3, 6, 8])
    batch = PairBatch(gr.rollout_pair_batch(ro, best, worst, np.array([True, False, True])), np.zeros(U, np.float32),
                      np.zeros(U, np.float32))
    assert rows_lib.rollout_prompt_width(P + W, W) == P
    for loss in (pref.PreferenceLossConfig(rpo_alpha=1.0), pref.PreferenceLossConfig(use_weighting=True)):
        def run(width):
            fn = pref.make_loss_fn(model, loss, completion_width=W, prompt_width=width)
            return jax.jit(jax.value_and_grad(lambda p: fn(p, batch, None)[0][0]))(params)

        (plain, g_plain), (shared, g_shared) = run(None), run(rows_lib.ROLLOUT_ROWS)
        np.testing.assert_allclose(shared, plain, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_shared)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    ref = pc.reference_logps(model, params, batch, num_chunks=1, completion_width=W)
    assert np.all(np.asarray(ref)[[0, 2]] < 0) and np.all(np.asarray(ref)[1] == 0)  # the invalid pair scores 0
    for chunks in (1, 3):
        np.testing.assert_allclose(pc.reference_logps(model, params, batch, num_chunks=chunks, completion_width=W,
                                                      prompt_width=rows_lib.ROLLOUT_ROWS), ref, rtol=1e-5)


def test_config_errors():
    with pytest.raises(ConfigError, match="online.num_samples"):
        load_config(online_dpo.OnlineDPOConfig, None, ("model.path=x", "data.path=y", "online.num_samples=1"))
    with pytest.raises(ConfigError, match="loss.algorithm"):
        load_config(online_dpo.OnlineDPOConfig, None, ("model.path=x", "data.path=y", "loss.algorithm=kto"))


@pytest.mark.slow
def test_online_dpo_raises_demo_gold_score(tmp_path_factory, tmp_path):
    s = sft_export(tmp_path_factory.getbasetemp(), "demo")
    prompts = [tasks.make_prompt(t) for t in tasks.TOPICS] * 4
    before = sampled_accuracy(s["model"], s["tokenizer"], prompts, tasks.gold_score, max_new_tokens=12)
    cfg = load_config(online_dpo.OnlineDPOConfig, None, (
        f"model.path={s['model']}", f"data.path={s['prompts']}", "data.max_prompt_len=16",
        "reward.functions=[rlhf_jax.tasks:gold_score]", "reward.gold_function=rlhf_jax.tasks:gold_score",
        "online.num_samples=4", "online.updates_per_iteration=2", "rollout.batch_size=16",
        "rollout.max_new_tokens=12", "loss.beta=0.1", "optim.learning_rate=1e-3", "run.total_steps=15",
        f"run.output_dir={tmp_path}", "run.tensorboard=false", "run.log_every=5"))
    res = online_dpo.train(cfg)
    after = sampled_accuracy((res["model"], res["state"].params), s["tokenizer"], prompts, tasks.gold_score,
                             max_new_tokens=12)
    hist = res["history"]
    print(f"online DPO demo gold score: before {before:.3f} -> after {after:.3f}; "
          f"batch gold {[round(h['gold_score'], 2) for h in hist]}")
    assert all(h["valid_pairs"] > 0 for h in hist)
    assert after > before + 0.15
