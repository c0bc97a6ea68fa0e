"""Tiny random models of every family for the sampler tests (built in memory; no files)."""

import jax
import pytest

from rlhf_jax import fixtures, models

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
VOCAB = 96


def tiny_config(family: str) -> models.ModelConfig:
    """The team fixture `rlhf_jax.fixtures.tiny_config` (2 layers, hidden 32, 4 query heads), vocab 96,
    with `initializer_range` 0.2 so next-token distributions are peaked (greedy ties unlikely). Mistral's
    sliding window is cut to 6 slots, shorter than prompt + response, so the window is exercised while
    decoding."""
    config = models.ModelConfig.from_hf(fixtures.tiny_config(family, vocab_size=VOCAB, hidden=32, max_positions=128))
    return config.replace(initializer_range=0.2, sliding_window=6 if family == "mistral" else config.sliding_window)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    """(family, model, params) for each family."""
    model = models.Transformer(tiny_config(request.param), head="lm")
    return request.param, model, models.init_params(model, jax.random.key(0))


@pytest.fixture(scope="module")
def llama_model():
    model = models.Transformer(tiny_config("llama"), head="lm")
    return model, models.init_params(model, jax.random.key(0))
