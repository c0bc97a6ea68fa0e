"""Held-out evaluation in the online commands (``online.heldout``): cadence, the same numbers as
``rlhf-jax eval`` on the export, keep-best by ``eval/gold_score``, exact resume, config errors."""

from __future__ import annotations

import importlib
import json

import jax
import numpy as np
import pytest

from rlhf_jax import cli
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.config import ConfigError
from rlhf_jax.data import PromptBatch
from rlhf_jax.online.heldout import fill_rows
from rlhf_jax.recipes import evaluate

GOLD = "rlhf_jax.tasks:gold_score"
DENSE = "tests/multiprocess/dense.py:dense_reward"  # varies across samples of a random tiny model (gold is 0)
COMMON = ("run.log_every=1", "run.tensorboard=false", "run.progress=off", "rollout.batch_size=4",
          "rollout.max_new_tokens=6", "data.max_prompt_len=16", f"reward.functions=[{GOLD}]", "reward.weights=[1.0]",
          "reward.no_eos_penalty=null", f"reward.gold_function={GOLD}", "sample_every=0")


def _cfg(command, config, tiny_llama, task_data, out, *extra):
    return cli.load_trainer_config(command, f"configs/{config}.yaml", (
        f"model.path={tiny_llama}", f"data.path={task_data['prompts_train']}", *COMMON, f"run.output_dir={out}",
        *extra))


def _train(command, cfg, **kw):
    return importlib.import_module(cli.TRAINERS[command][0]).train(cfg, **kw)


def _records(out, split):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


@pytest.mark.slow
def test_grpo_heldout_cadence_and_equal_to_rlhf_jax_eval_on_the_export(tiny_llama, task_data, tmp_path):
    """eval/ records at every run.eval_every iteration and at the end; the final greedy numbers are those of
    ``rlhf-jax eval`` on the exported model (same prompts, widths and batch size)."""
    out = tmp_path / "grpo"
    cfg = _cfg("grpo", "grpo_tiny_cpu", tiny_llama, task_data, out, "run.total_steps=3", "run.eval_every=2",
               f"data.eval_path={task_data['prompts_eval']}", "algo.num_minibatches=1")
    res = _train("grpo", cfg)
    ev = _records(out, "eval")
    assert [r["step"] for r in ev] == [2, 3]
    for key in ("score", "score_std", "gold_score", "response_length", "eos_rate", "sampled_score",
                "sampled_gold_score", "sampled_response_length", "sampled_eos_rate"):
        assert all(np.isfinite(r[key]) for r in ev), key
    assert all(0 <= r["eos_rate"] <= 1 and 1 <= r["response_length"] <= 6 for r in ev)
    assert all(r["score"] == r["gold_score"] for r in ev)  # the reward IS the gold function here
    args = cli._parser().parse_args([
        "eval", "--model", res["export_dir"], "--data", str(task_data["prompts_eval"]), "--reward", GOLD,
        "--gold", GOLD, "--max-new-tokens", "6", "--max-prompt-len", "16", "--batch-size", "4"])
    summary, rows = evaluate.run(args)
    assert summary["prompts"] == 64 == len(rows)
    last = ev[-1]
    assert last["score"] == pytest.approx(summary["reward_mean"], abs=1e-6)
    assert last["gold_score"] == pytest.approx(summary["gold_score"], abs=1e-6)
    assert last["response_length"] == pytest.approx(summary["response_length"], abs=1e-6)
    assert last["eos_rate"] == pytest.approx(summary["eos_rate"], abs=1e-6)


