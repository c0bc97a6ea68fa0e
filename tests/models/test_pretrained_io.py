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



def test_loading_reads_each_param_with_only_its_own_file_mapped(tmp_path, monkeypatch):
    """A safetensors handle maps its whole file, and every page a read touches counts in RSS until the handle
    closes: loading closes the handles after each param, so while a param's data is read only the file
    holding it is open (holding all of them made an l2048 load peak 1.58 GiB of file pages above its params)."""
    from rlhf_jax.models import pretrained

    hf = tiny_config("llama", vocab_size=50, hidden=16, layers=2, heads=2, kv_heads=1, max_positions=32)
    model = Transformer(ModelConfig.from_hf(hf))
    params = random_params(model)
    save_pretrained(tmp_path / "m", model, params, max_shard_size=4000)
    assert len(list((tmp_path / "m").glob("*.safetensors"))) > 2
    live, open_at_read = set(), []

    class Handle:
        def __init__(self, path, framework):
            self.inner, self.path = pretrained_safe_open(path, framework=framework), path
            live.add(self.path)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            live.discard(self.path)
            return self.inner.__exit__(*exc)

        def __getattr__(self, name):  # keys(), metadata(), ...
            return getattr(self.inner, name)

        def get_slice(self, name):
            sl = self.inner.get_slice(name)

            class Slice:
                get_shape = sl.get_shape

                def __getitem__(self, index):
                    open_at_read.append(len(live))
                    return sl[index]

            return Slice()

    pretrained_safe_open = pretrained.safe_open
    monkeypatch.setattr(pretrained, "safe_open", Handle)
    _, loaded = load_pretrained(tmp_path / "m")
    chex.assert_trees_all_equal(loaded, params)
    assert open_at_read and max(open_at_read) == 1
    assert not live  # every handle closed when loading returns
