"""Helpers for parity tests: tiny random PyTorch Hugging Face models of each family (torch is test-only)."""

from __future__ import annotations

import numpy as np

V = 97  # vocab of the tiny reference models

# family name -> (model_type, HF config kwargs)
FAMILIES = {
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=True,
                          bos_token_id=1, eos_token_id=2)),
    "llama": ("llama", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, rope_theta=10000.0, tie_word_embeddings=False)),
    "llama3": ("llama", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                             intermediate_size=64, rope_theta=500000.0, attention_bias=True, mlp_bias=True,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
                             tie_word_embeddings=True)),
    "llama_linear": ("llama", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   intermediate_size=64, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": ("mistral", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=64, sliding_window=4)),
    "qwen2": ("qwen2", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, intermediate_size=64, tie_word_embeddings=False)),
}


def make_hf_model(family: str, out_dir, *, head: str = "lm", seed: int = 0, max_shard_size=None):
    """Builds a random tiny torch HF model, perturbs norms/biases away from their init, saves it; returns it."""
    import torch
    import transformers

    model_type, kwargs = FAMILIES[family]
    config = transformers.AutoConfig.for_model(model_type, vocab_size=V, pad_token_id=0, **kwargs)
    if model_type != "gpt2":
        config.max_position_embeddings = 64
    torch.manual_seed(seed)
    cls = transformers.AutoModelForCausalLM if head == "lm" else transformers.AutoModelForSequenceClassification
    if head == "scalar":
        config.num_labels = 1
    model = cls.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # random everything (HF inits norms to 1 and biases to 0, which hides layout bugs)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(out_dir), **kw)
    return model


def hf_forward(model, ids_BxS: np.ndarray, mask_BxS: np.ndarray) -> np.ndarray:
    """HF logits (or scores) in float32 with explicit position_ids = clip(cumsum(mask) − 1, 0)."""
    import torch

    pos = np.clip(np.cumsum(mask_BxS, -1) - 1, 0, None)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids_BxS), attention_mask=torch.tensor(mask_BxS),
                    position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


def padded_batch(seed: int = 0):
    """Row 0 left-padded (2 pads), row 1 right-padded (3 pads), row 2 full; S = 10; pad id 0."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, V, size=(3, 10)).astype(np.int64)
    mask = np.ones((3, 10), np.int64)
    mask[0, :2] = 0
    mask[1, -3:] = 0
    ids[mask == 0] = 0
    return ids, mask
