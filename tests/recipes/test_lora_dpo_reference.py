"""Offline DPO family with ``model.lora``: the reference is the policy's own base with the adapters off — the
base model's log-probs exactly, live or precomputed, and no second model is loaded."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, tasks
from rlhf_jax.algos.preference_rows import PairBatch, completion_logps, stacked_rows
from rlhf_jax.config import load_config
from rlhf_jax.data import PreferenceBatch
from rlhf_jax.models import Transformer, init_params, lora
from rlhf_jax.recipes import dpo
from rlhf_jax.train import reference as pc
from rlhf_jax.train import run as common
from rlhf_jax.train.run import read_jsonl

LORA = ("model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=[all]")


def test_reference_logps_of_a_lora_policy_are_the_base_models(tiny_llama):
    base_model, base = models.load_pretrained(tiny_llama)
    m = Transformer(base_model.config.replace(lora=lora.LoRAConfig(rank=4, alpha=8, targets=("all",)).spec()))
    abstract = jax.eval_shape(lambda: init_params(m, jax.random.key(0)))
    adapters = lora.init_adapters(abstract, jax.random.key(1), scanned=False)
    adapters = jax.tree.map(lambda x: x + 0.05, adapters)  # B ≠ 0: the policy is NOT the base
    params = lora.join(adapters, base)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(5, 300, size=(4, 12)), jnp.int32)
    mask = jnp.ones_like(ids).at[1, :3].set(0)
    loss = jnp.zeros_like(ids).at[:, 6:].set(1)
    batch = PairBatch(PreferenceBatch(ids, mask, loss, ids[::-1], mask[::-1], loss[::-1]),
                      jnp.zeros(4), jnp.zeros(4))
    got = pc.reference_logps(m, params, batch, num_chunks=2)
    want = pc.reference_logps(base_model, base, batch, num_chunks=2)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    on, _ = completion_logps(m, params, *stacked_rows(batch))  # the policy itself (adapters on) differs
    assert float(jnp.abs(on[:4] - want[:, 0]).max()) > 1e-3


@pytest.fixture()
def count_loads(monkeypatch):
    """How many models the run loads (policy + a separate reference = 2)."""
    calls = []
    real = common.load_model

    def counting(cfg, **kw):
        calls.append(cfg.path)
        return real(cfg, **kw)

    monkeypatch.setattr(common, "load_model", counting)
    return calls


def _cfg(tiny_llama, data, out, *extra):
    return load_config(dpo.DPOConfig, None, [
        f"model.path={tiny_llama}", f"data.path={data}", "data.max_prompt_len=16", "data.max_completion_len=24",
        "data.max_seq_len=40", "data.buckets=[40]", "batch_size=8", "run.total_steps=2", "run.log_every=1",
        "run.tensorboard=false", "run.progress=off", f"run.output_dir={out}", "optim.learning_rate=1e-3",
        "export=false", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_live_reference_is_the_adapters_off_base_with_one_model_loaded(tiny_llama, task_data, tmp_path, algorithm,
                                                                       count_loads):
    data = task_data["pref_train"]
    if algorithm == "kto":
        rows = [json.loads(ln) for ln in data.read_text().splitlines()]
        data = tasks.write_jsonl(tmp_path / "kto.jsonl", [{"prompt": r["prompt"], "completion": r[k],
                                                          "label": k == "chosen"} for r in rows
                                                         for k in ("chosen", "rejected")])
    res = dpo.train(_cfg(tiny_llama, data, tmp_path / "run", f"loss.algorithm={algorithm}", *LORA))
    assert count_loads == [str(tiny_llama)]  # the policy only: the reference is its base
    first = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r.get("split") == "train"][0]
    # step 0: B = 0, policy = base = reference → implicit rewards 0 (to float rounding of two programs)
    assert abs(first["rewards_chosen"]) < 1e-5 and abs(first["rewards_rejected"]) < 1e-5
    if algorithm == "dpo":
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert res["steps"] == 2 and np.isfinite(res["train/loss"])


@pytest.mark.slow
def test_precomputed_reference_equals_the_full_models_and_loads_one_model(tiny_llama, task_data, tmp_path,
                                                                          count_loads):
    data = task_data["pref_train"]
    dpo.train(_cfg(tiny_llama, data, tmp_path / "full", "precompute_ref_logps=true",
                   f"ref_logps_cache_dir={tmp_path / 'cache_full'}"))
    assert len(count_loads) == 2  # full fine-tune: policy + reference
    count_loads.clear()
    dpo.train(_cfg(tiny_llama, data, tmp_path / "lora", "precompute_ref_logps=true",
                   f"ref_logps_cache_dir={tmp_path / 'cache_lora'}", *LORA))
    assert count_loads == [str(tiny_llama)]
    (full,), (ours,) = (list((tmp_path / d).glob("*.npy")) for d in ("cache_full", "cache_lora"))
    assert full.name != ours.name  # keyed apart (the base's dtype is part of the key)
    np.testing.assert_allclose(np.load(ours), np.load(full), rtol=1e-6, atol=1e-5)


def test_lora_reference_config_errors():
    with pytest.raises(ValueError, match="ref_dtype"):
        load_config(dpo.DPOConfig, None, ["model.path=x", "data.path=y", "ref_dtype=bfloat16", *LORA])
    cfg = load_config(dpo.DPOConfig, None, ["model.path=x", "data.path=y", "ref_model_path=z", *LORA])
    assert not cfg.reference_is_adapters_off  # an explicit reference model is loaded as before
