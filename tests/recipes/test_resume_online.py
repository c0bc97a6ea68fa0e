"""Exact resume of the group-rollout drivers (GRPO/DAPO, RLOO, REINFORCE++, ReMax, RAFT, online DPO).

Each runs 4 iterations straight, then 3 iterations saving at 2 (as if killed after 3), then resumes from
the checkpoint at 2 to 4: the final params, optimizer state and the metrics of iterations 3-4 must be
identical (randomness is ``fold_in(seed, iteration)``; the prompt iterator's position is checkpointed;
DAPO's dynamic sampling draws extra prompt batches, which the iterator position covers).
"""

from __future__ import annotations

import importlib

import jax
import numpy as np
import pytest

from rlhf_jax import cli

COMMON = ("run.log_every=1", "run.tensorboard=false", "run.progress=off", "rollout.batch_size=4",
          "rollout.max_new_tokens=6", "data.max_prompt_len=16", "reward.functions=[rlhf_jax.tasks:gold_score]")

CASES = {
    "grpo_dapo": ("grpo", "grpo_dapo_tiny_cpu", ("algo.num_minibatches=2",)),
    "rloo": ("rloo", "rloo_tiny_cpu", ("algo.num_minibatches=2", "algo.epochs=2")),
    "reinforce_pp": ("reinforce_pp", "reinforce_pp_tiny_cpu", ()),
    "remax": ("remax", "remax_tiny_cpu", ()),
    "raft": ("raft", "raft_tiny_cpu", ()),
    "online_dpo": ("online_dpo", "online_dpo_tiny_cpu", ()),
}


def _train(name, tiny_llama, task_data, out, *, stop_at_step=None, extra=()):
    command, config, own = CASES[name]
    cfg = cli.load_trainer_config(command, f"configs/{config}.yaml", (
        f"model.path={tiny_llama}", f"data.path={task_data['prompts_train']}", *COMMON, *own,
        f"run.output_dir={out}", "run.total_steps=4", *extra))
    return importlib.import_module(cli.TRAINERS[command][0]).train(cfg, stop_at_step=stop_at_step)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_resume_mid_run_equals_uninterrupted_run(name, tiny_llama, task_data, tmp_path):
    full = _train(name, tiny_llama, task_data, tmp_path / "full")
    out = tmp_path / "split"
    part = _train(name, tiny_llama, task_data, out, stop_at_step=3, extra=("run.save_every=2",))
    assert part["iterations"] == 3
    resumed = _train(name, tiny_llama, task_data, out, extra=(f"run.resume={out / 'checkpoints' / '2'}",))
    a, b = jax.device_get(full["state"]), jax.device_get(resumed["state"])
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert len(resumed["history"]) == 2
    bad = {k: v for h in full["history"] for k, v in h.items() if not np.isfinite(v)}
    assert not bad, f"non-finite metrics logged: {bad}"
    for k in full["history"][-1]:
        if k.startswith("time/") or k == "tokens_per_s":
            continue
        assert [h[k] for h in full["history"][2:]] == [h[k] for h in resumed["history"]], k
