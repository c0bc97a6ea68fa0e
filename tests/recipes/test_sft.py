"""SFT: completion-only loss by hand, packing == no packing, exact resume after a stop, HF export."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.run_config import OptimConfig, RunConfig
from rlhf_jax.data import DataConfig, build_data
from rlhf_jax.train import run as common
from rlhf_jax.algos import supervised as sup
from rlhf_jax.recipes import sft

DATA = dict(max_prompt_len=24, max_completion_len=32, max_seq_len=48, buckets=(48,))


def _batches(tiny_llama, path, *, pack, n=1, batch_size=4):
    tok = common.load_tokenizer(str(tiny_llama))
    cfg = DataConfig(path=str(path), shuffle=False, pack=pack, **DATA)
    it = build_data(cfg, tok, task="sft", batch_size=batch_size).train
    return [next(it) for _ in range(n)]


def test_sft_loss_matches_manual_completion_only_nll(tiny_llama, task_data):
    model, params = models.load_pretrained(tiny_llama, head="lm")
    batch = jax.tree.map(jnp.asarray, _batches(tiny_llama, task_data["sft_train"], pack=False)[0])
    (loss_sum, count), aux = jax.jit(lambda p, b: sup.sft_loss(model, p, b, None))(params, batch)
    logits = np.asarray(model.apply({"params": params}, batch.input_ids_BxS, batch.attention_mask_BxS), np.float64)
    ids, loss_mask = np.asarray(batch.input_ids_BxS), np.asarray(batch.loss_mask_BxS)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll, n = 0.0, 0
    for b in range(ids.shape[0]):
        for s in range(1, ids.shape[1]):
            if loss_mask[b, s]:
                nll += logz[b, s - 1] - logits[b, s - 1, ids[b, s]]
                n += 1
    assert n == int(count) and n > 0
    np.testing.assert_allclose(float(loss_sum), nll, rtol=1e-5)
    assert float(aux.sequences) == 4


def test_packed_batch_gives_the_same_loss_as_unpacked(tiny_llama, task_data):
    """segment_ids + positions reach the model: packing changes neither the loss sum nor the token count."""
    model, params = models.load_pretrained(tiny_llama, head="lm")
    loss = jax.jit(lambda p, b: sup.sft_loss(model, p, b, None)[0])
    tok = common.load_tokenizer(str(tiny_llama))

    def epoch(pack):
        cfg = DataConfig(path=str(task_data["sft_train"]), shuffle=False, pack=pack, drop_last=False, **DATA)
        it = build_data(cfg, tok, task="sft", batch_size=4).train
        return [it.batch(0, i) for i in range(it.batches_per_epoch)]

    unpacked, packed = epoch(False), epoch(True)
    assert sum(int(np.asarray(b.segment_ids_BxS).max(axis=1).sum()) for b in packed) == 256
    assert len(packed) < len(unpacked)
    u = np.sum([np.asarray(loss(params, jax.tree.map(jnp.asarray, b))) for b in unpacked], axis=0)
    p = np.sum([np.asarray(loss(params, jax.tree.map(jnp.asarray, b))) for b in packed], axis=0)
    np.testing.assert_allclose(p, u, rtol=1e-5)


def _cfg(tiny_llama, task_data, out, **run):
    return sft.SFTConfig(
        model=common.ModelLoadConfig(path=str(tiny_llama)),
        data=DataConfig(path=str(task_data["sft_train"]), eval_path=str(task_data["sft_eval"]), **DATA),
        optim=OptimConfig(learning_rate=3e-3, schedule="linear", warmup_steps=2),
        run=RunConfig(output_dir=str(out), total_steps=8, log_every=1, eval_every=4, save_every=4,
                      tensorboard=False, progress="off", **run),
        batch_size=8, num_micro_batches=2)


def _train_records(out: pathlib.Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("time", "steps_per_s")} for r in common.read_jsonl(out / "metrics.jsonl")]


@pytest.mark.slow
def test_resume_after_stop_is_exact(tiny_llama, task_data, tmp_path):
    full = sft.train(_cfg(tiny_llama, task_data, tmp_path / "full"))
    stopped = sft.train(_cfg(tiny_llama, task_data, tmp_path / "resumed"), stop_at_step=4)
    assert stopped["steps"] == 4 and "export_dir" not in stopped
    resumed = sft.train(_cfg(tiny_llama, task_data, tmp_path / "resumed"))
    assert resumed["steps"] == 8
    assert _train_records(tmp_path / "full") == _train_records(tmp_path / "resumed")
    assert [r["step"] for r in _train_records(tmp_path / "resumed") if r["split"] == "train"] == list(range(1, 9))
    _, p_full = models.load_pretrained(full["export_dir"])
    _, p_resumed = models.load_pretrained(resumed["export_dir"])
    chex.assert_trees_all_equal(p_full, p_resumed)
    assert full["eval/loss"] == resumed["eval/loss"] < 8.0


@pytest.mark.slow
def test_export_is_a_loadable_hf_folder_with_tokenizer(tiny_llama, task_data, tmp_path):
    cfg = _cfg(tiny_llama, task_data, tmp_path / "run")
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, total_steps=3, eval_every=0, save_every=0))
    result = sft.train(cfg)
    export = pathlib.Path(result["export_dir"])
    assert (export / "config.json").exists() and (export / "tokenizer.json").exists()
    assert json.loads((export / "config.json").read_text())["model_type"] == "llama"
    tok = common.load_tokenizer(str(export))
    assert tok("Describe the dog:")["input_ids"]
    assert (tmp_path / "run" / "config.yaml").exists()
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [3]
