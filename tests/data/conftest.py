"""Shared fixtures for the data tests."""

from __future__ import annotations

import pytest

from ._helpers import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """Byte-level BPE with pad/eos tokens and a ChatML chat template."""
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))
