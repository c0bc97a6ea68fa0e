"""Shared fixtures for the data tests."""

from __future__ import annotations

import pytest

from rlhf_jax.fixtures import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """The project's offline byte-level BPE tokenizer (pad/eos tokens, ChatML chat template)."""
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))  # trained once, then from the content-keyed cache
