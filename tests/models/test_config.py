"""ModelConfig ↔ HF config.json, and RoPE frequencies against transformers' own formulas."""

import numpy as np
import pytest

from rlhf_jax.fixtures import FAMILIES, tiny_config
from rlhf_jax.models import ModelConfig, ModelLoadError
from rlhf_jax.models.rope import inverse_frequencies


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_from_hf_to_hf_round_trip(family, head):
    config = ModelConfig.from_hf(tiny_config(family, vocab_size=100))
    again = ModelConfig.from_hf(config.to_hf(head=head))
    assert again == config
    if head == "scalar":
        assert config.to_hf(head=head)["architectures"][0].endswith("ForSequenceClassification")


def test_transformers_reads_our_config():
    transformers = pytest.importorskip("transformers")
    for family in FAMILIES:
        hf = tiny_config(family, vocab_size=100, hidden=32, heads=4, kv_heads=2)
        cfg = transformers.AutoConfig.for_model(**hf)
        assert cfg.vocab_size == 100 and cfg.model_type == hf["model_type"]


def test_runtime_options_and_dtype_normalisation():
    c = ModelConfig.from_hf(tiny_config("qwen3", vocab_size=100), dtype="bfloat16", scan_layers=True,
                            remat="dots_saveable")
    assert c.dtype == np.dtype("bfloat16") and c.param_dtype == np.dtype("float32")
    assert c.remat_policy is not None and hash(c)
    assert c.qk_norm and c.head_dim == 32


def test_unsupported_model_type_dict():
    with pytest.raises(ModelLoadError, match="model_type='t5'"):
        ModelConfig.from_hf({"model_type": "t5"})


@pytest.mark.parametrize("rope", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_inverse_frequencies_match_transformers(rope):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = tiny_config("llama", vocab_size=100, hidden=256, heads=2)  # head_dim 128: all llama3 bands occur
    hf.update(rope_theta=500000.0, rope_scaling=rope)
    ours = inverse_frequencies(ModelConfig.from_hf(hf))
    cfg = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")})
    if rope is None:
        dim = 128
        ref = 1.0 / (500000.0 ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    else:
        ref, _ = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu")
        ref = ref.numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
