"""Tests for the online engine (rlhf_jax.online: experience, update) with PPO's algorithm plugged in."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import ops
from rlhf_jax.data.batches import SFTBatch
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import Transformer, init_params
from rlhf_jax.rollout.types import Rollout
from rlhf_jax.train.state import init_train_state
from rlhf_jax.online import experience as online
from rlhf_jax.online import update as online_update
from rlhf_jax.algos.base import PolicyLossHparams
from rlhf_jax.algos.critic_free import CRITIC_FREE_HPARAMS
from rlhf_jax.algos.critic_free import critic_free_algorithm as _cf_algorithm
from rlhf_jax.algos.ppo import ppo_algorithm as _ppo_algorithm
from rlhf_jax.online import scoring

_ALGO_KEYS = ("gamma", "lam", "whiten_advantages", "use_critic", "group_size", "scale", "rloo_normalize")


def ppo_algorithm(**kw):
    """``algos.ppo.ppo_algorithm`` with the loss hyperparameters given as keywords (test shorthand)."""
    hp = PolicyLossHparams(**{k: v for k, v in kw.items() if k not in _ALGO_KEYS})
    return _ppo_algorithm(hp, **{k: v for k, v in kw.items() if k in _ALGO_KEYS})


def critic_free_algorithm(name, **kw):
    hp = CRITIC_FREE_HPARAMS._replace(**{k: v for k, v in kw.items() if k not in _ALGO_KEYS})
    return _cf_algorithm(name, hp, **{k: v for k, v in kw.items() if k in _ALGO_KEYS})


V, B, P, T = 48, 8, 5, 6


def tiny_config(**kw):
    base = dict(model_type="llama", vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                head_dim=8, intermediate_size=32, max_position_embeddings=64, norm_eps=1e-6, activation="silu")
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()
    actor, critic = Transformer(cfg, head="lm"), Transformer(cfg, head="scalar")
    k = jax.random.split(jax.random.key(0), 4)
    actor_p = init_params(actor, k[0])
    critic_p = init_params(critic, k[1])
    critic_p = jax.tree.map(lambda x: x, critic_p)
    critic_p["score"] = 0.1 * jax.random.normal(k[2], critic_p["score"].shape)
    return actor, critic, actor_p, critic_p


def make_rollout(seed=0, b=B):
    rng = np.random.default_rng(seed)
    plen = rng.integers(1, P + 1, size=b)
    prompt_mask = (np.arange(P)[None] >= P - plen[:, None]).astype(np.int32)
    prompt_ids = rng.integers(1, V, size=(b, P)) * prompt_mask
    rlen = rng.integers(1, T + 1, size=b)
    resp_mask = (np.arange(T)[None] < rlen[:, None]).astype(np.int32)
    resp_ids = rng.integers(1, V, size=(b, T)) * resp_mask
    z = np.zeros((b, T), np.float32)
    return Rollout(jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(prompt_mask), jnp.asarray(resp_ids, jnp.int32),
                   jnp.asarray(resp_mask), jnp.asarray(z), jnp.asarray(z), jnp.asarray(rlen, jnp.int32))


_JITS = {}


def _cached(key, build):
    if key not in _JITS:
        _JITS[key] = build()
    return _JITS[key]


def experience(setup, algo, seed=0, kl_coef=0.05):
    actor, critic, actor_p, critic_p = setup
    models = online.Models(actor=actor, critic=critic)
    ro = make_rollout(seed)
    ev = _cached(("eval", actor), lambda: jax.jit(functools.partial(online.evaluate_rollout, models, temperature=1.0)))(
        actor_p, actor_p, critic_p, ro)
    score = jnp.asarray(np.random.default_rng(seed + 100).normal(size=B), jnp.float32)
    exp, _ = online.make_experience(algo, ro, ev, score, jnp.float32(kl_coef))
    return models, exp


class TestEvaluateRollout:
    def test_padding_invariance_and_masking(self, setup):
        actor, critic, actor_p, critic_p = setup
        models = online.Models(actor=actor, critic=critic)
        ro = make_rollout(1)
        ev = online.evaluate_rollout(models, actor_p, actor_p, critic_p, ro, temperature=1.0)
        np.testing.assert_array_equal(np.asarray(ev.logp_BxT)[np.asarray(ro.response_mask_BxT) == 0], 0.0)
        np.testing.assert_allclose(ev.logp_BxT, ev.ref_logp_BxT)  # same params → same log-probs
        # Row 0 alone, with more left padding and garbage in padded slots, gives the same numbers.
        r0 = jax.tree.map(lambda x: x[:1], ro)
        pad = 3
        garbage = Rollout(
            jnp.concatenate([jnp.full((1, pad), 7, jnp.int32), r0.prompt_ids_BxP], 1),
            jnp.concatenate([jnp.zeros((1, pad), jnp.int32), r0.prompt_mask_BxP], 1),
            jnp.where(r0.response_mask_BxT > 0, r0.response_ids_BxT, 5), r0.response_mask_BxT,
            r0.logp_BxT, r0.sampling_logp_BxT, r0.lengths_B)
        ev0 = online.evaluate_rollout(models, actor_p, actor_p, critic_p, garbage, temperature=1.0)
        np.testing.assert_allclose(ev0.logp_BxT, ev.logp_BxT[:1], atol=1e-5)
        np.testing.assert_allclose(ev0.values_BxT, ev.values_BxT[:1], atol=1e-5)

    def test_logp_matches_manual_forward(self, setup):
        actor, critic, actor_p, critic_p = setup
        ro = make_rollout(2)
        logp, _ = online.policy_forward(actor, actor_p, ro.ids_BxS, ro.mask_BxS, ro.response_ids_BxT,
                                        prompt_length=P, temperature=0.7, with_entropy=False)
        logits = actor.apply({"params": actor_p}, ro.ids_BxS, ro.mask_BxS) / 0.7
        lsm = jax.nn.log_softmax(logits, -1)
        for t in range(T):
            want = lsm[jnp.arange(B), P + t - 1, ro.response_ids_BxT[:, t]]
            np.testing.assert_allclose(logp[:, t], np.where(ro.response_mask_BxT[:, t] > 0, want, 0), atol=1e-5)

    def test_reward_model_scores_last_token(self, setup):
        _, critic, _, critic_p = setup
        ro = make_rollout(3)
        s = scoring.reward_model_scores(critic, critic_p, ro.ids_BxS, ro.mask_BxS)
        full = critic.apply({"params": critic_p}, ro.ids_BxS, ro.mask_BxS)
        last = P + np.asarray(ro.lengths_B) - 1
        np.testing.assert_allclose(s, np.asarray(full)[np.arange(B), last], atol=1e-6)

    def test_has_eos(self):
        ids = jnp.array([[3, 2, 0], [3, 4, 5], [2, 0, 0]])
        mask = jnp.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
        np.testing.assert_array_equal(scoring.has_eos(ids, mask, (2,)), [True, False, False])


def _run_update(setup, algo_kw, exp, *, micro, minibatches=2, epochs=2, ptx=None, ptx_coef=0.0, key=0):
    """One jitted update per distinct configuration (cached: each compile costs seconds on a busy CPU)."""
    actor, critic, actor_p, critic_p = setup
    algo = ppo_algorithm(**algo_kw)
    tx = optax.adam(1e-2)

    def build():
        models = online.Models(actor=actor, critic=critic if algo.use_critic else None)
        upd = online_update.make_update(algo, models, actor_tx=tx, critic_tx=tx if algo.use_critic else None,
                                 settings=online.UpdateSettings(epochs=epochs, num_minibatches=minibatches,
                                                                num_micro_batches=micro, temperature=1.0,
                                                                ptx_coef=ptx_coef))
        return jax.jit(upd)

    fn = _cached(("update", tuple(sorted(algo_kw.items())), micro, minibatches, epochs, ptx is None, ptx_coef), build)
    a = init_train_state(actor_p, tx)
    c = init_train_state(critic_p, tx) if algo.use_critic else None
    return fn(a, c, exp, ptx, jax.random.key(key), jnp.float32(0.05))


class TestUpdate:
    @pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
    def test_micro_batches_do_not_change_the_update(self, setup, mode):
        kw = dict(loss_agg_mode=mode, entropy_coef=0.01)
        _, exp = experience(setup, ppo_algorithm(**kw))
        a1, c1, m1 = _run_update(setup, kw, exp, micro=1)
        a2, c2, m2 = _run_update(setup, kw, exp, micro=2)
        for x, y in zip(jax.tree.leaves((a1.params, c1.params)), jax.tree.leaves((a2.params, c2.params))):
            np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-4)
        assert int(a1.step) == 4 and int(c1.step) == 4  # 2 epochs × 2 minibatches

    def test_first_step_is_on_policy(self, setup):
        _, exp = experience(setup, ppo_algorithm())
        _, _, m = _run_update(setup, {}, exp, micro=1, minibatches=1, epochs=1)
        # one optimizer step on the rollout's own policy: ratio == 1 everywhere
        assert float(m["policy_clipfrac"]) == 0.0
        assert abs(float(m["approx_kl"])) < 1e-6
        assert {"value_loss", "value_clipfrac", "entropy", "critic_grad_norm", "actor_grad_norm"} <= set(m)

    def test_zero_advantage_zero_policy_gradient(self, setup):
        kw = dict(use_critic=False, whiten_advantages=False)
        _, exp = experience(setup, ppo_algorithm(**kw))
        exp = exp._replace(advantages_BxT=jnp.zeros_like(exp.advantages_BxT))
        a, c, m = _run_update(setup, kw, exp, micro=1, minibatches=1, epochs=1)
        assert c is None and float(m["actor_grad_norm"]) == 0.0
        for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(setup[2])):
            np.testing.assert_array_equal(x, y)

    def test_ptx_term_changes_update_and_reports_loss(self, setup):
        _, exp = experience(setup, ppo_algorithm())
        rng = np.random.default_rng(0)
        ids = jnp.asarray(rng.integers(1, V, size=(4, 9)), jnp.int32)
        ones = jnp.ones_like(ids)
        ptx = SFTBatch(ids, ones, ones, jnp.broadcast_to(jnp.arange(9), ids.shape), ones)
        a0, _, _ = _run_update(setup, {}, exp, micro=2, ptx=None)
        a1, _, m1 = _run_update(setup, {}, exp, micro=2, ptx=ptx, ptx_coef=1.0)
        a2, _, m2 = _run_update(setup, {}, exp, micro=1, ptx=ptx, ptx_coef=1.0)
        assert float(m1["ptx_loss"]) > 0
        np.testing.assert_allclose(m1["ptx_loss"], m2["ptx_loss"], rtol=1e-5)
        diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a0.params), jax.tree.leaves(a1.params)))
        assert diff > 1e-5
        for x, y in zip(jax.tree.leaves(a1.params), jax.tree.leaves(a2.params)):
            np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-4)

    def test_nan_guard_skips_update(self, setup):
        _, exp = experience(setup, ppo_algorithm())
        exp = exp._replace(advantages_BxT=exp.advantages_BxT.at[0, 0].set(jnp.nan))
        a, c, m = _run_update(setup, {}, exp, micro=1, minibatches=1, epochs=1)
        assert float(m["finite"]) == 0.0 and int(a.num_skipped) == 1
        for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(setup[2])):
            np.testing.assert_array_equal(x, y)

    def test_one_trace_across_iterations(self, setup):
        actor, critic, actor_p, critic_p = setup
        algo = ppo_algorithm()
        traces = []
        models = online.Models(actor=actor, critic=critic)
        tx = optax.adam(1e-3)
        upd = online_update.make_update(algo, models, actor_tx=tx, critic_tx=tx,
                                 settings=online.UpdateSettings(epochs=1, num_minibatches=2, num_micro_batches=1,
                                                                temperature=1.0))

        def counted(*args):
            traces.append(1)
            return upd(*args)

        f = jax.jit(counted)
        a, c = init_train_state(actor_p, tx), init_train_state(critic_p, tx)
        for i in range(3):
            _, exp = experience(setup, algo, seed=i)
            a, c, _ = f(a, c, exp, None, jax.random.key(i), jnp.float32(0.1 * i))
        assert len(traces) == 1


class TestPPOAdvantages:
    def test_golden_against_python_loop(self, setup):
        algo = ppo_algorithm(gamma=0.9, lam=0.8, whiten_advantages=False, kl_kind="k1")
        _, exp = experience(setup, algo, kl_coef=0.3)
        m = np.asarray(exp.response_mask_BxT)
        lp, rl = np.asarray(exp.old_logp_BxT), np.asarray(exp.ref_logp_BxT)
        v, s = np.asarray(exp.old_values_BxT), np.asarray(exp.score_B)
        for b in range(B):
            n = int(m[b].sum())
            r = -0.3 * (lp[b, :n] - rl[b, :n])
            r[n - 1] += s[b]
            adv, nxt_v, nxt_a = np.zeros(n), 0.0, 0.0
            for t in reversed(range(n)):
                nxt_a = r[t] + 0.9 * nxt_v - v[b, t] + 0.9 * 0.8 * nxt_a
                adv[t], nxt_v = nxt_a, v[b, t]
            np.testing.assert_allclose(exp.advantages_BxT[b, :n], adv, atol=1e-5)
            np.testing.assert_allclose(exp.returns_BxT[b, :n], adv + v[b, :n], atol=1e-5)
            np.testing.assert_array_equal(exp.advantages_BxT[b, n:], 0)

    def test_whitened(self, setup):
        algo = ppo_algorithm()
        _, exp = experience(setup, algo)
        m = exp.response_mask_BxT
        assert abs(float(ops.masked_mean(exp.advantages_BxT, m))) < 1e-5
        assert abs(float(ops.masked_var(exp.advantages_BxT, m)) - 1) < 1e-3

    def test_kl_in_loss_leaves_rewards_unshaped(self, setup):
        algo = ppo_algorithm(kl_placement="loss", kl_kind="k3")
        actor, critic, actor_p, critic_p = setup
        models = online.Models(actor=actor, critic=critic)
        ro = make_rollout(0)
        ev = online.evaluate_rollout(models, actor_p, jax.tree.map(lambda x: x * 1.1, actor_p), critic_p, ro,
                                     temperature=1.0)
        score = jnp.ones(B)
        _, rewards = online.make_experience(algo, ro, ev, score, jnp.float32(0.5))
        np.testing.assert_allclose(jnp.sum(rewards, -1), score, atol=1e-6)
        with pytest.raises(ValueError, match="kl_placement"):
            ppo_algorithm(kl_placement="both")


class TestFusedCriticAndRolloutLogp:
    """The two passes the PPO iteration may skip give the same experience and the same update."""

    def test_old_logp_from_rollout_equals_recompute(self, setup):
        actor, critic, actor_p, critic_p = setup
        models = online.Models(actor=actor, critic=critic)
        ro = make_rollout(4)
        full = online.evaluate_rollout(models, actor_p, actor_p, critic_p, ro, temperature=1.0)
        ro = ro._replace(logp_BxT=jnp.where(ro.response_mask_BxT > 0, full.logp_BxT + 0.0, 123.0))  # junk on pads
        ev = online.evaluate_rollout(models, actor_p, actor_p, critic_p, ro, temperature=1.0,
                                     old_logp="rollout", with_values=False)
        np.testing.assert_array_equal(ev.logp_BxT, full.logp_BxT)  # taken from the rollout, padding zeroed
        np.testing.assert_array_equal(ev.ref_logp_BxT, full.ref_logp_BxT)
        np.testing.assert_array_equal(ev.values_BxT, 0.0)
        with pytest.raises(ValueError, match="old_logp"):
            online.evaluate_rollout(models, actor_p, actor_p, critic_p, ro, temperature=1.0, old_logp="x")

    def test_head_span_and_head_positions_equal_slicing_full_logits(self, setup):
        actor, _, actor_p, _ = setup
        ro = make_rollout(5)
        full = actor.apply({"params": actor_p}, ro.ids_BxS, ro.mask_BxS)
        span = actor.apply({"params": actor_p}, ro.ids_BxS, ro.mask_BxS, head_span=(P - 1, P + T - 1))
        assert span.shape == (B, T, V)
        np.testing.assert_allclose(span, full[:, P - 1 : -1], atol=1e-6)
        pos = jnp.asarray(np.random.default_rng(0).integers(0, P + T, size=(B, 3)), jnp.int32)  # per-row positions
        rows = actor.apply({"params": actor_p}, ro.ids_BxS, ro.mask_BxS, head_positions_BxW=pos)
        np.testing.assert_allclose(rows, jnp.take_along_axis(full, pos[..., None], axis=1), atol=1e-6)
        for bad in (0, P + T):
            with pytest.raises(ValueError, match="prompt_length"):
                online.policy_forward(actor, actor_p, ro.ids_BxS, ro.mask_BxS, ro.response_ids_BxT, prompt_length=bad,
                                      temperature=1.0, with_entropy=False)
        with pytest.raises(ValueError, match="not both"):
            actor.apply({"params": actor_p}, ro.ids_BxS, ro.mask_BxS, head_span=(0, 2), head_positions_BxW=pos)

    @pytest.mark.parametrize("whiten,micro", [(True, 1), (False, 1), (True, 2), (False, 4)])
    def test_fused_values_give_the_separate_pass_update(self, setup, whiten, micro):
        """The fused update (critic phase over the micro-batches, then the actor phase) equals one joint
        step over the whole batch after a separate values pass, with PPO-ptx in the actor's loss."""
        actor, critic, actor_p, critic_p = setup
        kw = dict(whiten_advantages=whiten, entropy_coef=0.01)
        algo = ppo_algorithm(**kw)
        models = online.Models(actor=actor, critic=critic)
        ro = make_rollout(6)
        score = jnp.asarray(np.random.default_rng(7).normal(size=B), jnp.float32)
        kl = jnp.float32(0.05)
        ev_sep = online.evaluate_rollout(models, actor_p, actor_p, critic_p, ro, temperature=1.0)
        ev_fus = online.evaluate_rollout(models, actor_p, actor_p, critic_p, ro, temperature=1.0,
                                         with_values=False)
        exp_sep, _ = online.make_experience(algo, ro, ev_sep, score, kl)
        exp_fus, _ = online.make_experience(algo, ro, ev_fus, score, kl)
        ids = jnp.asarray(np.random.default_rng(1).integers(1, V, size=(4, 9)), jnp.int32)
        ones = jnp.ones_like(ids)
        ptx = SFTBatch(ids, ones, ones, jnp.broadcast_to(jnp.arange(9), ids.shape), ones)
        tx = optax.sgd(0.1)  # plain SGD: Adam's first step would amplify rounding in near-zero gradients
        out = {}
        for name, exp, fused, m in (("sep", exp_sep, False, 1), ("fus", exp_fus, True, micro)):
            upd = online_update.make_update(algo, models, actor_tx=tx, critic_tx=tx, settings=online.UpdateSettings(
                epochs=1, num_minibatches=1, num_micro_batches=m, temperature=1.0, ptx_coef=0.5, fused_values=fused))
            out[name] = jax.jit(upd)(init_train_state(actor_p, tx), init_train_state(critic_p, tx), exp, ptx,
                                     jax.random.key(0), kl)
        (a1, c1, m1), (a2, c2, m2) = out["sep"], out["fus"]
        for x, y in zip(jax.tree.leaves((a1.params, c1.params)), jax.tree.leaves((a2.params, c2.params))):
            np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5)
        assert m1.keys() == m2.keys() - {"advantages_mean", "returns_mean", "values_mean", "explained_variance"}
        for k in m1:
            np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-7, err_msg=k)
        m = exp_sep.response_mask_BxT
        np.testing.assert_allclose(m2["values_mean"], ops.masked_mean(exp_sep.old_values_BxT, m), rtol=1e-5)
        np.testing.assert_allclose(m2["explained_variance"],
                                   ops.explained_variance(exp_sep.old_values_BxT, exp_sep.returns_BxT, m),
                                   rtol=1e-4, atol=1e-6)

    def test_fused_values_rejects_multi_step_updates(self, setup):
        actor, critic, _, _ = setup
        tx = optax.adam(1e-2)
        with pytest.raises(ValueError, match="fused_values"):
            online_update.make_update(ppo_algorithm(), online.Models(actor=actor, critic=critic), actor_tx=tx,
                                      critic_tx=tx, settings=online.UpdateSettings(
                                          epochs=2, num_minibatches=1, num_micro_batches=1, temperature=1.0,
                                          fused_values=True))


