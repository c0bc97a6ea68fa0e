"""Tests for rlhf_jax.rewards: loading, batched calls, weighted sums, score post-processing."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import rewards

MODULE_SRC = textwrap.dedent(
    """
    def length(prompts, responses, **columns):
        return [float(len(r)) for r in responses]

    def match(prompts, responses, answer):
        return [1.0 if r == a else 0.0 for r, a in zip(responses, answer)]

    def sometimes(prompts, responses, **kw):
        return [None if r.startswith("x") else 2.0 for r in responses]

    def wrong_len(prompts, responses):
        return [1.0]

    def bad_value(prompts, responses):
        return ["high" for _ in responses]

    class Holder:
        @staticmethod
        def nested(prompts, responses):
            return [3.0] * len(responses)

    NOT_CALLABLE = 3
    """
)


@pytest.fixture()
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(MODULE_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path / "my_rewards_mod.py"


class TestLoadFunction:
    def test_module_spec(self, reward_module):
        fn = rewards.load_function("my_rewards_mod:length")
        assert fn(["p"], ["abc"]) == [3.0]

    def test_file_spec(self, reward_module):
        fn = rewards.load_function(f"{reward_module}:length")
        assert fn(["p"], ["ab"]) == [2.0]

    def test_dotted_attribute(self, reward_module):
        fn = rewards.load_function("my_rewards_mod:Holder.nested")
        assert fn(["p"], ["a"]) == [3.0]

    @pytest.mark.parametrize(
        "spec, match",
        [
            ("no_colon_here", "expected"),
            ("my_rewards_mod:", "expected"),
            ("definitely_missing_module_xyz:f", "cannot import"),
            ("my_rewards_mod:missing", "no attribute"),
            ("my_rewards_mod:NOT_CALLABLE", "not callable"),
            ("/nonexistent/dir/r.py:f", "does not exist"),
        ],
    )
    def test_errors_name_the_spec(self, reward_module, spec, match):
        with pytest.raises(ValueError, match=match) as e:
            rewards.load_function(spec)
        assert spec in str(e.value)


class TestCallRewardFn:
    def test_columns_filtered_by_signature(self, reward_module):
        fn = rewards.load_function("my_rewards_mod:match")
        out = rewards.call_reward_fn(fn, ["p", "q"], ["a", "b"], {"answer": ["a", "c"], "other": [1, 2]})
        np.testing.assert_array_equal(out, [1.0, 0.0])

    def test_none_becomes_nan(self, reward_module):
        fn = rewards.load_function("my_rewards_mod:sometimes")
        out = rewards.call_reward_fn(fn, ["p", "q"], ["xa", "b"])
        assert np.isnan(out[0]) and out[1] == 2.0

    def test_wrong_length(self, reward_module):
        fn = rewards.load_function("my_rewards_mod:wrong_len")
        with pytest.raises(ValueError, match="returned 1 scores for a batch of 2"):
            rewards.call_reward_fn(fn, ["p", "q"], ["a", "b"], name="wrong_len")

    def test_bad_value_names_row(self, reward_module):
        fn = rewards.load_function("my_rewards_mod:bad_value")
        with pytest.raises(ValueError, match="row 0"):
            rewards.call_reward_fn(fn, ["p"], ["a"])

    def test_column_length_checked(self, reward_module):
        fn = rewards.load_function("my_rewards_mod:length")
        with pytest.raises(ValueError, match="column 'answer' has 1 rows, expected 2"):
            rewards.call_reward_fn(fn, ["p", "q"], ["a", "b"], {"answer": ["a"]})


class TestWeightedRewards:
    def test_weighted_sum_golden(self, reward_module):
        wr = rewards.WeightedRewards.from_specs(["my_rewards_mod:length", "my_rewards_mod:match"], [0.5, 2.0])
        total, parts = wr(["p", "q"], ["ab", "xyz"], {"answer": ["ab", "no"]})
        np.testing.assert_allclose(total, [0.5 * 2 + 2.0 * 1, 0.5 * 3 + 0.0])
        assert set(parts) == {"length", "match"}
        assert total.dtype == np.float32

    def test_none_skips_term(self, reward_module):
        wr = rewards.WeightedRewards.from_specs(["my_rewards_mod:length", "my_rewards_mod:sometimes"], [1.0, 10.0])
        total, _ = wr(["p", "q"], ["xa", "bb"])
        np.testing.assert_allclose(total, [2.0, 2.0 + 20.0])

    def test_all_none_row_raises(self, reward_module):
        wr = rewards.WeightedRewards.from_specs(["my_rewards_mod:sometimes"])
        with pytest.raises(ValueError, match=r"rows \[0\]"):
            wr(["p", "q"], ["xa", "b"])

    def test_weight_count_mismatch(self, reward_module):
        with pytest.raises(ValueError, match="reward_weights has 1 entries but reward_fns has 2"):
            rewards.WeightedRewards.from_specs(["my_rewards_mod:length", "my_rewards_mod:match"], [1.0])

    def test_duplicate_specs_get_unique_names(self, reward_module):
        wr = rewards.WeightedRewards.from_specs(["my_rewards_mod:length", "my_rewards_mod:length"])
        assert wr.names == ("length", "length_2")
        total, _ = wr(["p"], ["abc"])
        np.testing.assert_allclose(total, [6.0])


class TestScorePostprocessing:
    @pytest.mark.parametrize("use_jit", [False, True])
    def test_clip(self, use_jit):
        f = lambda s: rewards.clip_scores(s, clip=2.0)  # noqa: E731
        f = jax.jit(f) if use_jit else f
        np.testing.assert_allclose(f(jnp.array([-5.0, 0.5, 3.0])), [-2.0, 0.5, 2.0])
        np.testing.assert_allclose(rewards.clip_scores(jnp.array([9.0]), clip=None), [9.0])
        with pytest.raises(ValueError, match="clip must be > 0"):
            rewards.clip_scores(jnp.array([1.0]), clip=0.0)

    @pytest.mark.parametrize("use_jit", [False, True])
    def test_normalize(self, use_jit):
        f = lambda s: rewards.normalize_scores(s, mean=1.0, std=2.0, eps=0.0)  # noqa: E731
        f = jax.jit(f) if use_jit else f
        np.testing.assert_allclose(f(jnp.array([1.0, 5.0, -3.0])), [0.0, 2.0, -2.0])

    @pytest.mark.parametrize("use_jit", [False, True])
    def test_no_eos_penalty(self, use_jit):
        f = lambda s, e: rewards.no_eos_penalty(s, e, penalty=1.5)  # noqa: E731
        f = jax.jit(f) if use_jit else f
        out = f(jnp.array([1.0, 1.0]), jnp.array([True, False]))
        np.testing.assert_allclose(out, [1.0, -0.5])
        np.testing.assert_allclose(rewards.no_eos_penalty(jnp.array([1.0]), jnp.array([False]), penalty=None), [1.0])
