"""Tests for rlhf_jax.data.batching.pad_prompts / pick_bucket (left-padded prompts for the sampler)."""

import numpy as np
import pytest

from rlhf_jax.data.batching import PROMPT_BUCKETS, pad_prompts, pick_bucket


@pytest.mark.parametrize("n,expect", [(0, 16), (1, 16), (16, 16), (17, 32), (64, 64), (65, 128)])
def test_pick_bucket(n, expect):
    assert pick_bucket(n, PROMPT_BUCKETS) == expect


def test_custom_buckets_unsorted():
    assert pad_prompts([[1] * 5], pad_token_id=0, buckets=(8, 4))[0].shape == (1, 8)
    assert pad_prompts([[1] * 4], pad_token_id=0, buckets=(8, 4))[0].shape == (1, 4)


def test_too_long_raises_with_length():
    with pytest.raises(ValueError, match="a row of 9 tokens does not fit the largest bucket 8"):
        pad_prompts([[1] * 9], pad_token_id=0, buckets=(4, 8))


def test_pad_prompts_left_pads_to_bucket():
    ids, mask = pad_prompts([[5, 6, 7], [9]], pad_token_id=0, buckets=(2, 4, 8))
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 9]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    assert ids.dtype == np.int32 and mask.dtype == np.int32


def test_pad_prompts_left_truncates():
    ids, mask = pad_prompts([[1, 2, 3, 4, 5]], pad_token_id=0, buckets=(4,), max_prompt_length=3)
    np.testing.assert_array_equal(ids, [[0, 3, 4, 5]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1]])


def test_pad_prompts_errors_name_the_row():
    with pytest.raises(ValueError, match="row 1 is empty"):
        pad_prompts([[1], []], pad_token_id=0)
    with pytest.raises(ValueError, match="row 0 has a negative"):
        pad_prompts([[1, -2]], pad_token_id=0)
    with pytest.raises(ValueError, match="empty list"):
        pad_prompts([], pad_token_id=0)


def test_ragged_dataset_uses_few_shapes():
    rng = np.random.default_rng(0)
    shapes = {pad_prompts([list(range(1, n + 1))] * 2, pad_token_id=0)[0].shape
              for n in rng.integers(1, 200, size=300)}
    assert shapes <= {(2, 16), (2, 32), (2, 64), (2, 128), (2, 256)}
