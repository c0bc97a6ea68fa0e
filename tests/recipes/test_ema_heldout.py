"""The EMA actor in the held-out evaluation: ``eval/ema_*`` next to ``eval/*``, from the same keys (so an EMA
that equals the actor scores exactly as the actor; one that is still the starting point scores as the initial
actor), and ``run.keep_best_metric`` may name them."""

from __future__ import annotations

import pytest

from rlhf_jax.config import ConfigError, load_config
from rlhf_jax.recipes import grpo, ppo
from rlhf_jax.train.run import read_jsonl

RUN = ("run.log_every=1", "run.tensorboard=false", "run.progress=off")
KEYS = ("score", "gold_score", "response_length", "sampled_score", "sampled_gold_score")


def _ppo(tiny_llama, task_data, out, *extra):
    return load_config(ppo.PPOConfig, None, [
        f"model.path={tiny_llama}", f"data.path={task_data['prompts_train']}", "data.max_prompt_len=16",
        f"data.eval_path={task_data['prompts_eval']}", "reward.functions=['tests/multiprocess/dense.py:dense_reward']",
        "reward.gold_function=rlhf_jax.tasks:gold_score", "rollout.max_new_tokens=8", "rollout.batch_size=4",
        "ppo.num_minibatches=1", "actor_optim.learning_rate=1e-2", "critic_optim.learning_rate=1e-2",
        "run.total_steps=2", "run.eval_every=1", f"run.output_dir={out}", *RUN, *extra])


@pytest.mark.slow
def test_ema_actor_is_evaluated_alongside(tiny_llama, task_data, tmp_path):
    # decay ~1: the EMA is still the starting actor, so its held-out numbers are the initial actor's
    slow = ppo.train(_ppo(tiny_llama, task_data, tmp_path / "slow", "ppo.ema_decay=0.99999999",
                          "run.keep_best_metric=eval/ema_gold_score", "run.keep_best_mode=max"),
                     evaluate_initial=True)
    for k in KEYS:
        assert slow["eval"]["ema_" + k] == pytest.approx(slow["eval_initial"][k], abs=1e-6), k
    assert slow["eval"]["score"] != slow["eval_initial"]["score"]  # the actor itself moved
    records = [r for r in read_jsonl(tmp_path / "slow" / "metrics.jsonl") if r.get("split") == "eval"]
    assert len(records) == 2 and all("ema_gold_score" in r and "ema_score" in r for r in records)
    assert (tmp_path / "slow" / "checkpoints").exists()  # keep-best on eval/ema_gold_score ran
    # decay ~0: the EMA is the actor, so its numbers are the actor's exactly
    fast = ppo.train(_ppo(tiny_llama, task_data, tmp_path / "fast", "ppo.ema_decay=0.00000001"))
    for k in KEYS:
        assert fast["eval"]["ema_" + k] == pytest.approx(fast["eval"][k], abs=1e-6), k
    # without EMA: no ema_ keys, and the actor's numbers are the same (the EMA never touches training)
    plain = ppo.train(_ppo(tiny_llama, task_data, tmp_path / "plain"))
    assert not any(k.startswith("ema_") for k in plain["eval"])
    assert plain["eval"] == {k: v for k, v in fast["eval"].items() if not k.startswith("ema_")}


def test_keep_best_on_an_ema_metric_needs_the_ema():
    base = ("model.path=x", "data.path=y", "data.eval_fraction=0.1", "reward.gold_function=rlhf_jax.tasks:gold_score",
            "run.keep_best_metric=eval/ema_gold_score", "run.keep_best_mode=max")
    with pytest.raises(ConfigError, match="run.keep_best_metric"):
        load_config(grpo.GRPOConfig, None, base)
    with pytest.raises(ConfigError, match="run.keep_best_metric"):
        load_config(ppo.PPOConfig, None, base)
    assert load_config(grpo.GRPOConfig, None, (*base, "algo.ema_decay=0.9")).algo.ema_decay == 0.9
    assert load_config(ppo.PPOConfig, None, (*base, "ppo.ema_decay=0.9")).ppo.ema_decay == 0.9
