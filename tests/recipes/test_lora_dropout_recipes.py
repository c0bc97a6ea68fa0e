"""`model.lora.dropout` in the trainers: the training forwards drop (the run differs from dropout 0 once the
adapters' B has moved), a resumed run draws the same masks (exact resume), and PPO's update (actor and
critic) runs with it."""

from __future__ import annotations

import numpy as np
import pytest

from rlhf_jax.config import load_config
from rlhf_jax.recipes import ppo, sft
from rlhf_jax.train.run import read_jsonl

LORA = ("model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=[all]")
RUN = ("run.log_every=1", "run.tensorboard=false", "run.progress=off")


def _sft(tiny_llama, task_data, out, *extra):
    return load_config(sft.SFTConfig, None, [
        f"model.path={tiny_llama}", f"data.path={task_data['sft_train']}", "data.max_seq_len=48",
        "data.max_prompt_len=24", "data.max_completion_len=32", "optim.learning_rate=3e-3", f"run.output_dir={out}",
        "run.total_steps=4", "run.save_every=2", "batch_size=8", "num_micro_batches=2", *RUN, *LORA, *extra])


def _losses(out):
    """(loss, grad norm) of every logged train step."""
    return [(r["loss"], r["grad_norm"]) for r in read_jsonl(out / "metrics.jsonl") if r.get("split") == "train"]


@pytest.mark.slow
def test_sft_lora_dropout_applies_and_resumes_exactly(tiny_llama, task_data, tmp_path):
    drop = ("model.lora.dropout=0.3",)
    sft.train(_sft(tiny_llama, task_data, tmp_path / "full", *drop))
    sft.train(_sft(tiny_llama, task_data, tmp_path / "split", *drop), stop_at_step=2)
    sft.train(_sft(tiny_llama, task_data, tmp_path / "split", *drop))
    sft.train(_sft(tiny_llama, task_data, tmp_path / "nodrop"))
    full, split, nodrop = (_losses(tmp_path / d) for d in ("full", "split", "nodrop"))
    assert len(full) == 4 and full == split  # the resumed run drew the same masks: bit-identical losses
    # step 0: B = 0, the branch is 0 whatever the mask (same loss), but B's gradient reads drop(x) A; from
    # then on the dropped units change the loss too
    assert full[0][0] == nodrop[0][0] and full[0][1] != nodrop[0][1]
    assert all(a[0] != b[0] for a, b in zip(full[1:], nodrop[1:]))


@pytest.mark.slow
def test_ppo_lora_dropout_runs_actor_and_critic(tiny_llama, task_data, tmp_path):
    def cfg(out, *extra):
        return load_config(ppo.PPOConfig, None, [
            f"model.path={tiny_llama}", f"data.path={task_data['prompts_train']}", "data.max_prompt_len=16",
            "reward.functions=[rlhf_jax.tasks:gold_score]", "rollout.max_new_tokens=8", f"run.output_dir={out}",
            "run.total_steps=2", "rollout.batch_size=8", "ppo.num_minibatches=2", "actor_optim.learning_rate=1e-3",
            "critic_optim.learning_rate=1e-3", *RUN, *LORA, *extra])

    a = ppo.train(cfg(tmp_path / "drop", "model.lora.dropout=0.3"))["history"]
    b = ppo.train(cfg(tmp_path / "nodrop"))["history"]
    for k in ("policy_loss", "value_loss"):
        assert all(np.isfinite(h[k]) for h in a)
    # iteration 0's rollout is the same (B = 0 at the start; sampling never drops); the update's forwards drop
    assert a[0]["score"] == b[0]["score"]
    assert a[1]["policy_loss"] != b[1]["policy_loss"] and a[1]["value_loss"] != b[1]["value_loss"]
