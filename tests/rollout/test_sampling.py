"""Tests for rlhf_jax/rollout/sampling.py: filters against numpy / Hugging Face oracles, draw frequencies,
the log-prob convention."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.rollout import sampling


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


class TestTopK:
    @pytest.mark.parametrize("jit", [False, True])
    def test_golden(self, jit):
        f = lambda z: sampling.apply_top_k(z, top_k=2)  # noqa: E731
        f = jax.jit(f) if jit else f
        out = f(jnp.array([[1.0, 5.0, 3.0, 2.0], [0.0, -1.0, -2.0, 4.0]]))
        np.testing.assert_array_equal(out, [[-np.inf, 5, 3, -np.inf], [0, -np.inf, -np.inf, 4]])

    def test_ties_with_kth_are_kept(self):
        out = sampling.apply_top_k(jnp.array([[1.0, 2.0, 2.0, 0.0]]), top_k=2)
        np.testing.assert_array_equal(out, [[-np.inf, 2, 2, -np.inf]])

    def test_k_larger_than_vocab_keeps_all(self):
        z = jnp.array([[1.0, 2.0, 3.0]])
        np.testing.assert_array_equal(sampling.apply_top_k(z, top_k=10), z)

    def test_bad_k(self):
        with pytest.raises(ValueError, match="top_k"):
            sampling.apply_top_k(jnp.zeros((1, 3)), top_k=0)


class TestTopP:
    def test_golden(self):
        z = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
        # sorted: 0.5 (mass before 0) keep, 0.3 (0.5 < 0.7) keep, 0.15 (0.8) drop, 0.05 drop
        out = sampling.apply_top_p(z, top_p=0.7)
        np.testing.assert_array_equal(np.isfinite(out), [[False, True, False, True]])
        np.testing.assert_allclose(out[0, [1, 3]], z[0, [1, 3]])

    def test_top_token_always_kept(self):
        out = sampling.apply_top_p(jnp.array([[0.0, 10.0, 1.0]]), top_p=1e-6)
        np.testing.assert_array_equal(np.isfinite(out), [[False, True, False]])

    @pytest.mark.parametrize("top_p", [0.3, 0.8, 0.95])
    def test_matches_hugging_face(self, top_p):
        torch = pytest.importorskip("torch")
        from transformers.generation.logits_process import TopPLogitsWarper

        z = np.random.default_rng(0).normal(size=(6, 50)).astype(np.float32) * 2
        ours = np.asarray(jax.jit(lambda x: sampling.apply_top_p(x, top_p=top_p))(jnp.asarray(z)))
        hf = TopPLogitsWarper(top_p)(None, torch.from_numpy(z.copy())).numpy()
        np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(hf))


def test_suppress_tokens_per_row():
    z = jnp.zeros((2, 4))
    out = sampling.suppress_tokens(z, (1, 3), jnp.array([True, False]))
    np.testing.assert_array_equal(out, [[0, -np.inf, 0, -np.inf], [0, 0, 0, 0]])


class TestInverseCdf:
    def test_frequencies_match_softmax(self):
        probs = np.array([0.1, 0.0, 0.45, 0.05, 0.4])
        n = 40000
        z = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (n, 5))
        tok = np.asarray(jax.jit(sampling.inverse_cdf_sample)(jax.random.key(0), z))
        freq = np.bincount(tok, minlength=5) / n
        assert freq[1] == 0  # probability-0 token never drawn
        np.testing.assert_allclose(freq, probs, atol=4 * np.sqrt(0.25 / n))

    def test_never_draws_masked_last_token(self):
        z = jnp.broadcast_to(jnp.array([0.0, 0.0, -jnp.inf]), (5000, 3))
        tok = np.asarray(sampling.inverse_cdf_sample(jax.random.key(3), z))
        assert set(np.unique(tok)) == {0, 1}

    def test_deterministic_per_key(self):
        z = jax.random.normal(jax.random.key(1), (8, 100))
        a = sampling.inverse_cdf_sample(jax.random.key(5), z)
        b = sampling.inverse_cdf_sample(jax.random.key(5), z)
        c = sampling.inverse_cdf_sample(jax.random.key(6), z)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, c)


    @pytest.mark.parametrize("block", [1, 3, 7, 128])
    def test_two_levels_equal_the_full_running_sum(self, block):
        """The block-then-token draw picks y = #{i : F_i ≤ u·F_V} of the one running sum over V (float64 oracle
        with the same uniform), including blocks that do not divide V (padding never drawn)."""
        V = 50
        z = jax.random.normal(jax.random.key(2), (256, V)) * 2
        z = z.at[:, 10:20].set(-jnp.inf)  # a run of zero-probability tokens inside and across blocks
        key = jax.random.key(9)
        tok = np.asarray(jax.jit(functools.partial(sampling.inverse_cdf_sample, block=block))(key, z))
        w = np.exp(np.asarray(z, np.float64) - np.asarray(z, np.float64).max(-1, keepdims=True))
        cdf = np.cumsum(w, -1)
        u = np.asarray(jax.random.uniform(key, (256, 1), dtype=jnp.float32), np.float64) * cdf[:, -1:]
        oracle = (cdf <= u).sum(-1)
        assert np.all((tok < 10) | (tok >= 20)) and tok.max() < V
        assert np.mean(tok == oracle) >= 0.99  # float32 sums may move a draw that sits on an interval edge

    def test_frequencies_match_softmax_across_blocks(self):
        probs = np.array([0.1, 0.0, 0.25, 0.05, 0.0, 0.0, 0.2, 0.4])
        n = 40000
        z = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (n, 8))
        tok = np.asarray(jax.jit(functools.partial(sampling.inverse_cdf_sample, block=3))(jax.random.key(4), z))
        freq = np.bincount(tok, minlength=8) / n
        assert freq[1] == freq[4] == freq[5] == 0  # the whole block [3, 6) but token 3 has no mass
        np.testing.assert_allclose(freq, probs, atol=4 * np.sqrt(0.25 / n))


class TestSampleStep:
    z = jax.random.normal(jax.random.key(0), (4, 32)) * 3

    @pytest.mark.parametrize("jit", [False, True])
    def test_greedy(self, jit):
        f = lambda z: sampling.sample_step(jax.random.key(0), z, temperature=0.0)  # noqa: E731
        out = (jax.jit(f) if jit else f)(self.z)
        chex.assert_shape([out.token_B, out.logp_B, out.sampling_logp_B], (4,))
        np.testing.assert_array_equal(out.token_B, np.argmax(self.z, -1))
        expect = _log_softmax(self.z)[np.arange(4), np.argmax(self.z, -1)]
        np.testing.assert_allclose(out.logp_B, expect, atol=1e-6)
        np.testing.assert_array_equal(out.sampling_logp_B, 0.0)  # q is a point mass

    @pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
    def test_logp_is_temperature_scaled_untruncated(self, temperature):
        out = sampling.sample_step(jax.random.key(1), self.z, temperature=temperature, top_k=5)
        tok = np.asarray(out.token_B)
        scaled = np.asarray(self.z, np.float64) / temperature
        np.testing.assert_allclose(out.logp_B, _log_softmax(scaled)[np.arange(4), tok], atol=1e-5)
        # sampling log-prob: renormalised over the top 5
        top5 = np.argsort(-scaled, -1)[:, :5]
        assert all(t in row for t, row in zip(tok, top5))
        keep = np.zeros_like(scaled, bool)
        np.put_along_axis(keep, top5, True, axis=-1)
        kept = np.where(keep, scaled, -np.inf)
        np.testing.assert_allclose(out.sampling_logp_B, _log_softmax(kept)[np.arange(4), tok], atol=1e-5)

    def test_untruncated_sampling_logp_equals_logp(self):
        out = sampling.sample_step(jax.random.key(2), self.z, temperature=1.0)
        np.testing.assert_array_equal(out.logp_B, out.sampling_logp_B)

    def test_suppressed_eos_never_sampled(self):
        z = jnp.zeros((64, 4)).at[:, 2].set(5.0)
        out = sampling.sample_step(jax.random.key(0), z, temperature=1.0, suppress_ids=(2,), suppress=True)
        assert not np.any(np.asarray(out.token_B) == 2)
        greedy = sampling.sample_step(jax.random.key(0), z, temperature=0.0, suppress_ids=(2,), suppress=True)
        assert not np.any(np.asarray(greedy.token_B) == 2)

    def test_bad_input(self):
        with pytest.raises(ValueError, match=r"\[B, V\]"):
            sampling.sample_step(jax.random.key(0), jnp.zeros((2, 3, 4)), temperature=1.0)
        with pytest.raises(ValueError, match="temperature"):
            sampling.sample_step(jax.random.key(0), jnp.zeros((2, 4)), temperature=-1.0)
