"""`rlhf-jax ilql`: data (rewards as trlx's make_experience), the decoding model in the jitted sampler, target
syncs, checkpoint/resume with the heads, export of the LM, bad input."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, tasks
from rlhf_jax.algos import ilql as algo
from rlhf_jax.data import DataConfig, load_encoded
from rlhf_jax.data.ilql import ilql_iterator, token_rewards
from rlhf_jax.online.sampler import eos_and_pad
from rlhf_jax.recipes import REGISTRY, load_trainer_config, recipe
from rlhf_jax.rollout import generate
from rlhf_jax.train.run import load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rows_path(tmp_path_factory) -> pathlib.Path:
    rows = tasks.sft_rows(48, seed=3)
    for r in rows:
        r["reward"] = tasks.response_score(r["completion"])
    return tasks.write_jsonl(tmp_path_factory.mktemp("ilql") / "rows.jsonl", rows)


def _cfg(tiny_llama, rows_path, out, task_data, *extra):
    return load_trainer_config("ilql", str(ROOT / "configs" / "ilql_tiny_cpu.yaml"), [
        f"model.path={tiny_llama}", f"data.path={rows_path}", f"eval.prompts={task_data['prompts_eval']}",
        "eval.batch_size=16", "batch_size=8", "run.total_steps=4", "run.log_every=1", "run.eval_every=0",
        "run.save_every=2", f"run.output_dir={out}", "run.progress=off", "optim.warmup_steps=1",
        "gen_kwargs.max_new_tokens=6", *extra])


def test_registered():
    assert REGISTRY["ilql"][0] == "rlhf_jax.recipes.ilql"


def test_rewards_like_trlx_make_experience(tiny_llama, rows_path, tmp_path):
    """Scalar rewards: standardised with torch's unbiased std, on the last completion token; per-token lists
    used as given; a batch puts state t at position P − 1 + t (prompts left-, completions right-padded)."""
    tok = load_tokenizer(str(tiny_llama))
    cfg = DataConfig(path=str(rows_path), max_prompt_len=16, max_completion_len=24, max_seq_len=40)
    data = load_encoded(cfg, tok, task="sft")
    raw = np.asarray([json.loads(ln)["reward"] for ln in rows_path.read_text().splitlines()])
    got = token_rewards(data, reward_field="reward", rewards_field="rewards", normalize=True)
    want = (raw - raw.mean()) / (raw.std(ddof=1) + np.finfo(np.float64).eps)
    np.testing.assert_allclose([r[-1] for r in got], want, rtol=1e-5)
    assert all(np.all(r[:-1] == 0) for r in got)
    it = ilql_iterator(data, cfg, batch_size=4, pad_id=0)
    b = next(it)
    assert b.prompt_ids_BxP.shape == (4, 16) and b.response_ids_BxT.shape == (4, 24)
    assert np.all(b.prompt_mask_BxP[:, -1] == 1) and np.all(b.response_mask_BxT[:, 0] == 1)
    n = b.response_mask_BxT.sum(1)
    np.testing.assert_allclose(b.rewards_BxT[np.arange(4), n - 1], np.concatenate(
        [got[i] for i in it.host_items(0, 0)])[np.cumsum([len(got[i]) for i in it.host_items(0, 0)]) - 1])
    # per-token rewards
    per = [{"prompt": "Describe the dog:", "completion": " good", "rewards": [0.5, 2.0]}]
    path = tasks.write_jsonl(tmp_path / "per.jsonl", per)
    d2 = load_encoded(DataConfig(path=str(path)), tok, task="sft")
    n_tok = len(d2.completion_ids[0][0])
    per[0]["rewards"] = [float(i) for i in range(n_tok)]
    tasks.write_jsonl(path, per)
    d2 = load_encoded(DataConfig(path=str(path)), tok, task="sft")
    r = token_rewards(d2, reward_field="reward", rewards_field="rewards", normalize=True)
    np.testing.assert_array_equal(r[0], np.arange(n_tok, dtype=np.float32))


def test_bad_rewards_name_file_row_field(tiny_llama, tmp_path):
    tok = load_tokenizer(str(tiny_llama))
    path = tasks.write_jsonl(tmp_path / "none.jsonl", [{"prompt": "a", "completion": " b"}])
    with pytest.raises(ValueError, match=r"none\.jsonl: ILQL rows need a 'reward' column"):
        token_rewards(load_encoded(DataConfig(path=str(path)), tok, task="sft"), reward_field="reward",
                      rewards_field="rewards", normalize=True)
    path = tasks.write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": " b", "reward": 1.0},
                                                      {"prompt": "a", "completion": " b", "reward": "high"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 1: field 'reward': expected a finite number"):
        token_rewards(load_encoded(DataConfig(path=str(path)), tok, task="sft"), reward_field="reward",
                      rewards_field="rewards", normalize=True)
    path = tasks.write_jsonl(tmp_path / "short.jsonl", [{"prompt": "a", "completion": " b c d", "rewards": [1.0]}])
    with pytest.raises(ValueError, match=r"short\.jsonl: row 0: field 'rewards': 1 rewards for"):
        token_rewards(load_encoded(DataConfig(path=str(path)), tok, task="sft"), reward_field="reward",
                      rewards_field="rewards", normalize=True)


def test_config_errors(tiny_llama, rows_path, tmp_path, task_data):
    with pytest.raises(ValueError, match="ilql.tau"):
        _cfg(tiny_llama, rows_path, tmp_path, task_data, "ilql.tau=1.0")
    with pytest.raises(ValueError, match="eval.gold_function"):
        _cfg(tiny_llama, rows_path, tmp_path, task_data, "eval.gold_function=null")


def test_policy_in_sampler(tiny_llama):
    """ILQLPolicy in `rollout.generate`: β = 0 decodes the LM's own greedy tokens; with β > 0 the sampler's
    log-probs are log_softmax of log_softmax(z) + β(min Q̂ − V) from a teacher-forced forward."""
    lm, lm_params = models.load_pretrained(str(tiny_llama))
    tok = load_tokenizer(str(tiny_llama))
    heads = algo.init_heads(lm.config, jax.random.key(1), two_qs=True)
    heads = jax.tree.map(lambda x: x * 30.0, models_unbox(heads))  # large Q/V so β visibly changes the argmax
    params = {"lm": lm_params, "heads": heads}
    eos, pad = eos_and_pad(lm, tok)
    ids = np.array([[pad, 5, 9, 11], [7, 8, 9, 10]], np.int32)
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]], np.int32)
    kw = dict(key=jax.random.key(0), max_new_tokens=6, eos_token_id=eos, pad_token_id=pad)
    plain = generate(lm, lm_params, ids, mask, temperature=0.0, **kw)
    beta0 = generate(algo.ILQLPolicy(lm.config, beta=0.0), params, ids, mask, temperature=0.0, **kw)
    np.testing.assert_array_equal(np.asarray(beta0.response_ids_BxT), np.asarray(plain.response_ids_BxT))
    policy = algo.ILQLPolicy(lm.config, beta=2.0)
    ro = generate(policy, params, ids, mask, temperature=1.0, top_k=5, **kw)
    scores = policy.apply({"params": params}, ro.ids_BxS, ro.mask_BxS)[:, 3:-1]
    want = jax.nn.log_softmax(scores, -1)
    want = jnp.take_along_axis(want, ro.response_ids_BxT[..., None], -1)[..., 0] * ro.response_mask_BxT
    np.testing.assert_allclose(np.asarray(ro.logp_BxT), np.asarray(want), rtol=1e-4, atol=1e-4)
    greedy = generate(policy, params, ids, mask, temperature=0.0, **kw)
    assert not np.array_equal(np.asarray(greedy.response_ids_BxT), np.asarray(plain.response_ids_BxT))


def models_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def test_sync_targets():
    q = {"w": jnp.array([1.0, 2.0])}
    before = {"q_0": q, "target_q_0": {"w": jnp.array([0.0, 0.0])}}
    after = {"q_0": {"w": jnp.array([2.0, 4.0])}, "target_q_0": {"w": jnp.array([9.0, 9.0])}}  # optimizer drift
    kept = algo.sync_targets(after, before, alpha=0.5, sync=False)
    np.testing.assert_allclose(np.asarray(kept["target_q_0"]["w"]), [0.0, 0.0])
    moved = algo.sync_targets(after, before, alpha=0.5, sync=jnp.array(True))
    np.testing.assert_allclose(np.asarray(moved["target_q_0"]["w"]), [1.0, 2.0])


def _heads_at(directory: pathlib.Path, step: int):
    """The head params of a checkpoint, read raw (numpy) from its Orbax `state` item."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(str(directory / str(step) / "state"))["params"]["heads"]


