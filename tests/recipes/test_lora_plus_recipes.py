"""LoRA+ (`optim.lora_plus_ratio`) through a trainer (SFT): after one step the learned ΔW is exactly ratio × plain
LoRA's (A gets no gradient while B = 0, and Adam's first step does not depend on the gradient's scale), and a run
stopped and resumed from its checkpoint (the LoRA+ optimizer chain's state) equals the uninterrupted run."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.config import load_config
from rlhf_jax.models import lora
from rlhf_jax.recipes import sft
from rlhf_jax.train.run import read_jsonl

LORA = ("model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=[all]")


def _cfg(tiny_llama, task_data, out, steps, *extra):
    return load_config(sft.SFTConfig, None, [
        f"model.path={tiny_llama}", f"data.path={task_data['sft_train']}", "data.max_seq_len=48",
        "data.max_prompt_len=24", "data.max_completion_len=32", "optim.learning_rate=3e-3", f"run.output_dir={out}",
        f"run.total_steps={steps}", "run.save_every=1", "batch_size=8", "run.log_every=1", "run.tensorboard=false",
        "run.progress=off", *LORA, *extra])


def _delta(export, base) -> dict:
    """{path: merged W − base W} over the adapted projections of an exported (merged) LoRA model."""
    merged = models.load_pretrained(export)[1]
    old = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(base)[0]}
    return {jax.tree_util.keystr(p): np.asarray(w, np.float64) - np.asarray(old[jax.tree_util.keystr(p)], np.float64)
            for p, w in jax.tree_util.tree_flatten_with_path(merged)[0] if str(p[-1].key) in lora.TARGETS["all"]}


@pytest.mark.slow
def test_sft_lora_plus_first_step_is_ratio_times_plain_and_resumes_exactly(tiny_llama, task_data, tmp_path):
    base = models.load_pretrained(tiny_llama)[1]
    plain = _delta(sft.train(_cfg(tiny_llama, task_data, tmp_path / "plain", 1))["export_dir"], base)
    plus = _delta(sft.train(_cfg(tiny_llama, task_data, tmp_path / "plus", 1, "optim.lora_plus_ratio=16"))
                  ["export_dir"], base)
    assert len(plain) == 14  # q k v o gate up down in 2 layers
    for k in plain:
        assert np.abs(plain[k]).max() > 1e-5, k
        np.testing.assert_allclose(plus[k], 16.0 * plain[k], rtol=1e-3, atol=1e-6, err_msg=k)
    # stop after step 1, resume from the checkpoint: the same run as the uninterrupted one
    full = sft.train(_cfg(tiny_llama, task_data, tmp_path / "full", 3, "optim.lora_plus_ratio=16"))
    sft.train(_cfg(tiny_llama, task_data, tmp_path / "split", 3, "optim.lora_plus_ratio=16"), stop_at_step=1)
    resumed = sft.train(_cfg(tiny_llama, task_data, tmp_path / "split", 3, "optim.lora_plus_ratio=16"))
    strip = lambda rs: [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rs]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "full" / "metrics.jsonl")) == strip(read_jsonl(tmp_path / "split" /
                                                                                      "metrics.jsonl"))
    assert full["train/loss"] == resumed["train/loss"]
