"""benchmarks/memory.py's helpers: the per-layer least-squares fit and the streamed sharded model writer
(`benchmarks/memory_models.py`), whose folders both our loader and `transformers` must read identically."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.memory import MODES, fit, separate_copy  # noqa: E402
from benchmarks.memory_models import build_streamed, l2048_hf_config  # noqa: E402


def test_fit_golden():
    # peak = 2 + 0.5 L exactly: (22 - 2) / 0.5 = 40 layers
    assert fit([(2, 3.0), (4, 4.0), (6, 5.0)], 22.0) == {"a_gib": 2.0, "b_gib_per_layer": 0.5, "max_layers": 40}
    # least squares through (1, 1), (2, 3), (3, 2): b = 0.5, a = 1.0; (10 - 1) / 0.5 = 18
    assert fit([(1, 1.0), (2, 3.0), (3, 2.0)], 10.0) == {"a_gib": 1.0, "b_gib_per_layer": 0.5, "max_layers": 18}


def test_modes_are_overrides_or_trl():
    assert MODES["full"] == [] and MODES["trl_peft"] is None
    assert "model.base_dtype=bfloat16" in MODES["lora_bf16"] and "frozen_dtype=bfloat16" in MODES["lora_bf16"]
    assert "ppo.critic_shares_base=true" in MODES["lora_bf16_shared"]


def test_l2048_config_shape():
    c = l2048_hf_config(3)
    assert (c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (2048, 16, 4, 128)
    assert (c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]) == (3, 5632, 8192)


def test_streamed_model_loads_the_same_in_ours_and_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax.numpy as jnp

    from rlhf_jax import models

    hf = {**l2048_hf_config(2), "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "intermediate_size": 96, "vocab_size": 128}
    d = build_streamed(tmp_path / "m", hf, shard_bytes=100_000)  # small shards: several files + the index
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert sorted(p.name for p in d.glob("*.safetensors")) == sorted(set(index["weight_map"].values()))
    model, params = models.load_pretrained(d, dtype=jnp.float32, head="lm")
    ids = np.random.default_rng(0).integers(0, 128, size=(2, 9))
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32)))
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    with torch.no_grad():
        theirs = ref(torch.tensor(ids)).logits.numpy()
    assert ours.shape == theirs.shape == (2, 9, 128)
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)
    assert build_streamed(tmp_path / "m", hf) == d  # idempotent: an existing folder is kept


def test_separate_reward_copy_has_its_own_inodes_and_the_same_bytes(tmp_path):
    src = tmp_path / "l2048-2"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"\x01\x02" * 1000)
    dest = separate_copy(src)
    assert dest == tmp_path / "l2048-2-reward"
    for name in ("config.json", "model.safetensors"):
        assert (dest / name).read_bytes() == (src / name).read_bytes()
        assert (dest / name).stat().st_ino != (src / name).stat().st_ino  # no page shared in the page cache
    (dest / "marker").write_text("kept")
    assert separate_copy(src) == dest and (dest / "marker").exists()  # made once
