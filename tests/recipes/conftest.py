"""Shared trainer fixtures: the demo task's data and a tiny Llama (HF folder with tokenizer), built offline."""

from __future__ import annotations

import pathlib

import pytest

from rlhf_jax import fixtures, tasks


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> pathlib.Path:
    """Random 2-layer Llama, hidden 32, with the fixture BPE tokenizer (vocab 4096, chat template)."""
    root = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = fixtures.build_tokenizer(root / "tokenizer")
    return fixtures.build_tiny_model(root / "model", "llama", tokenizer=tokenizer, hidden=32, layers=2, heads=4,
                                     kv_heads=2, max_positions=128)


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> dict[str, pathlib.Path]:
    return tasks.write_task_data(tmp_path_factory.mktemp("task_data"), n_sft=256, n_pref=512, n_eval=64,
                                 n_prompts=32, seed=0)
