"""Tests for the critic-free family: advantage plug-ins (golden values, masks, jit), DAPO pieces, presets,
dynamic sampling, and (slow) that GRPO / RLOO / REINFORCE++ raise a tiny model's arithmetic accuracy."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
import pytest

from rlhf_jax.config import ConfigError, load_config
from rlhf_jax.data import PromptBatch
from rlhf_jax.algos import critic_free as cf
from rlhf_jax.recipes import grpo
from rlhf_jax.algos.base import Experience, Forward

B, T = 6, 5


def make_exp(score, lengths, *, old=None, ref=None, values=None):
    b = len(score)
    mask = (np.arange(T)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    rng = np.random.default_rng(0)
    old = rng.normal(size=(b, T)).astype(np.float32) * mask if old is None else old
    ref = rng.normal(size=(b, T)).astype(np.float32) * mask if ref is None else ref
    z = np.zeros((b, T), np.float32)
    return Experience(np.ones((b, 2), np.int32), np.ones((b, 2), np.int32), np.ones((b, T), np.int32), mask,
                      jnp.asarray(old), jnp.asarray(ref), jnp.asarray(z if values is None else values),
                      jnp.asarray(z), jnp.asarray(z), jnp.asarray(score, jnp.float32))


SCORE = np.array([1.0, 0.0, 0.0, 2.0, 2.0, 5.0], np.float32)
LENS = np.array([5, 3, 1, 4, 2, 5])


class TestAdvantages:
    @pytest.mark.parametrize("jit", [False, True])
    def test_grpo_group_std(self, jit):
        fn = lambda e, k: cf.grpo_advantages(e, k, group_size=3, scale="group", kl_kind="k3", kl_in_reward=False)  # noqa: E731
        fn = jax.jit(fn) if jit else fn
        exp = make_exp(SCORE, LENS)
        adv, ret, _ = fn(exp, jnp.float32(0.1))
        g = SCORE.reshape(2, 3)
        want = ((g - g.mean(1, keepdims=True)) / (g.std(1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)
        np.testing.assert_allclose(np.asarray(adv), want[:, None] * np.asarray(exp.response_mask_BxT), rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(ret), 0.0)

    def test_grpo_kl_in_reward_uses_sequence_return(self):
        exp = make_exp(SCORE, LENS)
        adv, _, rewards = cf.grpo_advantages(exp, jnp.float32(0.5), group_size=3, scale="none", kl_kind="k1",
                                             kl_in_reward=True)
        m = np.asarray(exp.response_mask_BxT)
        r = SCORE - 0.5 * np.sum((np.asarray(exp.old_logp_BxT) - np.asarray(exp.ref_logp_BxT)) * m, axis=1)
        want = (r.reshape(2, 3) - r.reshape(2, 3).mean(1, keepdims=True)).reshape(-1)
        np.testing.assert_allclose(np.asarray(adv)[:, 0], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(rewards).sum(1), r, rtol=1e-5, atol=1e-6)

    def test_rloo(self):
        exp = make_exp(SCORE, LENS)
        adv, _, _ = cf.rloo_advantages(exp, jnp.float32(0.0), group_size=3, normalize=False, kl_kind="k1",
                                       kl_in_reward=True)
        g = SCORE.reshape(2, 3)
        want = (g - (g.sum(1, keepdims=True) - g) / 2).reshape(-1)
        np.testing.assert_allclose(np.asarray(adv)[:, 0], want, rtol=1e-6)
        assert np.all(np.asarray(adv)[np.asarray(exp.response_mask_BxT) == 0] == 0)

    def test_reinforce_pp_whitens_over_the_batch(self):
        exp = make_exp(SCORE, LENS)
        beta = 0.1
        adv, ret, _ = cf.reinforce_pp_advantages(exp, jnp.float32(beta), gamma=1.0, kl_kind="k1", kl_in_reward=True)
        m = np.asarray(exp.response_mask_BxT).astype(bool)
        kl = (np.asarray(exp.old_logp_BxT) - np.asarray(exp.ref_logp_BxT)) * m
        r = -beta * kl
        r[np.arange(B), LENS - 1] += SCORE
        g = np.flip(np.cumsum(np.flip(r, 1), 1), 1) * m  # reward-to-go
        np.testing.assert_allclose(np.asarray(ret), g, rtol=1e-5, atol=1e-6)
        mu, sd = g[m].mean(), g[m].std(ddof=1)
        np.testing.assert_allclose(np.asarray(adv)[m], (g[m] - mu) / np.sqrt(sd ** 2 + 1e-8), rtol=1e-4, atol=1e-5)
        assert np.all(np.asarray(adv)[~m] == 0)

    def test_reinforce_pp_padding_invariance(self):
        exp = make_exp(SCORE, LENS)
        adv, _, _ = cf.reinforce_pp_advantages(exp, jnp.float32(0.1), gamma=1.0, kl_kind="k1", kl_in_reward=True)
        m = np.asarray(exp.response_mask_BxT)
        garbage = exp._replace(old_logp_BxT=jnp.where(m > 0, exp.old_logp_BxT, 9.0),
                               ref_logp_BxT=jnp.where(m > 0, exp.ref_logp_BxT, -9.0))
        adv2, _, _ = cf.reinforce_pp_advantages(garbage, jnp.float32(0.1), gamma=1.0, kl_kind="k1", kl_in_reward=True)
        np.testing.assert_allclose(np.asarray(adv), np.asarray(adv2), rtol=1e-6)

    def test_remax_subtracts_greedy_baseline(self):
        base = np.array([0.5, 0.5, 1.0, 1.0, 3.0, 3.0], np.float32)
        mask = (np.arange(T)[None] < LENS[:, None]).astype(np.float32)
        exp = make_exp(SCORE, LENS, values=base[:, None] * mask)
        adv, _, _ = cf.remax_advantages(exp, jnp.float32(0.0), kl_kind="k1", kl_in_reward=True)
        np.testing.assert_allclose(np.asarray(adv), (SCORE - base)[:, None] * mask, rtol=1e-6)


def test_zero_advantage_gives_zero_policy_gradient():
    algo = cf.critic_free_algorithm("grpo", cf.CRITIC_FREE_HPARAMS._replace(loss_agg_mode="seq-mean-token-mean"), group_size=3)
    exp = make_exp(np.ones(B, np.float32), LENS)  # equal scores → zero advantages
    exp = exp._replace(advantages_BxT=algo.advantages(exp, jnp.float32(0.0))[0])
    den = algo.denominators(exp)

    def loss(logp):
        return algo.loss(Forward(logp, jnp.zeros_like(logp), None), exp, den, jnp.float32(0.0))[0]

    g = jax.grad(loss)(exp.old_logp_BxT + 0.3)
    np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-7)
    # and a masked token never gets gradient even with non-zero advantages and KL
    exp2 = exp._replace(advantages_BxT=jnp.ones((B, T)) * exp.response_mask_BxT)
    g2 = jax.grad(lambda lp: algo.loss(Forward(lp, jnp.zeros_like(lp), None), exp2, den, jnp.float32(0.1))[0])(
        exp.old_logp_BxT + 0.3)
    assert np.all(np.asarray(g2)[np.asarray(exp.response_mask_BxT) == 0] == 0)
    assert np.any(np.asarray(g2) != 0)


def test_overlong_penalty_golden():
    got = cf.overlong_penalty(jnp.array([0, 6, 7, 8, 9, 10, 11]), max_length=10, cache_length=4)
    np.testing.assert_allclose(np.asarray(got), [0, 0, -0.25, -0.5, -0.75, -1.0, -1.0])
    with pytest.raises(ValueError, match="cache_length"):
        cf.overlong_penalty(jnp.array([1]), max_length=4, cache_length=5)


def test_group_has_variance():
    np.testing.assert_array_equal(cf.group_has_variance(np.array([1, 1, 0, 1, 2, 2]), group_size=2), [False, True, False])
    with pytest.raises(ValueError, match="groups of 4"):
        cf.group_has_variance(np.zeros(6), group_size=4)


class TestPresets:
    def test_dapo(self):
        r = grpo.CriticFreeHyper(preset="dapo").resolve(16)
        assert (r.clip_eps_high, r.loss_agg_mode, r.kl_coef, r.dynamic_sampling, r.overlong_buffer) == \
            (0.28, "token-mean", 0.0, True, 4)

    def test_dr_grpo_and_grpo(self):
        r = grpo.CriticFreeHyper(preset="dr_grpo").resolve(16)
        assert (r.scale, r.loss_agg_mode, r.kl_coef, r.dynamic_sampling) == ("none", "constant", 0.0, False)
        r = grpo.CriticFreeHyper().resolve(16)
        assert (r.scale, r.loss_agg_mode, r.kl_coef, r.kl_kind, r.kl_placement) == \
            ("group", "seq-mean-token-mean", 0.04, "k3", "loss")
        # explicit fields win over the preset
        r = grpo.CriticFreeHyper(preset="dapo", clip_eps_high=0.3, kl_coef=0.01).resolve(16)
        assert (r.clip_eps_high, r.kl_coef) == (0.3, 0.01)

    def test_algorithm_defaults(self):
        assert grpo.CriticFreeHyper(algorithm="rloo").resolve(8).kl_placement == "reward"
        assert grpo.CriticFreeHyper(algorithm="remax", group_size=1).resolve(8).kl_kind == "k1"

    def test_errors_name_the_key(self, tmp_path):
        with pytest.raises(ConfigError, match="algo.preset"):
            grpo.CriticFreeHyper(algorithm="rloo", preset="dapo")
        with pytest.raises(ConfigError, match="algo.group_size"):
            grpo.CriticFreeHyper(algorithm="grpo", group_size=1)
        with pytest.raises(ConfigError, match="algo.algorithm"):
            load_config(grpo.RLOOConfig, None, ("model.path=x", "data.path=y", "algo.algorithm=grpo"))
        with pytest.raises(ConfigError, match="algo.num_minibatches"):
            load_config(grpo.GRPOConfig, None, ("model.path=x", "data.path=y", "algo.num_minibatches=3"))
        assert load_config(grpo.ReMaxConfig, None, ("model.path=x", "data.path=y")).algo.group_size == 1

    @pytest.mark.parametrize("name", ["grpo_tiny_cpu", "grpo_dapo_tiny_cpu", "grpo_dr_tiny_cpu", "rloo_tiny_cpu",
                                      "reinforce_pp_tiny_cpu", "remax_tiny_cpu", "grpo_gsm8k_qwen2_7b_8xh100",
                                      "grpo_gsm8k_tiny_cpu"])
    def test_shipped_configs_load(self, name):
        from rlhf_jax import cli

        import pathlib
        path = pathlib.Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
        algo = name.split("_tiny")[0].split("_gsm8k")[0].replace("grpo_dapo", "grpo").replace("grpo_dr", "grpo")
        cfg = cli.load_trainer_config(algo, str(path))
        assert cfg.algo.algorithm == algo


class FakeSampler:
    """Rollouts are rows of ids (call n: 100·n + row) so the selection can be checked."""

    def __init__(self):
        self.calls = 0

    def __call__(self, params, batch, key, temperature=None, repeats=1):
        from rlhf_jax.rollout.types import Rollout

        self.calls += 1
        b = len(batch.index_B) * repeats  # the distinct prompts, sampled `repeats` times each
        ids = (np.arange(b)[:, None] + 100 * self.calls).astype(np.int32) * np.ones((1, 2), np.int32)
        return Rollout(ids, np.ones((b, 2), np.int32), ids, np.ones((b, 2), np.int32), np.zeros((b, 2), np.float32),
                       np.zeros((b, 2), np.float32), np.full((b,), 2, np.int32))


class FakeScorer:
    """Scores of each call come from a list."""

    def __init__(self, scores, sampler: FakeSampler):
        self.scores, self.sampler = list(scores), sampler

    def __call__(self, ro, index_B):
        from rlhf_jax.online.scoring import Scores

        s = np.asarray(self.scores[self.sampler.calls - 1], np.float32)
        assert len(index_B) == len(s)
        texts = {"prompts": [f"p{i}" for i in range(len(s))],
                 "responses": [f"r{self.sampler.calls}_{i}" for i in range(len(s))], "gold": None}
        return Scores(s, np.zeros_like(s), s, {"reward/x": float(s.mean())}, texts)


def prompt_iter(n):
    while True:
        yield PromptBatch(np.ones((n, 2), np.int32), np.ones((n, 2), np.int32), np.arange(n))


def _collect(scores, *, dynamic, max_tries):
    from rlhf_jax import sharding as shd

    sampler = FakeSampler()
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    return grpo.collect_groups(sampler, FakeScorer(scores, sampler), None, prompt_iter(2), jax.random.key(0),
                               group_size=2, dynamic=dynamic, max_tries=max_tries, mesh=mesh)


def test_dynamic_sampling_drops_zero_variance_groups_and_refills():
    # 2 prompts x G=2 per call: call 1 keeps group 1 only, call 2 keeps group 0 → full after 2 tries
    g = _collect([[1, 1, 0, 1], [0, 1, 3, 3], [9, 9, 9, 9]], dynamic=True, max_tries=4)
    np.testing.assert_array_equal(g.local_score_B, [0, 1, 0, 1])
    np.testing.assert_array_equal(np.asarray(g.score_B), [0, 1, 0, 1])
    assert g.texts["responses"] == ["r1_2", "r1_3", "r2_0", "r2_1"]
    np.testing.assert_array_equal(np.asarray(g.rollout.response_ids_BxT)[:, 0], [102, 103, 200, 201])
    assert g.metrics["dynamic_sampling/tries"] == 2 and g.metrics["dynamic_sampling/filled_groups"] == 0
    assert g.metrics["dynamic_sampling/kept_fraction"] == 0.5


def test_dynamic_sampling_bounded_tries_fill_with_dropped_groups():
    g = _collect([[1, 1, 0, 1], [2, 2, 3, 3]], dynamic=True, max_tries=2)
    np.testing.assert_array_equal(g.local_score_B, [0, 1, 1, 1])  # the kept group, then the first dropped one
    assert g.metrics["dynamic_sampling/tries"] == 2 and g.metrics["dynamic_sampling/filled_groups"] == 1
    g = _collect([[1, 1, 0, 1]], dynamic=False, max_tries=4)
    np.testing.assert_array_equal(g.local_score_B, [1, 1, 0, 1])
    assert "dynamic_sampling/tries" not in g.metrics


# ------------------------------------------------------------------------------------------------ slow
def _helpers():
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent))  # importlib mode: the sibling helper module
    import _sampling_helpers

    return _sampling_helpers


@pytest.mark.slow
def test_grpo_gsm8k_end_to_end_logs_accuracy(tiny_llama, shared_data_dir, tmp_path):
    from rlhf_jax import cli
    from rlhf_jax.train.run import read_jsonl

    cfg = cli.load_trainer_config("grpo", "configs/grpo_gsm8k_tiny_cpu.yaml", (
        f"model.path={tiny_llama}", f"data.path={shared_data_dir / 'gsm8k-test.jsonl'}", "data.max_prompt_len=96",
        "run.total_steps=2", f"run.output_dir={tmp_path}", "rollout.max_new_tokens=8"))
    res = grpo.train(cfg)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert 0.0 <= r["reward/gsm8k_reward"] <= 1.0 and r["gold_score"] == r["reward/gsm8k_reward"]
        assert np.isfinite(r["loss"])
    assert (tmp_path / "model" / "config.json").exists() and res["iterations"] == 2


ARITH_OVERRIDES = ("algo.group_size=8", "algo.num_minibatches=2", "rollout.batch_size=8", "rollout.max_new_tokens=3",
                   "reward.functions=[rlhf_jax.verifiable:arith_reward]",
                   "reward.gold_function=rlhf_jax.verifiable:arith_reward",
                   "run.total_steps=40", "run.log_every=10", "run.tensorboard=false", "data.max_prompt_len=8")


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "reinforce_pp"])
def test_rl_raises_arithmetic_accuracy(tmp_path_factory, tmp_path, algorithm):
    from rlhf_jax import cli, verifiable

    h = _helpers()
    s = h.sft_export(tmp_path_factory.getbasetemp(), "arith")
    prompts = verifiable.arith_prompts(max_operand=4) * 16  # 400 samples: standard error of a rate ~0.025
    before = h.sampled_accuracy(s["model"], s["tokenizer"], prompts, verifiable.arith_reward, max_new_tokens=3)
    # lr 1e-3 for all three: at 2e-3 the outcome moved with float rounding and seeds (GRPO 0.53 / 0.68 / 0.65,
    # RLOO 0.60 / 0.52 / 0.64 for run.seed 0 / 1 / 2); at 1e-3 over the same seeds GRPO gave 0.64 / 0.70 / 0.73,
    # REINFORCE++ 0.65 / 0.67 / 0.68 in 40 iterations, RLOO 0.71 / 0.77 / 0.76 in 60 (0.58 .. 0.69 in 40).
    # Raw RLOO advantages (|A| <= 1, no scaling) learn this task only marginally; batch-normalised RLOO (TRL
    # `normalize_advantages`) learns it reliably.
    extra = ("algo.rloo_normalize=true", "run.total_steps=60") if algorithm == "rloo" else ()
    cfg = cli.load_trainer_config(algorithm, None, (f"model.path={s['model']}", f"data.path={s['prompts']}",
                                                    f"run.output_dir={tmp_path}", *ARITH_OVERRIDES,
                                                    "actor_optim.learning_rate=1e-3", *extra))
    res = grpo.train(cfg)
    after = h.sampled_accuracy((res["model"], res["state"].params), s["tokenizer"], prompts, verifiable.arith_reward,
                               max_new_tokens=3)
    batch_acc = [round(x["gold_score"], 2) for x in res["history"]]
    print(f"{algorithm}: arithmetic exact-match (sampled, T=1) before {before:.3f} -> after {after:.3f}; "
          f"per-iteration batch accuracy {batch_acc}")
    assert after >= before + 0.15


@pytest.mark.slow
@pytest.mark.parametrize("command,config,metric", [
    ("remax", "remax_tiny_cpu", "remax_baseline"),
    ("grpo", "grpo_dapo_tiny_cpu", "dynamic_sampling/tries"),
])
def test_cli_subcommands_run(tiny_llama, task_data, tmp_path, command, config, metric):
    """ReMax (greedy baseline) and the DAPO preset (dynamic sampling, overlong penalty) through the CLI."""
    from rlhf_jax import cli
    from rlhf_jax.train.run import read_jsonl

    code = cli.main([command, f"configs/{config}.yaml", f"model.path={tiny_llama}",
                     f"data.path={task_data['prompts_train']}", "run.total_steps=2", "run.log_every=1",
                     "run.save_every=0", "rollout.batch_size=4", "rollout.max_new_tokens=6", "algo.num_minibatches=1",
                     f"run.output_dir={tmp_path}"])
    assert code == 0
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(records) == 2 and all(metric in r and np.isfinite(r["loss"]) for r in records)
    if command == "grpo":
        assert all(1 <= r["dynamic_sampling/tries"] <= 4 and 0 <= r["dynamic_sampling/filled_groups"] <= 4
                   for r in records)
