"""Reward model: one 2B-row forward == two B-row forwards, Bradley–Terry by hand, padding pairs count 0,
the RM learns the gold preference, reward stats stored with the export, HH-RLHF runs end to end."""

from __future__ import annotations

import dataclasses
import gzip
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.run_config import OptimConfig, RunConfig
from rlhf_jax.data import DataConfig, build_data
from rlhf_jax.train import run as common
from rlhf_jax import rewards
from rlhf_jax.algos import supervised as sup
from rlhf_jax.recipes import rm

DATA = dict(max_prompt_len=24, max_completion_len=32, max_seq_len=48, buckets=(48,))


@pytest.fixture(scope="module")
def scored(tiny_llama, task_data):
    """The tiny Llama with a random (non-zero) score head, and one preference batch with a padding pair."""
    model, params = models.load_pretrained(tiny_llama, head="scalar")
    params = {**params, "score": 0.5 * jax.random.normal(jax.random.key(1), params["score"].shape)}
    tok = common.load_tokenizer(str(tiny_llama))
    cfg = DataConfig(path=str(task_data["pref_eval"]), shuffle=False, drop_last=False, **DATA)
    it = build_data(cfg, tok, task="preference", batch_size=6).train
    batch = it.batch(0, 0)
    pad = jax.tree.map(lambda x: np.concatenate([x[:5], np.zeros_like(x[:1])]), batch)  # last pair = padding
    return model, params, jax.tree.map(jnp.asarray, pad)


def test_pair_scores_one_forward_equals_separate_forwards(scored):
    model, params, batch = scored
    chosen, rejected, valid = jax.jit(lambda p, b: sup.pair_scores(model, p, b))(params, batch)
    for ids, mask, got in ((batch.chosen_ids_BxS, batch.chosen_mask_BxS, chosen),
                           (batch.rejected_ids_BxS, batch.rejected_mask_BxS, rejected)):
        scores = np.asarray(model.apply({"params": params}, ids, mask))
        last = np.asarray(mask).sum(1) - 1  # right padding: last real token
        want = scores[np.arange(5), last[:5]]
        np.testing.assert_allclose(np.asarray(got)[:5], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(valid), [1, 1, 1, 1, 1, 0])


@pytest.mark.parametrize("margin", [None, 0.5])
def test_rm_loss_is_bradley_terry_over_real_pairs(scored, margin):
    model, params, batch = scored
    (loss_sum, count), aux = jax.jit(lambda p, b: sup.rm_loss(model, p, b, None, margin=margin))(params, batch)
    c, r, _ = (np.asarray(x, np.float64)[:5] for x in sup.pair_scores(model, params, batch))
    d = c - r - (margin or 0.0)
    np.testing.assert_allclose(float(loss_sum), np.sum(np.log1p(np.exp(-d))), rtol=1e-5)
    assert float(count) == 5 == float(aux.pairs)
    assert float(aux.correct) == np.sum(c > r)
    np.testing.assert_allclose(float(aux.chosen_sum), c.sum(), rtol=1e-5)


def test_rm_loss_gradient_ignores_padding_pair(scored):
    model, params, batch = scored
    grad = jax.grad(lambda p, b: sup.rm_loss(model, p, b, None)[0][0])
    g1 = grad(params, batch)
    junk = batch._replace(chosen_ids_BxS=batch.chosen_ids_BxS.at[5].set(7))  # padding row content changes
    g2 = grad(params, junk)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7), g1, g2)


def _cfg(model_path, data: DataConfig, out, *, steps, batch_size=16, lr=1e-3):
    return rm.RMConfig(model=common.ModelLoadConfig(path=str(model_path)), data=data,
                       optim=OptimConfig(learning_rate=lr, schedule="cosine", warmup_steps=3),
                       run=RunConfig(output_dir=str(out), total_steps=steps, log_every=5, eval_every=0,
                                     tensorboard=False, progress="off"),
                       batch_size=batch_size)


@pytest.mark.slow
def test_rm_learns_gold_preferences_and_stores_reward_stats(tiny_llama, task_data, tmp_path):
    data = DataConfig(path=str(task_data["pref_train"]), eval_path=str(task_data["pref_eval"]), **DATA)
    result = rm.train(_cfg(tiny_llama, data, tmp_path / "rm", steps=40))
    records = common.read_jsonl(tmp_path / "rm" / "metrics.jsonl")
    train_acc = [r["accuracy"] for r in records if r["split"] == "train"]
    assert train_acc[-1] > train_acc[0]
    assert result["eval/accuracy"] >= 0.75, result  # the zero-initialised head starts at 0 (no r_c > r_r)
    export = pathlib.Path(result["export_dir"])
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification")
    mean, std = rewards.load_reward_stats(export)
    assert (mean, std) == (result["reward_mean"], result["reward_std"]) and std > 0
    stats = json.loads((export / rm.REWARD_STATS_FILE).read_text())
    assert stats["count"] == 2 * 512
    # the stored mean/std are those of the exported model's scores on the train responses
    model, params = models.load_pretrained(export, head="scalar")
    tok = common.load_tokenizer(str(export))
    it = build_data(dataclasses.replace(data, shuffle=False, drop_last=False), tok, task="preference",
                    batch_size=64).train
    n, s1, s2 = (sum(v) for v in zip(*[[float(x) for x in sup.reward_moments(model, params, jax.tree.map(jnp.asarray, it.batch(0, i)))]
                                        for i in range(it.batches_per_epoch)]))
    np.testing.assert_allclose([s1 / n, np.sqrt(s2 / n - (s1 / n) ** 2)], [mean, std], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_rm_on_real_hh_rlhf_pairs(tiny_llama, shared_data_dir, tmp_path):
    """A few hundred real HH-RLHF pairs through the hh_rlhf adapter: the run completes and reports held-out
    accuracy and the skipped-row count (no accuracy target: a random tiny model, 10 steps)."""
    subset = tmp_path / "hh_subset.jsonl.gz"
    with gzip.open(shared_data_dir / "hh-rlhf-harmless-base-test.jsonl.gz", "rt") as f, gzip.open(subset, "wt") as g:
        for _, line in zip(range(300), f):
            g.write(line)
    data = DataConfig(path=str(subset), adapter="hh_rlhf", format="preference", eval_fraction=0.2,
                      max_prompt_len=96, max_completion_len=32, max_seq_len=128, buckets=(128,),
                      skip_malformed=True)
    result = rm.train(_cfg(tiny_llama, data, tmp_path / "hh", steps=10, batch_size=8))
    assert result["steps"] == 10
    assert 0.0 <= result["eval/accuracy"] <= 1.0 and result["eval/pairs"] >= 50
    assert isinstance(result["data_skipped_rows"], int) and result["data_skipped_rows"] >= 0
    assert result["data"]["data/rows"] >= result["data"]["data/examples"] > 0
    assert np.isfinite(result["reward_mean"]) and np.isfinite(result["reward_std"])
