"""hf_io: slice-wise HF → ours layout (`read_block`) against whole-tensor numpy references, and the
streaming safetensors writer against the safetensors reader."""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from rlhf_jax.fixtures import tiny_config
from rlhf_jax.models import ModelConfig
from rlhf_jax.models.hf_io import normalize_index, read_block, tensor_maps, write_safetensors

D, H, K, HD = 8, 4, 2, 4  # hidden, q heads, kv heads, head_dim (H·hd != D, as in Qwen3)


def references():
    """(family, HF name suffix) -> whole-tensor HF → ours, written independently of hf_io."""
    return {
        "q_proj.weight": lambda w: [w.T.reshape(D, H, HD)],  # nn.Linear (out, in) → (in, heads, hd)
        "k_proj.weight": lambda w: [w.T.reshape(D, K, HD)],
        "o_proj.weight": lambda w: [w.T.reshape(H, HD, D)],  # (D, H·hd) → (heads, hd, out)
        "q_proj.bias": lambda w: [w.reshape(H, HD)],
        "gate_proj.weight": lambda w: [w.T],
        "score.weight": lambda w: [w.T],
        "c_attn.weight": lambda w: [p.reshape(D, H, D // H) for p in np.split(w, 3, axis=1)],  # Conv1D (in, 3·out)
        "c_attn.bias": lambda w: [p.reshape(H, D // H) for p in np.split(w, 3)],
        "attn.c_proj.weight": lambda w: [w.reshape(H, D // H, D)],
        "mlp.c_fc.weight": lambda w: [w],
    }


def maps_by_suffix():
    llama = dict(tiny_config("qwen2", vocab_size=11, hidden=D, heads=H, kv_heads=K), head_dim=HD)
    gpt2 = tiny_config("gpt2", vocab_size=11, hidden=D, heads=H)
    out = {}
    for cfg, head in ((llama, "scalar"), (gpt2, "lm")):
        for m in tensor_maps(ModelConfig.from_hf(cfg), head=head):
            for suffix in references():
                if m.hf_name.endswith(suffix) and suffix not in out:
                    out[suffix] = m
    return out


def random_index(rng, shape):
    idx = []
    for n in shape:
        a = int(rng.integers(0, n))
        idx.append(slice(a, int(rng.integers(a + 1, n + 1))))
    return tuple(idx)


@pytest.mark.parametrize("suffix", sorted(references()))
def test_read_block_equals_reference_slice_and_reads_only_what_it_needs(suffix):
    m = maps_by_suffix()[suffix]
    rng = np.random.default_rng(0)
    w = rng.normal(size=m.hf_shape).astype(np.float32)
    refs = references()[suffix](w)
    assert len(refs) == len(m.layouts) == len(m.paths)
    for layout, ref in zip(m.layouts, refs):
        assert layout.shape == ref.shape
        np.testing.assert_array_equal(read_block(lambda s: w[s], m.hf_shape, layout, ()), ref)
        for _ in range(40):
            index = random_index(rng, ref.shape)
            np.testing.assert_array_equal(read_block(lambda s: w[s], m.hf_shape, layout, index), ref[index])
    np.testing.assert_array_equal(m.to_hf(tuple(refs)), w)  # the writer's inverse


@pytest.mark.parametrize("suffix,leaf,index", [
    ("q_proj.weight", 0, (slice(2, 4), slice(1, 3), slice(None))),  # (embed=fsdp, heads=tensor, hd)
    ("o_proj.weight", 0, (slice(1, 3), slice(None), slice(2, 6))),  # (heads, hd, embed)
    ("c_attn.weight", 1, (slice(0, 4), slice(2, 4), slice(None))),  # GPT-2 k, middle third of c_attn
    ("c_attn.bias", 2, (slice(1, 2), slice(None))),
    ("gate_proj.weight", 0, (slice(4, 8), slice(6, 12))),
])
def test_shard_shaped_slices_read_exactly_their_elements(suffix, leaf, index):
    """A shard splits embed/heads/mlp/vocab but never head_dim: read_block then reads its elements only."""
    m = maps_by_suffix()[suffix]
    w = np.arange(np.prod(m.hf_shape), dtype=np.float32).reshape(m.hf_shape)
    reads = []
    got = read_block(lambda s: reads.append(w[s]) or reads[-1], m.hf_shape, m.layouts[leaf], index)
    np.testing.assert_array_equal(got, references()[suffix](w)[leaf][index])
    assert len(reads) == 1 and reads[0].size == got.size < w.size


def test_normalize_index():
    assert normalize_index((slice(None), slice(2, 5)), (4, 8, 3)) == ((0, 4), (2, 5), (0, 3))
    with pytest.raises(ValueError, match="unit-step"):
        normalize_index((slice(0, 4, 2),), (4,))


def test_write_safetensors_streams_a_file_safetensors_reads(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.normal(size=(3, 5)).astype(np.float32),
               "b.bias": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
               "c": rng.normal(size=(2, 1, 4)).astype(np.float32).transpose(2, 1, 0)}  # non-contiguous
    entries = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    n = write_safetensors(tmp_path / "x.safetensors", entries, (v for v in tensors.values()),
                          metadata={"format": "pt"})
    assert n == sum(v.nbytes for v in tensors.values())
    with safe_open(str(tmp_path / "x.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"} and sorted(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype
            np.testing.assert_array_equal(got, v)
    header_len = int.from_bytes((tmp_path / "x.safetensors").read_bytes()[:8], "little")
    assert header_len % 8 == 0
    header = json.loads((tmp_path / "x.safetensors").read_bytes()[8:8 + header_len])
    assert header["b.bias"]["dtype"] == "BF16"


def test_write_safetensors_rejects_a_tensor_unlike_its_entry(tmp_path):
    with pytest.raises(ValueError, match=r"tensor 'a': expected \(\(2, 2\), dtype\('float32'\)\)"):
        write_safetensors(tmp_path / "x.safetensors", [("a", (2, 2), np.dtype("float32"))],
                          [np.zeros((2, 3), np.float32)], metadata={})
