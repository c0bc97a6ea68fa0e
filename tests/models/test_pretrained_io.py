"""save_pretrained/load_pretrained without torch: bf16 files, overwrite in place, tokenizer files, layouts."""

import jax
import jax.numpy as jnp
import chex
import pytest

from rlhf_jax.fixtures import tiny_config
from rlhf_jax.models import ModelConfig, Transformer, load_pretrained, save_pretrained

from .tiny import random_params


@pytest.mark.parametrize("family", ["gpt2", "qwen3"])
def test_bf16_round_trip_and_overwrite(family, tmp_path):
    hf = tiny_config(family, vocab_size=50, hidden=16, layers=2, heads=2, kv_heads=1, max_positions=32)
    model = Transformer(ModelConfig.from_hf(hf, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    params = random_params(model)
    save_pretrained(tmp_path / "m", model, params)
    save_pretrained(tmp_path / "m", model, params)  # overwriting an existing dir is atomic and leaves no temp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    loaded_model, loaded = load_pretrained(tmp_path / "m", dtype=jnp.bfloat16)
    chex.assert_trees_all_equal(loaded, params)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(loaded))
    _, scanned = load_pretrained(tmp_path / "m", dtype=jnp.float32, scan_layers=True)
    assert scanned["layers"]["attn"]["q"].shape[0] == 2 and scanned["embed"].dtype == jnp.float32
