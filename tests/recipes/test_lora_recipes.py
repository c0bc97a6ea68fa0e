"""`model.lora` through every trainer: only adapters (and a scalar head) move, the frozen base is shared and
never checkpointed, resume is exact, the reference is the base with adapters off, exports are merged or PEFT."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.config import load_config
from rlhf_jax.models import lora
from rlhf_jax.recipes import dpo, grpo, online_dpo, ppo, raft, rm, sft
from rlhf_jax.train.run import read_jsonl

LORA = ("model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=[all]")
RUN = ("run.log_every=1", "run.tensorboard=false", "run.progress=off")


def _frozen_equal(params, base):
    """Every frozen leaf of a LoRA tree equals the pretrained base's (bit for bit)."""
    _, frozen = lora.split_trainable(params)
    want = lora.split_trainable(lora.join(lora.trainable(params), base))[1]
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _moved(params):
    """Every adapter B moved away from its zero start."""
    for k, x in jax.tree_util.tree_leaves_with_path(lora.adapter_part(params)):
        if str(k[-1].key).endswith("_lora_b"):
            assert float(np.abs(np.asarray(x)).max()) > 0, jax.tree_util.keystr(k)


def _sft_cfg(tiny_llama, task_data, out, *extra):
    return load_config(sft.SFTConfig, None, [
        f"model.path={tiny_llama}", f"data.path={task_data['sft_train']}", "data.max_seq_len=48",
        "data.max_prompt_len=24", "data.max_completion_len=32", "optim.learning_rate=3e-3", f"run.output_dir={out}",
        "run.total_steps=4", "run.save_every=2", "batch_size=8", "num_micro_batches=2", *RUN, *LORA, *extra])


@pytest.mark.slow
def test_sft_lora_trains_adapters_only_resumes_exactly_and_exports_merged(tiny_llama, task_data, tmp_path):
    full = sft.train(_sft_cfg(tiny_llama, task_data, tmp_path / "full"))
    # a stop after step 2 and a resume from the adapters-only checkpoint give the same run
    sft.train(_sft_cfg(tiny_llama, task_data, tmp_path / "split"), stop_at_step=2)
    resumed = sft.train(_sft_cfg(tiny_llama, task_data, tmp_path / "split"))
    strip = lambda rs: [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rs]  # noqa: E731
    assert strip(read_jsonl(tmp_path / "full" / "metrics.jsonl")) == strip(read_jsonl(tmp_path / "split" /
                                                                                      "metrics.jsonl"))
    assert full["train/loss"] == resumed["train/loss"]
    # the checkpoint holds the adapters and their Adam moments, not the base
    ckpt_bytes = sum(f.stat().st_size for f in (tmp_path / "full" / "checkpoints" / "2").rglob("*") if f.is_file())
    base_bytes = (pathlib.Path(tiny_llama) / "model.safetensors").stat().st_size
    assert ckpt_bytes < base_bytes / 3, (ckpt_bytes, base_bytes)
    # merged export == base + adapters
    export = pathlib.Path(full["export_dir"])
    merged_model, merged_params = models.load_pretrained(export)
    assert merged_model.config.lora is None
    cfg = _sft_cfg(tiny_llama, task_data, tmp_path / "full")
    loaded, state = _restored(cfg, tmp_path / "full", 4, head="lm")
    # Adam moments exist for the trainable part only
    mu_sizes = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert mu_sizes == 2 * sum(x.size for x in jax.tree.leaves(lora.trainable(loaded.params)))
    _frozen_equal(state.params, models.load_pretrained(tiny_llama)[1])
    _moved(state.params)
    ours = np.asarray(loaded.model.apply({"params": state.params}, IDS, MASK))
    np.testing.assert_allclose(np.asarray(merged_model.apply({"params": merged_params}, IDS, MASK)), ours, atol=1e-4)


IDS = np.arange(24).reshape(2, 12) % 300 + 5
MASK = np.ones_like(IDS)