@pytest.mark.slow
def test_train_resume_export_and_heads(tiny_llama, rows_path, task_data, tmp_path):
    """4 steps straight = 2 steps, stop, resume to 4 (heads restored from the checkpoint); alpha = 1 with a
    sync every step leaves each target head equal to its Q head; the LM is exported; eval metrics logged."""
    ilql = recipe("ilql")
    extra = ("ilql.alpha=1.0", "ilql.steps_for_target_q_sync=1")
    straight = ilql.train(_cfg(tiny_llama, rows_path, tmp_path / "a", task_data, *extra))
    ilql.train(_cfg(tiny_llama, rows_path, tmp_path / "b", task_data, *extra), stop_at_step=2)
    resumed = ilql.train(_cfg(tiny_llama, rows_path, tmp_path / "b", task_data, *extra, "run.resume=auto"))
    assert resumed["steps"] == straight["steps"] == 4
    for k in ("train/loss", "train/loss_q", "train/loss_v", "train/loss_cql", "train/loss_awac", "eval/gold_score",
              "eval/gold_score_sampled"):
        assert resumed[k] == pytest.approx(straight[k], rel=1e-5, abs=1e-6), k
        assert np.isfinite(straight[k])
    assert "eval/gold_score_beta0" in straight and "eval/gold_score_sampled" in straight
    heads = _heads_at(tmp_path / "a" / "checkpoints", 4)
    for name in ("q_0", "q_1"):
        for a, b in zip(jax.tree.leaves(heads[name]), jax.tree.leaves(heads["target_" + name])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    exported, _ = models.load_pretrained(straight["export_dir"])
    assert exported.config.vocab_size > 0


@pytest.mark.slow
def test_targets_follow_slowly(tiny_llama, rows_path, task_data, tmp_path):
    """Default alpha (0.001), a sync every 2 steps: the target heads move only at step 2, by alpha of the way
    from their previous value to the Q head's."""
    ilql = recipe("ilql")
    ilql.train(_cfg(tiny_llama, rows_path, tmp_path / "a", task_data, "ilql.steps_for_target_q_sync=2",
                    "run.save_every=1", "run.keep_last_n=10", "run.total_steps=3"))
    h = {s: _heads_at(tmp_path / "a" / "checkpoints", s) for s in (1, 2, 3)}
    w = lambda s, n: np.asarray(h[s][n]["w2"])  # noqa: E731
    # step 1 (lr 0 at step 0: warmup) leaves Q at its init, and the target is its copy (trlx deepcopy);
    # step 2 moves Q and syncs the target 0.1 % of the way; step 3 moves Q again but not the target
    np.testing.assert_array_equal(w(1, "q_0"), w(1, "target_q_0"))
    assert not np.allclose(w(2, "q_0"), w(1, "q_0")) and not np.allclose(w(3, "q_0"), w(2, "q_0"))
    np.testing.assert_array_equal(w(2, "target_q_0"), w(3, "target_q_0"))
    expected = 0.001 * w(2, "q_0") + 0.999 * w(1, "target_q_0")
    np.testing.assert_allclose(w(2, "target_q_0"), expected, rtol=1e-5, atol=1e-7)
