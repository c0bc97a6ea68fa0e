"""Large random Llama-shaped models for `benchmarks/memory.py`, written without ever holding the model in memory.

`build_l2048(dir, layers=N)`: hidden 2048, 16 attention heads of 128, 4 KV heads (GQA 4:1), intermediate 5632
(TinyLlama-1.1B's shape at 22 layers), vocab 8192 (the fixture tokenizer's), untied head, f32. Tensors are
generated one at a time (norm scales 1, everything else N(0, 0.02²)) and streamed into ~1 GB safetensors
shards with a `model.safetensors.index.json`, under the names and shapes of `rlhf_jax.models.pretrained.
tensor_maps` (the Hugging Face layout, which both our loader and `transformers` read).
"""

from __future__ import annotations

import json
import os
import pathlib

L2048 = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
             intermediate_size=5632, vocab_size=8192)


def l2048_hf_config(layers: int) -> dict:
    """HF `config.json` of the l2048 shape with `layers` decoder layers."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **L2048, "num_hidden_layers": layers,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 10000.0,
            "tie_word_embeddings": False, "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0, "torch_dtype": "float32"}


def build_l2048(directory: str | os.PathLike, *, layers: int, shard_bytes: int = 2**30, seed: int = 0) -> pathlib.Path:
    """Write the l2048 model with `layers` layers (idempotent: an existing `config.json` means done)."""
    return build_streamed(directory, l2048_hf_config(layers), shard_bytes=shard_bytes, seed=seed)


def build_streamed(directory: str | os.PathLike, hf: dict, *, shard_bytes: int = 2**30, seed: int = 0) -> pathlib.Path:
    """Write a random f32 model of HF config `hf` (idempotent). Host memory peaks at one shard."""
    import numpy as np
    from safetensors.numpy import save_file

    from rlhf_jax import models
    from rlhf_jax.models.pretrained import tensor_maps

    directory = pathlib.Path(directory)
    if (directory / "config.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    maps = tensor_maps(models.ModelConfig.from_hf(hf), head="lm")
    rng = np.random.default_rng(seed)
    shards: list[list] = [[]]
    size = 0
    for m in maps:
        nbytes = int(np.prod(m.hf_shape)) * 4
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(m)
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for m in shard:
            if m.hf_name.endswith("norm.weight"):
                tensors[m.hf_name] = np.ones(m.hf_shape, np.float32)
            else:
                tensors[m.hf_name] = (rng.standard_normal(m.hf_shape, dtype=np.float32) * np.float32(0.02))
            weight_map[m.hf_name] = fname
            total += tensors[m.hf_name].nbytes
        save_file(tensors, str(directory / fname), metadata={"format": "pt"})
        del tensors
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    return directory