def _restored(cfg, out, step, *, head):
    """(loaded LoRA model, the run's train state at `step` restored from its checkpoint)."""
    from rlhf_jax import sharding as shd
    from rlhf_jax.checkpoint import Checkpointer, abstract_like
    from rlhf_jax.train.optim import make_optimizer
    from rlhf_jax.train.run import load_model, make_mesh
    from rlhf_jax.train.state import create_train_state

    mesh = make_mesh(shd.MeshConfig())
    loaded = load_model(cfg.model, mesh=mesh, head=head)
    state, _ = create_train_state(loaded.params, make_optimizer(cfg.optim, 4), mesh=mesh,
                                  params_shardings=loaded.shardings)
    with Checkpointer(out / "checkpoints", read_only=True) as ck:
        restored, _ = ck.restore(step, target=abstract_like(state))
    return loaded, restored


def _online(tiny_llama, task_data, out, *extra):
    return [f"model.path={tiny_llama}", f"data.path={task_data['prompts_train']}", "data.max_prompt_len=16",
            "reward.functions=[rlhf_jax.tasks:gold_score]", "reward.gold_function=rlhf_jax.tasks:gold_score",
            "rollout.max_new_tokens=8", f"run.output_dir={out}", "run.total_steps=2", *RUN, *LORA, *extra]


@pytest.mark.slow
def test_ppo_lora_actor_and_critic_own_adapters_reference_is_the_base(tiny_llama, task_data, tmp_path):
    cfg = load_config(ppo.PPOConfig, None, _online(
        tiny_llama, task_data, tmp_path, f"reward.model_path={tiny_llama}", "reward.normalize=false",
        "rollout.batch_size=8", "ppo.num_minibatches=2", "actor_optim.learning_rate=1e-3",
        "critic_optim.learning_rate=1e-3", "model.base_dtype=bfloat16"))
    res = ppo.train(cfg)
    assert res["ref_params"] is None  # no second copy of the base
    base = models.load_pretrained(tiny_llama)[1]
    actor, critic = res["state"]["actor"].params, res["state"]["critic"].params
    assert actor["layers_0"]["attn"]["q"].dtype == np.dtype("bfloat16")  # model.base_dtype
    assert actor["layers_0"]["attn"]["q_lora_a"].dtype == np.float32
    _frozen_equal(actor, jax.tree.map(lambda x: x.astype("bfloat16"), base))
    _moved(actor)
    _moved(critic)
    assert float(np.abs(np.asarray(critic["score"])).max()) > 0  # the value head trains with the adapters
    # the two models' adapters are their own
    assert not np.array_equal(np.asarray(actor["layers_0"]["attn"]["q_lora_b"]),
                              np.asarray(critic["layers_0"]["attn"]["q_lora_b"]))
    assert len(res["history"]) == 2 and all(np.isfinite(h["kl"]) for h in res["history"])
    assert (tmp_path / "model" / "config.json").exists()


@pytest.mark.slow
def test_ppo_lora_critic_on_the_actors_base(tiny_llama, task_data, tmp_path):
    """ppo.critic_shares_base: the critic's state holds its adapters and value head only; one base in memory."""
    cfg = load_config(ppo.PPOConfig, None, _online(
        tiny_llama, task_data, tmp_path, "rollout.batch_size=8", "ppo.critic_shares_base=true",
        "actor_optim.learning_rate=1e-3", "critic_optim.learning_rate=1e-3",
        "ppo.epochs=1", "ppo.num_minibatches=1"))  # one optimizer step: the fused critic pass
    res = ppo.train(cfg)
    critic = res["state"]["critic"].params
    assert "embed" not in critic and "score" in critic
    assert not lora.split_trainable(critic)[1]  # nothing frozen of its own
    _moved(critic)
    assert float(np.abs(np.asarray(critic["score"])).max()) > 0
    _frozen_equal(res["state"]["actor"].params, models.load_pretrained(tiny_llama)[1])
    assert all(np.isfinite(h["value_loss"]) for h in res["history"])


