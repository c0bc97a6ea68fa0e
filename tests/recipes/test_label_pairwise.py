"""RL-CAI labels: `rlhf-jax label ranker=pairwise_judge` (two responses as (A)/(B) under each principle, both
orders), the soft `chosen_prob` column through the preference loader, and `rm`'s soft-label loss."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import cli
from rlhf_jax import sharding as shd
from rlhf_jax.algos.supervised import pair_scores, rm_loss
from rlhf_jax.config import ConfigError, load_config
from rlhf_jax.data import DataConfig, MalformedRowError, PreferenceBatch, SoftPreferenceBatch, build_data
from rlhf_jax.ops.ai_feedback import soft_bradley_terry_loss
from rlhf_jax.online.judge import PairwiseJudge, PairwiseJudgeConfig
from rlhf_jax.recipes import label
from rlhf_jax.train import run as common

JUDGE = PairwiseJudgeConfig(template="{prompt} {principle}\n(A){response_a}\n(B){response_b}\nBetter: (",
                            principles=("Which is kinder?", "Which is shorter?"))


def test_pairwise_rows_pick_the_more_probable_response():
    responses = ["a", "b", "c", "d", "e", "e"]
    rows = label.pairwise_rows(["p0", "p1", "p2"], responses, np.array([0.8, 0.3, 0.9]), np.array([True, True, True]))
    assert rows[0] == {"prompt": "p0", "chosen": "a", "rejected": "b", "score_chosen": 0.8,
                       "score_rejected": pytest.approx(0.2), "chosen_prob": 0.8}
    assert (rows[1]["chosen"], rows[1]["rejected"]) == ("d", "c") and rows[1]["chosen_prob"] == pytest.approx(0.7)
    assert rows[2] is None  # identical responses: a tie
    assert label.pairwise_rows(["p"], ["a", "b"], np.array([0.6]), np.array([False])) == []


def test_config_errors():
    base = ("model.path=x", "data.path=y", "output_path=o", "ranker=pairwise_judge")
    with pytest.raises(ConfigError, match="num_samples"):
        load_config(label.LabelConfig, None, base)  # default num_samples is 4
    load_config(label.LabelConfig, None, base + ("num_samples=2",))
    with pytest.raises(ConfigError, match="pairwise_judge.template"):
        load_config(label.LabelConfig, None, base + ("num_samples=2", "pairwise_judge.template='{response_a}'"))
    with pytest.raises(ConfigError, match="pairwise_judge.principles"):
        load_config(label.LabelConfig, None, base + ("num_samples=2", "pairwise_judge.principles=[]"))


def test_judge_reads_option_logprobs_of_unpadded_texts(tiny_llama):
    """Each (pair, principle, order) row's option log-probs equal a forward of that text alone (left padding
    changes nothing), and the probability is their average over principles and orders."""
    mesh = common.make_mesh(shd.MeshConfig())
    loaded = common.load_model(common.ModelLoadConfig(path=str(tiny_llama)), mesh=mesh, head="lm")
    judge = PairwiseJudge(loaded, JUDGE)
    prompts = ["Describe the dog:", "Describe the car:", "Describe it:", "Describe the long red river:"] * 2
    first = [" good.", " bad bad.", " red tall happy.", " calm."] * 2
    second = [" sad.", " nice kind warm.", " old.", " calm blue."] * 2
    texts = judge.texts(prompts, first, second)
    assert len(texts) == 8 * 2 * 2 and "(A) good.\n(B) sad." in texts[0] and "(A) sad.\n(B) good." in texts[1]
    assert "Which is shorter?" in texts[2]
    got = judge(prompts, first, second, mesh=mesh)
    tok = loaded.tokenizer
    ids = [tok(o, add_special_tokens=False)["input_ids"][0] for o in ("A", "B")]
    logp = []
    for t in texts:
        x = jnp.asarray([tok(t)["input_ids"]])
        z = loaded.model.apply({"params": loaded.params}, x, jnp.ones_like(x))
        logp.append(np.asarray(jax.nn.log_softmax(z[0, -1])[np.array(ids)]))
    logp = np.array(logp).reshape(8, 2, 2, 2)  # pair, principle, order, option
    fwd = 1 / (1 + np.exp(-(logp[:, :, 0, 0] - logp[:, :, 0, 1])))
    bwd = 1 / (1 + np.exp(-(logp[:, :, 1, 1] - logp[:, :, 1, 0])))
    np.testing.assert_allclose(got, (fwd + bwd).mean(axis=1) / 2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(judge(prompts, second, first, mesh=mesh), 1 - got, rtol=1e-4, atol=1e-5)


def _pref_file(tmp_path, probs):
    rows = [{"prompt": "Describe the dog:", "chosen": f" good {i}.", "rejected": " bad.", "chosen_prob": p}
            for i, p in enumerate(probs)]
    path = tmp_path / "soft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_soft_labels_load_and_rm_loss(tiny_llama, tmp_path):
    tok = common.load_tokenizer(str(tiny_llama))
    cfg = DataConfig(path=str(_pref_file(tmp_path, [0.9, 1.0, 0.55, 0.7])), max_seq_len=32, max_prompt_len=16,
                     shuffle=False)
    soft = next(build_data(cfg, tok, task="preference", batch_size=4, soft_labels=True).train)
    hard = next(build_data(cfg, tok, task="preference", batch_size=4).train)  # DPO and the others: plain pairs
    assert isinstance(soft, SoftPreferenceBatch) and isinstance(hard, PreferenceBatch)
    np.testing.assert_allclose(soft.chosen_prob_B, [0.9, 1.0, 0.55, 0.7])
    padded = next(build_data(cfg, tok, task="preference", batch_size=3, soft_labels=True).train)
    assert padded.chosen_prob_B.shape == (3,)
    mesh = common.make_mesh(shd.MeshConfig())
    loaded = common.load_model(common.ModelLoadConfig(path=str(tiny_llama)), mesh=mesh, head="scalar")
    params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(0), x.shape, x.dtype), loaded.params)
    c, r, _ = pair_scores(loaded.model, params, hard)
    (total, pairs), _ = rm_loss(loaded.model, params, soft, None)
    want = soft_bradley_terry_loss(c, r, jnp.asarray(soft.chosen_prob_B))
    np.testing.assert_allclose(float(total), float(want.sum()), rtol=1e-5)
    assert float(pairs) == 4
    ones = SoftPreferenceBatch(soft.pair, np.ones(4, np.float32))  # prob 1 is the Bradley-Terry loss
    np.testing.assert_allclose(float(rm_loss(loaded.model, params, ones, None)[0][0]),
                               float(rm_loss(loaded.model, params, hard, None)[0][0]), rtol=1e-6)


def test_bad_soft_label_names_file_row_and_field(tiny_llama, tmp_path):
    tok = common.load_tokenizer(str(tiny_llama))
    path = _pref_file(tmp_path, [0.9, 1.5])
    with pytest.raises(MalformedRowError, match=r"soft.jsonl: row 1: field 'chosen_prob'"):
        build_data(DataConfig(path=str(path), max_seq_len=32, max_prompt_len=16), tok, task="preference",
                   batch_size=2, soft_labels=True)


@pytest.mark.slow
def test_pairwise_labels_train_a_soft_label_rm(tiny_llama, task_data, tmp_path):
    out = tmp_path / "pairs.jsonl"
    overrides = [f"model.path={tiny_llama}", f"data.path={task_data['prompts_train']}", "data.max_prompt_len=16",
                 f"output_path={out}", "ranker=pairwise_judge", "num_samples=2", "rollout.batch_size=8",
                 "rollout.max_new_tokens=8", "pairwise_judge.principles=['Which is kinder?','Which is shorter?']"]
    res = label.train(cli.load_trainer_config("label", None, overrides))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert res["prompts"] == 32 and res["pairs"] == len(rows) > 16
    for r in rows:
        assert 0.5 <= r["chosen_prob"] <= 1 and r["score_chosen"] == r["chosen_prob"] and r["chosen"] != r["rejected"]
    code = cli.main(["rm", "configs/rm_tiny_cpu.yaml", f"model.path={tiny_llama}", f"data.path={out}",
                     "data.eval_path=null", "data.eval_fraction=0.0", "run.keep_best_metric=null",
                     "optim.warmup_steps=0", "run.total_steps=2", "batch_size=4", f"run.output_dir={tmp_path / 'rm'}",
                     "run.tensorboard=false"])
    assert code == 0 and (tmp_path / "rm" / "model" / "config.json").exists()
