"""Online DPO and ReMax raise a tiny model's arithmetic accuracy under the settings the README states (issue #22,
item 5; ``benchmarks/heldout_learning.py`` compares them with GRPO at equal sample budgets on two tasks).

* online DPO: RPO's NLL term on the chosen response (``loss.rpo_alpha=1``, TRL's name). Plain DPO on best-vs-worst
  pairs of a 0/1 reward lowers the chosen (right) answers' likelihood with the rejected ones' (likelihood
  displacement) and greedy accuracy falls;
* ReMax: sampling at τ = 0.7. Its baseline is the GREEDY response's reward; when τ = 1 samples are much worse than
  greedy decoding (a tiny SFT model), nearly every advantage is negative and the policy unlearns its answers.
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

from rlhf_jax import tasks, verifiable
from rlhf_jax.recipes import load_trainer_config, recipe

sys.path.insert(0, str(pathlib.Path(__file__).parent))  # importlib mode: make the sibling helper importable
from _sampling_helpers import sampled_accuracy, sft_export  # noqa: E402

ARITH = ("rollout.batch_size=8", "rollout.max_new_tokens=3", "data.max_prompt_len=8", "run.total_steps=40",
         "reward.functions=[rlhf_jax.verifiable:arith_reward]", "reward.gold_function=rlhf_jax.verifiable:arith_reward",
         "run.log_every=10", "run.tensorboard=false", "run.progress=off", "sample_every=0")
SETTINGS = {  # 64 sampled responses per iteration each, as GRPO's learning test (8 prompts x 8)
    "online_dpo": ("online.num_samples=8", "optim.learning_rate=1e-3", "loss.rpo_alpha=1.0"),
    "remax": ("algo.group_size=8", "actor_optim.learning_rate=1e-3", "rollout.temperature=0.7"),
}


#: the least rise of sampled accuracy asserted (400 samples: standard error of a rate ~0.025). Seen (run.seed 0 / 1):
#: online DPO 0.445 -> 0.795 / 0.445 -> 0.748 (greedy 0.76 -> 0.92 / 0.76 -> 0.88); ReMax (τ = 0.7 samples)
#: 0.598 -> 0.705 / 0.598 -> 0.780 (greedy 0.76 -> 0.76 / 0.76 -> 0.92).
MARGIN = {"online_dpo": 0.15, "remax": 0.06}


def learn(command: str, base, out, *, seed: int = 0) -> tuple[tuple[float, float], tuple[float, float]]:
    """((sampled, greedy) accuracy before, after) of ``command`` from the arithmetic SFT start."""
    s = sft_export(base, "arith")
    prompts = verifiable.arith_prompts(max_operand=4) * 16
    temp = 0.7 if command == "remax" else 1.0

    def acc(model) -> tuple[float, float]:
        return (sampled_accuracy(model, s["tokenizer"], prompts, verifiable.arith_reward, max_new_tokens=3,
                                 temperature=temp),
                sampled_accuracy(model, s["tokenizer"], prompts[:25], verifiable.arith_reward, max_new_tokens=3,
                                 temperature=0.0))

    before = acc(s["model"])
    cfg = load_trainer_config(command, f"configs/{command}_tiny_cpu.yaml", (
        f"model.path={s['model']}", f"data.path={s['prompts']}", f"run.output_dir={out}", f"run.seed={seed}", *ARITH,
        *SETTINGS[command]))
    res = recipe(command).train(cfg)
    after = acc((res["model"], res["state"].params))
    print(f"{command} (run.seed {seed}): arithmetic exact match, sampled (τ = {temp}) {before[0]:.3f} -> "
          f"{after[0]:.3f}, greedy {before[1]:.2f} -> {after[1]:.2f}; "
          f"batch accuracy {[round(h['gold_score'], 2) for h in res['history']]}")
    return before, after


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_raises_arithmetic_accuracy(tmp_path_factory, tmp_path, command):
    before, after = learn(command, tmp_path_factory.getbasetemp(), tmp_path)
    assert after[0] >= before[0] + MARGIN[command]
    assert after[1] >= before[1] - 0.04  # greedy accuracy does not fall (25 prompts: one answer of slack)


@pytest.mark.slow
def test_remax_baseline_at_group_size_1_is_the_greedy_reward(tmp_path_factory, tmp_path):
    """At group size 1 the baseline of each prompt is the reward of the current policy's GREEDY response to it,
    scored like the samples (checked against an independent greedy decode of the SFT start)."""
    s = sft_export(tmp_path_factory.getbasetemp(), "arith")
    rows = [{"prompt": p, "answer": verifiable.arith_answer(p)} for p in ("1+3=", "4+4=", "2+1=", "3+4=")]
    data = tasks.write_jsonl(tmp_path / "prompts.jsonl", rows * 2)
    greedy = [sampled_accuracy(s["model"], s["tokenizer"], [r["prompt"]], verifiable.arith_reward, max_new_tokens=3,
                               temperature=0.0) for r in rows]
    cfg = load_trainer_config("remax", "configs/remax_tiny_cpu.yaml", (
        f"model.path={s['model']}", f"data.path={data}", f"run.output_dir={tmp_path / 'run'}", *ARITH,
        "run.total_steps=1", "algo.group_size=1", "algo.num_minibatches=1", "reward.no_eos_penalty=null"))
    res = recipe("remax").train(cfg)
    assert res["history"][0]["remax_baseline"] == pytest.approx(np.mean(greedy * 2), abs=1e-6), greedy