def grouped_rollout(seed, *, groups, group_size):
    """`groups` left-padded prompts, each repeated `group_size` times (np.repeat order), distinct responses."""
    ro = make_rollout(seed, b=groups * group_size)
    rep = lambda x: jnp.repeat(x[::group_size], group_size, axis=0)  # noqa: E731
    return ro._replace(prompt_ids_BxP=rep(ro.prompt_ids_BxP), prompt_mask_BxP=rep(ro.prompt_mask_BxP))


class TestSharedPromptForward:
    """Each group's prompt encoded once (GRPO/RLOO groups) gives the per-row forward's numbers."""

    @pytest.mark.parametrize("family", [dict(model_type="llama"), dict(model_type="mistral", sliding_window=3),
                                        dict(model_type="gpt2", activation="gelu_new", norm_eps=1e-5)])
    def test_logits_and_gradients_equal_the_per_row_forward(self, family):
        actor = Transformer(tiny_config(**family), head="lm")
        params = init_params(actor, jax.random.key(3))
        ro = grouped_rollout(11, groups=3, group_size=4)
        assert not np.all(np.asarray(ro.prompt_mask_BxP))  # left padding is exercised
        assert not np.all(np.asarray(ro.response_mask_BxT))  # so is response padding
        full = actor.apply({"params": params}, ro.ids_BxS, ro.mask_BxS, head_span=(P - 1, P + T - 1))
        shared = online.shared_prompt_logits(actor, params, ro.ids_BxS, ro.mask_BxS, prompt_length=P, repeats=4)
        assert shared.shape == full.shape == (12, T, V)
        m = np.asarray(ro.response_mask_BxT, bool)
        np.testing.assert_allclose(np.asarray(shared)[m], np.asarray(full)[m], atol=1e-5)

        def loss(p, repeats):
            logp, _ = online.policy_forward(actor, p, ro.ids_BxS, ro.mask_BxS, ro.response_ids_BxT, prompt_length=P,
                                            temperature=0.7, with_entropy=False, prompt_repeats=repeats)
            return jnp.sum(logp * jnp.arange(1, T + 1))  # position-dependent weights

        g_row, g_shared = jax.grad(loss)(params, 1), jax.jit(jax.grad(loss), static_argnums=1)(params, 4)
        for a, b in zip(jax.tree.leaves(g_row), jax.tree.leaves(g_shared)):
            np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4)

    def test_rejects_a_batch_that_is_not_whole_groups(self, setup):
        actor, _, actor_p, _ = setup
        ro = make_rollout(1, b=6)
        with pytest.raises(ValueError, match="groups of 4"):
            online.shared_prompt_logits(actor, actor_p, ro.ids_BxS, ro.mask_BxS, prompt_length=P, repeats=4)

    def test_one_token_prompts_and_the_prompt_length_check(self, setup):
        actor, _, actor_p, _ = setup
        ro = grouped_rollout(5, groups=2, group_size=4)
        ids, mask = ro.ids_BxS[:, P - 1:], ro.mask_BxS[:, P - 1:]  # the prompt is its last token only
        full = actor.apply({"params": actor_p}, ids, mask, head_span=(0, T))
        shared = online.shared_prompt_logits(actor, actor_p, ids, mask, prompt_length=1, repeats=4)
        m = np.asarray(ro.response_mask_BxT, bool)
        np.testing.assert_allclose(np.asarray(shared)[m], np.asarray(full)[m], atol=1e-5)
        for bad in (0, T + 1):
            with pytest.raises(ValueError, match=f"prompt_length {bad} must lie in"):
                online.shared_prompt_logits(actor, actor_p, ids, mask, prompt_length=bad, repeats=4)

    def test_the_head_runs_once_over_the_continuations(self, setup):
        """The logits at the last prompt slot come out of the continuations' head product: the compiled
        program builds no ``[B, T, V]`` concatenation (a copy of every logit)."""
        actor, _, actor_p, _ = setup
        ro = grouped_rollout(5, groups=2, group_size=4)
        fn = jax.jit(lambda p, i, m: online.shared_prompt_logits(actor, p, i, m, prompt_length=P, repeats=4))
        hlo = fn.lower(actor_p, ro.ids_BxS, ro.mask_BxS).compile().as_text()
        assert re.search(rf"= f32\[8,{T},{V}\]", hlo)  # the logits are there
        assert not re.findall(rf"%\S*concatenate\S* = f32\[8,{T},{V}\]", hlo)

    def test_grpo_update_and_evaluation_equal_the_per_row_ones(self, setup):

        actor, _, actor_p, _ = setup
        models = online.Models(actor=actor)
        algo = critic_free_algorithm("grpo", group_size=4, kl_kind="k3", kl_placement="loss")
        ro = grouped_rollout(12, groups=2, group_size=4)
        ref_p = jax.tree.map(lambda x: x * 1.05, actor_p)
        score = jnp.asarray(np.random.default_rng(5).normal(size=8), jnp.float32)
        tx = optax.sgd(0.1)
        out = {}
        for repeats in (1, 4):
            ev = online.evaluate_rollout(models, actor_p, ref_p, None, ro, temperature=1.0, with_values=False,
                                         prompt_repeats=repeats)
            exp, _ = online.make_experience(algo, ro, ev, score, jnp.float32(0.04))
            upd = online_update.make_update(algo, models, actor_tx=tx, critic_tx=None, settings=online.UpdateSettings(
                epochs=1, num_minibatches=1, num_micro_batches=2, temperature=1.0, prompt_repeats=repeats))
            out[repeats] = ev, jax.jit(upd)(init_train_state(actor_p, tx), None, exp, None, jax.random.key(0),
                                            jnp.float32(0.04))
        (ev1, (a1, _, m1)), (ev4, (a4, _, m4)) = out[1], out[4]
        np.testing.assert_allclose(ev4.logp_BxT, ev1.logp_BxT, atol=1e-5)
        np.testing.assert_allclose(ev4.ref_logp_BxT, ev1.ref_logp_BxT, atol=1e-5)
        for x, y in zip(jax.tree.leaves(a1.params), jax.tree.leaves(a4.params)):
            np.testing.assert_allclose(y, x, atol=1e-6, rtol=1e-5)
        for k in ("loss", "policy_loss", "kl"):
            if k in m1:
                np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, atol=1e-7)

    def test_sharing_needs_intact_groups(self, setup):
        actor, _, _, _ = setup

        with pytest.raises(ValueError, match="num_minibatches must be 1"):
            online_update.make_update(critic_free_algorithm("grpo", group_size=4), online.Models(actor=actor),
                               actor_tx=optax.sgd(0.1), critic_tx=None, settings=online.UpdateSettings(
                                   epochs=1, num_minibatches=2, num_micro_batches=1, temperature=1.0,
                                   prompt_repeats=4))
        allowed = functools.partial(online.prompt_sharing_allowed, group_size=4, num_minibatches=1)
        assert allowed(batch_size=32, num_micro_batches=2)
        assert not allowed(batch_size=32, num_micro_batches=16)  # micro-batches of 2 rows split the groups
        assert not allowed(batch_size=32, num_micro_batches=1, batch_divisor=3)  # 8 prompts over 3 shards
        assert not online.prompt_sharing_allowed(batch_size=32, group_size=4, num_minibatches=2, num_micro_batches=1)
        assert not online.prompt_sharing_allowed(batch_size=32, group_size=1, num_minibatches=1, num_micro_batches=1)
