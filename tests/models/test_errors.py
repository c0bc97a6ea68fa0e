"""Bad checkpoints raise one clear `ModelLoadError` naming the file/tensor, expected vs found."""

import json
import pathlib

import jax.numpy as jnp
import pytest
from safetensors.flax import load_file, save_file

from rlhf_jax.fixtures import tiny_config
from rlhf_jax.models import ModelConfig, ModelLoadError, Transformer, load_pretrained, save_pretrained

from .tiny import random_params


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory) -> pathlib.Path:
    hf = tiny_config("llama", vocab_size=50, hidden=16, layers=1, heads=2, kv_heads=1, max_positions=32)
    model = Transformer(ModelConfig.from_hf(hf))
    return save_pretrained(tmp_path_factory.mktemp("good") / "m", model, random_params(model))


def copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_good_dir_loads(good_dir):
    model, params = load_pretrained(good_dir)
    assert params["embed"].shape == (50, 16)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_missing_config(good_dir, tmp_path):
    d = copy(good_dir, tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json not found"):
        load_pretrained(d)


def test_missing_safetensors(good_dir, tmp_path):
    d = copy(good_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"expected model\.safetensors or model\.safetensors\.index\.json"):
        load_pretrained(d)


def test_truncated_safetensors(good_dir, tmp_path):
    d = copy(good_dir, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: cannot read safetensors file"):
        load_pretrained(d)


def test_unsupported_model_type(good_dir, tmp_path):
    d = copy(good_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "bert"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"model_type='bert' is not supported"):
        load_pretrained(d)


@pytest.mark.parametrize("key,value,match", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling type 'yarn'"),
    ("partial_rotary_factor", 0.5, "partial_rotary_factor=0.5"),
])
def test_unsupported_features(good_dir, tmp_path, key, value, match):
    d = copy(good_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=match):
        load_pretrained(d)


def test_shape_disagrees_with_config(good_dir, tmp_path):
    d = copy(good_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 40
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(48, 16\), "
                                             r"expected \(40, 16\)"):
        load_pretrained(d)


def test_missing_tensor(good_dir, tmp_path):
    d = copy(good_dir, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' \(shape \(8, 16\)\) "
                                             r"is missing"):
        load_pretrained(d)


def test_unexpected_tensor(good_dir, tmp_path):
    d = copy(good_dir, tmp_path / "m")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.7.mlp.up_proj.weight"] = jnp.zeros((2, 2))
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"unexpected tensors .*model\.layers\.7\.mlp\.up_proj\.weight"):
        load_pretrained(d)


def test_index_names_missing_shard(good_dir, tmp_path):
    d = copy(good_dir, tmp_path / "m")
    names = list(load_file(str(d / "model.safetensors")))
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelLoadError, match=r"model-00002-of-00002\.safetensors: safetensors file listed"):
        load_pretrained(d)


def test_bad_runtime_options():
    hf = tiny_config("gpt2", vocab_size=50, hidden=16, layers=1, heads=2)
    with pytest.raises(ValueError, match="remat='sometimes'"):
        ModelConfig.from_hf(hf, remat="sometimes")