@pytest.mark.slow
def test_grpo_lora_exports_a_peft_folder(tiny_llama, task_data, tmp_path):
    cfg = load_config(grpo.GRPOConfig, None, _online(tiny_llama, task_data, tmp_path, "rollout.batch_size=4",
                                                     "model.lora.export_format=peft"))
    res = grpo.train(cfg)
    _moved(res["state"].params)
    _frozen_equal(res["state"].params, models.load_pretrained(tiny_llama)[1])
    folder = tmp_path / "model"
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    assert (folder / "adapter_model.safetensors").exists() and not (folder / "model.safetensors").exists()
    # the folder is a starting point: a new run loads it and starts from these adapters
    from rlhf_jax import sharding as shd
    from rlhf_jax.train.run import ModelLoadConfig, load_model, make_mesh

    again = load_model(ModelLoadConfig(path=str(tiny_llama), lora=lora.LoRAConfig(
        rank=4, alpha=8, targets=("all",), adapter_path=str(folder))), mesh=make_mesh(shd.MeshConfig()), head="lm")
    for a, b in zip(jax.tree.leaves(lora.adapter_part(again.params)), jax.tree.leaves(lora.adapter_part(
            res["state"].params)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@pytest.mark.slow
def test_rm_lora_trains_head_and_adapters_and_exports_merged_scores(tiny_llama, task_data, tmp_path):
    cfg = load_config(rm.RMConfig, None, [
        f"model.path={tiny_llama}", f"data.path={task_data['pref_train']}", "data.max_seq_len=48",
        "data.max_prompt_len=24", "data.max_completion_len=32", "batch_size=8", "run.total_steps=3",
        f"run.output_dir={tmp_path}", "run.save_every=3", *RUN, *LORA])
    res = rm.train(cfg)
    model, merged = models.load_pretrained(pathlib.Path(res["export_dir"]), head="scalar")
    loaded, state = _restored(cfg, tmp_path, 3, head="scalar")
    assert float(np.abs(np.asarray(state.params["score"])).max()) > 0  # the zero-initialised head trained
    _moved(state.params)
    np.testing.assert_allclose(np.asarray(model.apply({"params": merged}, IDS, MASK)),
                               np.asarray(loaded.model.apply({"params": state.params}, IDS, MASK)), atol=1e-4)


@pytest.mark.slow
def test_dpo_raft_online_dpo_run_with_lora(tiny_llama, task_data, tmp_path):
    base = models.load_pretrained(tiny_llama)[1]
    d = dpo.train(load_config(dpo.DPOConfig, None, [
        f"model.path={tiny_llama}", f"data.path={task_data['pref_train']}", "data.max_prompt_len=16",
        "data.max_completion_len=24", "data.max_seq_len=40", "data.buckets=[40]", "batch_size=8",
        "run.total_steps=2", f"run.output_dir={tmp_path / 'dpo'}", "optim.learning_rate=1e-3", *RUN, *LORA]))
    assert np.isfinite(d["train/loss"]) and (tmp_path / "dpo" / "model" / "config.json").exists()
    # a reward that varies across a random model's samples (the gold score is 0 for all of them: no pair)
    dense = "reward.functions=['tests/multiprocess/dense.py:dense_reward']"
    r = raft.train(load_config(raft.RAFTConfig, None, _online(
        tiny_llama, task_data, tmp_path / "raft", "raft.num_samples=2", "raft.top_k=1", "rollout.batch_size=4", dense)))
    o = online_dpo.train(load_config(online_dpo.OnlineDPOConfig, None, _online(
        tiny_llama, task_data, tmp_path / "odpo", "online.num_samples=2", "rollout.batch_size=4", dense)))
    for res in (r, o):
        _moved(res["state"].params)
        _frozen_equal(res["state"].params, base)
        assert len(res["history"]) == 2


def test_lora_config_errors():
    with pytest.raises(ValueError, match="model.lora.targets"):
        lora.LoRAConfig(targets=("qproj",))
    with pytest.raises(ValueError, match="model.lora.dropout"):
        lora.LoRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match="model.lora.export_format"):
        lora.LoRAConfig(export_format="gguf")
