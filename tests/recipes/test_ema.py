"""EMA of the actor (`ppo.ema_decay`, `algo.ema_decay`): the update rule over real optimizer steps, exact resume,
`model_ema/` export; also with LoRA (EMA of the adapters)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.config import ConfigError, load_config
from rlhf_jax.models import lora
from rlhf_jax.recipes import grpo, ppo

RUN = ("run.log_every=1", "run.tensorboard=false", "run.progress=off")


def _cfg(tiny_llama, task_data, out, *extra):
    return load_config(grpo.GRPOConfig, None, [
        f"model.path={tiny_llama}", f"data.path={task_data['prompts_train']}", "data.max_prompt_len=16",
        "reward.functions=[rlhf_jax.tasks:gold_score]", "rollout.max_new_tokens=8", "rollout.batch_size=4",
        "algo.epochs=1", "algo.num_minibatches=1", "actor_optim.learning_rate=1e-2", f"run.output_dir={out}", *RUN,
        *extra])


@pytest.mark.slow
def test_ema_after_one_step_is_the_decayed_mix_and_exports(tiny_llama, task_data, tmp_path):
    res = grpo.train(_cfg(tiny_llama, task_data, tmp_path, "run.total_steps=1", "algo.ema_decay=0.75"))
    start = models.load_pretrained(tiny_llama)[1]
    s = res["state"]
    for e, p0, p1 in zip(jax.tree.leaves(s.ema), jax.tree.leaves(start), jax.tree.leaves(s.params), strict=True):
        np.testing.assert_allclose(np.asarray(e), 0.75 * np.asarray(p0) + 0.25 * np.asarray(p1), rtol=1e-5,
                                   atol=1e-7)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(s.params), jax.tree.leaves(start)))
    assert moved > 1e-4
    _, exported = models.load_pretrained(tmp_path / "model_ema")
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(s.ema), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_lora_ema_resumes_exactly(tiny_llama, task_data, tmp_path):
    extra = ("run.total_steps=3", "algo.ema_decay=0.5", "model.lora.rank=4", "model.lora.targets=[q_proj,v_proj]")
    full = grpo.train(_cfg(tiny_llama, task_data, tmp_path / "full", *extra))
    grpo.train(_cfg(tiny_llama, task_data, tmp_path / "split", *extra, "run.save_every=1"), stop_at_step=2)
    resumed = grpo.train(_cfg(tiny_llama, task_data, tmp_path / "split", *extra))
    assert jax.tree.structure(full["state"].ema) == jax.tree.structure(lora.trainable(full["state"].params))
    for a, b in zip(jax.tree.leaves(full["state"]), jax.tree.leaves(resumed["state"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (tmp_path / "full" / "model_ema" / "config.json").exists()


def test_ema_decay_must_be_in_the_open_unit_interval():
    with pytest.raises(ConfigError, match="algo.ema_decay"):
        load_config(grpo.GRPOConfig, None, ("model.path=x", "data.path=y", "algo.ema_decay=1.0"))
    with pytest.raises(ConfigError, match="ema_decay"):
        load_config(ppo.PPOConfig, None, ("model.path=x", "data.path=y", "ppo.ema_decay=0"))
