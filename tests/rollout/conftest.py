"""Tiny random models of every family for the sampler tests (built in memory; no files)."""

import jax
import pytest

from rlhf_jax import models

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
VOCAB = 96


def tiny_config(family: str, **overrides) -> models.ModelConfig:
    """2 layers, hidden 32, 4 query / 2 kv heads (GPT-2: 4/4), vocab 96. `initializer_range` 0.2 makes the
    next-token distributions peaked, so greedy ties are unlikely. Mistral gets a sliding window of 6 slots,
    shorter than prompt + response, so the window is exercised while decoding."""
    base = dict(model_type=family, vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                num_kv_heads=4 if family == "gpt2" else 2, head_dim=8, intermediate_size=64,
                max_position_embeddings=128, norm_eps=1e-5,
                activation="gelu_new" if family == "gpt2" else "silu", initializer_range=0.2)
    family_fields = {
        "gpt2": dict(qkv_bias=True, o_bias=True, mlp_bias=True, tie_word_embeddings=True),
        "llama": dict(),
        "mistral": dict(sliding_window=6),
        "qwen2": dict(qkv_bias=True),
        "qwen3": dict(qk_norm=True),
    }[family]
    return models.ModelConfig(**{**base, **family_fields, **overrides})


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    """(family, model, params) for each family."""
    model = models.Transformer(tiny_config(request.param), head="lm")
    return request.param, model, models.init_params(model, jax.random.key(0))


@pytest.fixture(scope="module")
def llama_model():
    model = models.Transformer(tiny_config("llama"), head="lm")
    return model, models.init_params(model, jax.random.key(0))
