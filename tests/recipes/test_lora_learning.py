"""LoRA-PPO and LoRA-GRPO raise the demo task's gold score (the same SFT start and measure as RAFT/online DPO)."""

from __future__ import annotations

import pathlib
import sys

import pytest

from rlhf_jax import tasks
from rlhf_jax.config import load_config
from rlhf_jax.recipes import grpo, ppo

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # importlib mode: make the sibling helper importable
from _sampling_helpers import sampled_accuracy, sft_export  # noqa: E402

# The recommended LoRA of the tiny configs (lm_head target + LoRA+ 16 at the lr of a full fine-tune). Plain
# `targets: [all]` at lr 5e-3 passed on one host but moved the gold score only 0.034 -> 0.164 on a host with other
# CPU flags (2026-12-07), under this test's +0.15; these settings gave 0.034 -> 0.911 there.
LORA = ("model.lora.rank=8", "model.lora.alpha=16", "model.lora.targets=[all,lm_head]")


def _common(s, out, steps):
    return (f"model.path={s['model']}", f"data.path={s['prompts']}", "data.max_prompt_len=16",
            "reward.functions=[rlhf_jax.tasks:gold_score]", "reward.gold_function=rlhf_jax.tasks:gold_score",
            "rollout.max_new_tokens=12", f"run.total_steps={steps}", f"run.output_dir={out}",
            "run.tensorboard=false", "run.log_every=5", *LORA)


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["grpo"])  # LoRA-PPO was measured by hand (session report), not asserted here
def test_lora_rl_raises_demo_gold_score(trainer, tmp_path_factory, tmp_path):
    s = sft_export(tmp_path_factory.getbasetemp(), "demo")
    prompts = [tasks.make_prompt(t) for t in tasks.TOPICS] * 4
    before = sampled_accuracy(s["model"], s["tokenizer"], prompts, tasks.gold_score, max_new_tokens=12)
    if trainer == "grpo":
        cfg = load_config(grpo.GRPOConfig, None, (*_common(s, tmp_path, 15), "algo.group_size=4",
                                                  "rollout.batch_size=16", "actor_optim.learning_rate=1e-3",
                                                  "actor_optim.lora_plus_ratio=16"))
        res = grpo.train(cfg)
        state = res["state"]
    else:
        cfg = load_config(ppo.PPOConfig, None, (*_common(s, tmp_path, 15), "rollout.batch_size=16",
                                                "ppo.epochs=2", "actor_optim.learning_rate=5e-3",
                                                "critic_optim.learning_rate=5e-3", "kl.coef=0.02"))
        res = ppo.train(cfg)
        state = res["state"]["actor"]
    after = sampled_accuracy((res["models"].actor if trainer == "ppo" else res["model"], state.params),
                             s["tokenizer"], prompts, tasks.gold_score, max_new_tokens=12)
    print(f"LoRA-{trainer} demo gold score: before {before:.3f} -> after {after:.3f}; batch gold "
          f"{[round(h['gold_score'], 2) for h in res['history']]}")
    assert after > before + 0.15