@pytest.mark.slow
def test_keep_best_by_eval_gold_score_and_exact_resume_with_eval(tiny_llama, task_data, tmp_path):
    """RAFT evaluated and checkpointed every iteration, keep_last_n=1 + keep-best by eval/gold_score: the best
    step's checkpoint survives. A run stopped at 3 (saved at 2) and resumed equals the straight run: state,
    train metrics and eval metrics."""
    extra = ("run.total_steps=4", "run.eval_every=1", "data.eval_fraction=0.25", "optim.learning_rate=3e-3",
             f"reward.gold_function={DENSE}")
    full_out = tmp_path / "full"
    full = _train("raft", _cfg("raft", "raft_tiny_cpu", tiny_llama, task_data, full_out, *extra, "run.save_every=1",
                               "run.keep_last_n=1", "run.keep_best_metric=eval/gold_score", "run.keep_best_mode=max"))
    ev = _records(full_out, "eval")
    assert [r["step"] for r in ev] == [1, 2, 3, 4]
    gold = [r["gold_score"] for r in ev]
    assert len(set(gold)) == 4, gold  # distinct: the best step is unambiguous
    best = 1 + int(np.argmax(gold))
    kept = sorted(int(p.name) for p in (full_out / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == sorted({best, 4}), (gold, kept)
    ck = Checkpointer(full_out / "checkpoints", keep_best_metric="eval/gold_score", keep_best_mode="max",
                      read_only=True)
    assert ck.best_step() == best
    ck.close()

    out = tmp_path / "split"
    _train("raft", _cfg("raft", "raft_tiny_cpu", tiny_llama, task_data, out, *extra, "run.save_every=2"), stop_at_step=3)
    resumed = _train("raft", _cfg("raft", "raft_tiny_cpu", tiny_llama, task_data, out, *extra, "run.save_every=2",
                                  f"run.resume={out / 'checkpoints' / '2'}"))
    for x, y in zip(jax.tree.leaves(jax.device_get(full["state"])), jax.tree.leaves(jax.device_get(resumed["state"])),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time" and "per_s" not in k and "time/" not in k}  # noqa: E731
                        for r in rs]
    assert strip(_records(out, "eval")) == strip(ev)
    assert strip(_records(out, "train"))[2:] == strip(_records(full_out, "train"))[2:]


@pytest.mark.slow
def test_eval_off_by_default_logs_no_eval_and_trains_the_same(tiny_llama, task_data, tmp_path):
    """Held-out evaluation reads no training key or prompt: the training metrics with and without it are equal."""
    base = ("run.total_steps=2", "online.num_samples=2")
    a = _train("online_dpo", _cfg("online_dpo", "online_dpo_tiny_cpu", tiny_llama, task_data, tmp_path / "a", *base))
    b = _train("online_dpo", _cfg("online_dpo", "online_dpo_tiny_cpu", tiny_llama, task_data, tmp_path / "b", *base,
                                  f"data.eval_path={task_data['prompts_eval']}", "run.eval_every=1"))
    assert not _records(tmp_path / "a", "eval") and len(_records(tmp_path / "b", "eval")) == 2
    drop = lambda h: {k: v for k, v in h.items() if not k.startswith("time/") and k != "steps_per_s"}  # noqa: E731
    assert [drop(h) for h in a["history"]] == [drop(h) for h in b["history"]]


def test_config_errors_name_the_key(tiny_llama, task_data, tmp_path):
    bad = {
        ("run.eval_every=2",): "run.eval_every",
        ("run.keep_best_metric=eval/score", "run.keep_best_mode=max"): "run.keep_best_metric",
        (f"data.eval_path={task_data['prompts_eval']}", "reward.gold_function=null",
         "run.keep_best_metric=eval/gold_score", "run.keep_best_mode=max"): "reward.gold_function",
        (f"data.eval_path={task_data['prompts_eval']}", "run.keep_best_metric=eval/gold_score"): "keep_best_mode",
    }
    for extra, needle in bad.items():
        with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
            _cfg("ppo", "ppo_tiny_cpu", tiny_llama, task_data, tmp_path, "reward.model_path=null", *extra)
    ok = _cfg("ppo", "ppo_tiny_cpu", tiny_llama, task_data, tmp_path, "reward.model_path=null", "data.eval_fraction=0.1",
              "run.eval_every=5", "run.keep_best_metric=eval/gold_score", "run.keep_best_mode=max")
    assert ok.run.eval_every == 5


def test_fill_rows_padding_and_all_padding_host_slice():
    ids = np.array([[0, 5, 6], [0, 0, 7], [0, 0, 0]], np.int32)
    mask = (ids > 0).astype(np.int32)
    batch, real = fill_rows(PromptBatch(ids, mask, np.array([3, 9, -1], np.int32)))
    assert real.tolist() == [True, True, False]
    assert np.asarray(batch.prompt_mask_BxP)[2].tolist() == [0, 1, 1] and int(batch.index_B[2]) == 3
    empty = PromptBatch(np.zeros((2, 3), np.int32), np.zeros((2, 3), np.int32), np.full(2, -1, np.int32))
    batch, real = fill_rows(empty)
    assert not real.any()
    assert np.asarray(batch.prompt_mask_BxP).sum(axis=1).tolist() == [1, 1]  # one token each: sampleable
    assert np.asarray(batch.index_B).tolist() == [0, 0]
