"""bf16 storage with f32 compute on XLA:CPU (`runtime.xla.compiler_options`): each scanned layer's bf16 weight is
sliced in bf16 and converted inside the layer loop, not copied to f32 as a whole stack before it (XLA's
`float-normalization-bf16` pass did that); same numbers, and bf16 compute keeps the pass it needs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import fixtures, models, rollout
from rlhf_jax.runtime import xla

V = 96
PASS = {"xla_disable_hlo_passes": xla.BF16_NORMALIZATION_PASS}


def test_options_only_for_f32_compute_with_bf16_storage(monkeypatch):
    monkeypatch.delenv(xla.CPU_BF16_STORAGE_ENV, raising=False)
    assert xla.compiler_options(compute_dtype="float32", stored_dtypes=("bfloat16", None)) == PASS
    assert xla.compiler_options(compute_dtype="float32", stored_dtypes={jnp.dtype(jnp.bfloat16)}) == PASS
    assert xla.compiler_options(compute_dtype="bfloat16", stored_dtypes=("bfloat16",)) is None  # bf16 dots need it
    assert xla.compiler_options(compute_dtype="float32", stored_dtypes=("float32", None)) is None
    grad = xla.compiler_options(compute_dtype="float32", stored_dtypes=("bfloat16",), gradient=True)
    assert grad == {**(xla.gradient_compiler_options() or {}), **PASS}
    monkeypatch.setenv(xla.CPU_BF16_STORAGE_ENV, "0")
    assert xla.compiler_options(compute_dtype="float32", stored_dtypes=("bfloat16",)) is None


def test_program_dtypes_of_a_model_config():
    from rlhf_jax.models.lora import LoRAConfig
    from rlhf_jax.train.run import ModelLoadConfig

    plain = ModelLoadConfig(path="m", param_dtype="bfloat16")
    assert plain.program_dtypes("float32") == {"compute_dtype": "float32", "stored_dtypes": ("bfloat16", None,
                                                                                             "float32")}
    adapted = ModelLoadConfig(path="m", lora=LoRAConfig(rank=4), base_dtype="bfloat16")
    assert adapted.program_dtypes()["stored_dtypes"] == (None, "bfloat16")
    assert ModelLoadConfig(path="m", base_dtype="bfloat16").program_dtypes()["stored_dtypes"] == (None, None)


def _scanned_bf16(layers=4):
    cfg = models.ModelConfig.from_hf(fixtures.tiny_config("llama", vocab_size=V, hidden=64, max_positions=64))
    model = models.Transformer(cfg.replace(scan_layers=True, num_layers=layers), head="lm")
    params = models.init_params(model, jax.random.key(0))
    return model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)


def _stack_f32_bytes(params):
    return sum(x.size * 4 for x in jax.tree.leaves(params["layers"]))


def test_scanned_bf16_forward_slices_in_bf16_with_the_same_logits():
    model, params = _scanned_bf16()
    assert model.config.dtype == jnp.float32
    ids = jax.random.randint(jax.random.key(1), (2, 12), 3, V)
    mask = jnp.ones_like(ids)
    fwd = lambda p, i, m: model.apply({"params": p}, i, m)  # noqa: E731
    default = jax.jit(fwd).lower(params, ids, mask).compile()
    sliced = jax.jit(fwd, compiler_options=xla.compiler_options(
        compute_dtype=model.config.dtype, stored_dtypes=xla.leaf_dtypes(params))).lower(params, ids, mask).compile()
    whole = _stack_f32_bytes(params)
    assert default.memory_analysis().temp_size_in_bytes >= whole  # XLA's pass: the f32 copy of every layer
    assert sliced.memory_analysis().temp_size_in_bytes < whole / 2
    np.testing.assert_array_equal(np.asarray(default(params, ids, mask)), np.asarray(sliced(params, ids, mask)))


def test_bf16_compute_still_compiles_with_the_chosen_options():
    model, params = _scanned_bf16(layers=2)
    model = model.clone(config=model.config.replace(dtype=jnp.bfloat16))
    ids = jnp.ones((1, 8), jnp.int32)
    opts = xla.compiler_options(compute_dtype=model.config.dtype, stored_dtypes=xla.leaf_dtypes(params))
    assert opts is None
    out = jax.jit(lambda p: model.apply({"params": p}, ids, jnp.ones_like(ids)), compiler_options=opts)(params)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampler_program_keeps_bf16_weights_out_of_its_temporaries(dtype):
    model, params = _scanned_bf16(layers=6)
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    ids = jax.random.randint(jax.random.key(2), (2, 8), 3, V)
    lowered = rollout.lower_generate(model, params, ids, jnp.ones_like(ids), key=jax.random.key(0),
                                     max_new_tokens=4, eos_token_id=1, pad_token_id=0)
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    if dtype == "bfloat16":
        assert temp < _stack_f32_bytes(params) / 2
    greedy = rollout.generate(model, params, ids, jnp.ones_like(ids), key=jax.random.key(0), max_new_tokens=4,
                              temperature=0.0, eos_token_id=1, pad_token_id=0)
    assert greedy.response_ids_BxT.shape == (2, 4)
