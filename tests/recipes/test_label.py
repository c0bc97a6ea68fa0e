"""Tests for `rlhf-jax label`: the judge's verdict log-prob, output rows, and (slow) that the labelled file
loads through the preference loader and trains `rm` and `dpo` directly."""

from __future__ import annotations

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import cli
from rlhf_jax.config import ConfigError, load_config
from rlhf_jax.data import DataConfig, build_data
from rlhf_jax.recipes import label


def test_verdict_logprob_reads_the_last_real_position():
    logits = jax.random.normal(jax.random.key(0), (2, 4, 7))
    mask = jnp.array([[0, 1, 1, 1], [1, 1, 1, 1]])
    got = np.asarray(jax.jit(label.verdict_logprob, static_argnums=2)(logits, mask, 3))
    want = np.asarray(jax.nn.log_softmax(logits[:, -1], -1)[:, 3])
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_judge_program_equals_the_full_logits_log_softmax(scan):
    """The LM head on the last real position only = log-softmax of every position's logits, then the last one
    (left padding, right padding, an empty row)."""
    from rlhf_jax.models import Transformer, init_params
    from rlhf_jax.models.config import ModelConfig

    c = ModelConfig(model_type="llama", vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, intermediate_size=48, max_position_embeddings=64, norm_eps=1e-5, activation="silu",
                    scan_layers=scan)
    model = Transformer(c, head="lm")
    params = init_params(model, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (4, 9), 0, 97)
    mask = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9, [1, 1, 1, 1, 1, 0, 0, 0, 0], [0] * 9])
    old = jax.jit(lambda p, i, m: label.verdict_logprob(model.apply({"params": p}, i, m), m, 5))(params, ids, mask)
    new = label.judge_program(model, 5)(params, ids, mask)
    chex.assert_shape(new, (4,))
    np.testing.assert_allclose(np.asarray(new), np.asarray(old), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(label.last_positions(mask))[:, 0], [8, 8, 4, 0])
    text = label.judge_program(model, 5).lower(params, ids, mask).as_text()
    assert "4x9x97" not in text and "4x1x97" in text  # no [B, S, V] logits, only [B, 1, V]


def test_pair_row_formats():
    assert label.pair_row("p", "a", "b", 1.0, 0.0) == {"prompt": "p", "chosen": "a", "rejected": "b",
                                                       "score_chosen": 1.0, "score_rejected": 0.0}
    msgs = [{"role": "user", "content": "hi"}]
    row = label.pair_row(msgs, "a", "b", 1.0, 0.0)
    assert row["chosen"] == [{"role": "assistant", "content": "a"}] and row["prompt"] == msgs


def test_config_errors():
    with pytest.raises(ConfigError, match="reward.model_path"):
        load_config(label.LabelConfig, None, ("model.path=x", "data.path=y", "output_path=o", "ranker=reward_model"))
    with pytest.raises(ConfigError, match="judge.template"):
        load_config(label.LabelConfig, None, ("model.path=x", "data.path=y", "output_path=o", "judge.template=abc"))


LENGTH_FN = "def length(prompts, responses, **kw):\n    return [float(len(r)) for r in responses]\n"


@pytest.mark.slow
@pytest.mark.parametrize("ranker", ["function", "judge"])
def test_labelled_pairs_feed_rm_and_dpo(tiny_llama, task_data, tmp_path, ranker):
    fn_file = tmp_path / "length_reward.py"
    fn_file.write_text(LENGTH_FN)
    out = tmp_path / "pairs.jsonl"
    # the judge is the (random) policy itself; ' Yes' is 2 tokens of the fixture BPE, ' the' is one
    overrides = [f"model.path={tiny_llama}", f"data.path={task_data['prompts_train']}", "data.max_prompt_len=16",
                 f"output_path={out}", f"ranker={ranker}", "num_samples=3", "rollout.batch_size=12",
                 "rollout.max_new_tokens=8", f"reward.functions=[{fn_file}:length]", "judge.verdict=' the'"]
    res = label.train(cli.load_trainer_config("label", None, overrides))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert res["prompts"] == 32 and res["pairs"] == len(rows) > 16 and res["pairs"] + res["ties"] == 32
    assert all(r["score_chosen"] > r["score_rejected"] and r["prompt"].startswith("Describe") for r in rows)
    if ranker == "function":
        assert all(len(r["chosen"]) > len(r["rejected"]) for r in rows)
    # loads through the preference loader ...
    tok = __import__("rlhf_jax.train.run", fromlist=["x"]).load_tokenizer(str(tiny_llama))
    splits = build_data(DataConfig(path=str(out), format="preference", max_seq_len=32, max_prompt_len=16), tok,
                        task="preference", batch_size=4)
    assert splits.stats.examples == len(rows)
    # ... and trains the reward model and DPO directly (one CLI subcommand each, 2 steps)
    for cmd, extra in (("rm", []), ("dpo", ["loss.beta=0.1"])):
        code = cli.main([cmd, f"configs/{cmd}_tiny_cpu.yaml", f"model.path={tiny_llama}", f"data.path={out}",
                         "data.eval_path=null", "data.eval_fraction=0.0", "run.keep_best_metric=null", "optim.warmup_steps=0", "run.total_steps=2", "batch_size=4",
                         f"run.output_dir={tmp_path / cmd}", "run.tensorboard=false", *extra])
        assert code == 0, cmd
        assert (tmp_path / cmd / "model" / "config.json").exists()
