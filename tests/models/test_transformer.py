"""Behaviour of the Flax decoder itself: padding, packing, KV-cache decoding, scan/remat, bf16, specs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from rlhf_jax.models import (KVCache, ModelConfig, Transformer, default_positions, init_cache, init_params,
                             logical_specs)
from rlhf_jax.fixtures import tiny_config

V = 61
AXES = {"vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "layers", "norm", None}


def make(family, **runtime):
    hf = tiny_config(family, vocab_size=V, hidden=32, layers=2, heads=4, kv_heads=2, max_positions=64)
    if family == "mistral":
        hf["sliding_window"] = 5  # small enough to matter in these sequences
    model = Transformer(ModelConfig.from_hf(hf, **runtime))
    params = init_params(model, jax.random.key(0))
    # Random norms so that layout/broadcast bugs show up.
    params = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), params)
    return model, params


def rand_ids(shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 1, V)


@pytest.mark.parametrize("family", ["gpt2", "llama3", "mistral", "qwen3"])
def test_left_padded_row_equals_row_alone(family):
    model, params = make(family)
    ids = rand_ids((1, 7))
    alone = model.apply({"params": params}, ids, jnp.ones((1, 7), jnp.int32))
    padded_ids = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), ids], 1)
    padded_mask = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 7), jnp.int32)], 1)
    padded = jax.jit(model.apply)({"params": params}, padded_ids, padded_mask)
    assert bool(jnp.isfinite(padded).all()), "padded query rows must not be NaN"
    np.testing.assert_allclose(padded[:, 3:], alone, atol=1e-5)
    right = model.apply({"params": params}, jnp.concatenate([ids, jnp.zeros((1, 3), jnp.int32)], 1),
                        jnp.concatenate([jnp.ones((1, 7), jnp.int32), jnp.zeros((1, 3), jnp.int32)], 1))
    np.testing.assert_allclose(right[:, :7], alone, atol=1e-5)


def test_default_positions():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(default_positions(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]])


def test_packed_segments_equal_separate_sequences():
    model, params = make("llama")
    a, b = rand_ids((1, 4), 1), rand_ids((1, 5), 2)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.array([[1] * 4 + [2] * 5])
    pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    out = model.apply({"params": params}, packed, jnp.ones((1, 9), jnp.int32), positions_BxS=pos, segment_ids_BxS=seg)
    out_a = model.apply({"params": params}, a, jnp.ones((1, 4), jnp.int32))
    out_b = model.apply({"params": params}, b, jnp.ones((1, 5), jnp.int32))
    np.testing.assert_allclose(out[:, :4], out_a, atol=1e-5)
    np.testing.assert_allclose(out[:, 4:], out_b, atol=1e-5)


def test_causal_future_tokens_do_not_change_past_logits():
    model, params = make("qwen2")
    ids = rand_ids((1, 6))
    changed = ids.at[0, 3:].set((ids[0, 3:] + 7) % V)
    mask = jnp.ones((1, 6), jnp.int32)
    a = model.apply({"params": params}, ids, mask)
    b = model.apply({"params": params}, changed, mask)
    np.testing.assert_array_equal(a[:, :3], b[:, :3])
    assert float(jnp.abs(a[:, 3:] - b[:, 3:]).max()) > 1e-3


@pytest.mark.parametrize("family,scan", [("llama", False), ("gpt2", False), ("mistral", True), ("qwen3", True)])
def test_prefill_then_token_by_token_equals_full_forward(family, scan):
    model, params = make(family, scan_layers=scan)
    B, P, T = 2, 6, 5
    prompt = rand_ids((B, P), 3)
    prompt_mask = jnp.array([[0, 0, 1, 1, 1, 1], [1] * 6], jnp.int32)
    prompt = jnp.where(prompt_mask == 1, prompt, 0)
    new_tokens = rand_ids((B, T), 4)
    full_ids = jnp.concatenate([prompt, new_tokens], 1)
    full_mask = jnp.concatenate([prompt_mask, jnp.ones((B, T), jnp.int32)], 1)
    full = model.apply({"params": params}, full_ids, full_mask)

    smax = P + T + 3  # spare slots stay masked
    cache_mask = jnp.concatenate([prompt_mask, jnp.zeros((B, smax - P), jnp.int32)], 1)
    cache = init_cache(model.config, B, smax)
    step = jax.jit(model.apply)
    pos = default_positions(prompt_mask)
    logits, cache = step({"params": params}, prompt, cache_mask, positions_BxS=pos, cache=cache, cache_index=0)
    chex.assert_shape(logits, (B, P, V))
    assert isinstance(cache, KVCache)
    chex.assert_shape(cache.k, (2, B, smax, model.config.num_kv_heads, model.config.head_dim))
    np.testing.assert_allclose(logits[prompt_mask == 1], full[:, :P][prompt_mask == 1], atol=1e-5)
    next_pos = pos[:, -1] + 1
    for t in range(T):
        cache_mask = cache_mask.at[:, P + t].set(1)
        logits, cache = step({"params": params}, new_tokens[:, t:t + 1], cache_mask,
                             positions_BxS=(next_pos + t)[:, None], cache=cache, cache_index=jnp.int32(P + t))
        np.testing.assert_allclose(logits[:, 0], full[:, P + t], atol=1e-5)


def test_scan_layers_and_remat_match_unrolled():
    model, params = make("qwen3")
    ids, mask = rand_ids((2, 7)), jnp.ones((2, 7), jnp.int32)
    ref = model.apply({"params": params}, ids, mask)
    from rlhf_jax.models import stack_layers, unstack_layers
    scanned = Transformer(model.config.replace(scan_layers=True, remat="dots_saveable"))
    stacked = stack_layers(params, 2)
    chex.assert_trees_all_equal_shapes(stacked, init_params(scanned, jax.random.key(0)))
    np.testing.assert_allclose(scanned.apply({"params": stacked}, ids, mask), ref, atol=1e-5)
    chex.assert_trees_all_equal(unstack_layers(stacked, 2), params)
    full = Transformer(model.config.replace(remat="full"))
    loss = lambda m, p: m.apply({"params": p}, ids, mask).sum()  # noqa: E731
    g_ref = jax.grad(lambda p: loss(model, p))(params)
    g_remat = jax.jit(jax.grad(lambda p: loss(full, p)))(params)
    chex.assert_trees_all_close(g_remat, g_ref, atol=1e-4)


def test_bf16_compute_is_finite_and_close_to_f32():
    model, params = make("llama")
    ids, mask = rand_ids((2, 7)), jnp.array([[0, 1, 1, 1, 1, 1, 1], [1] * 7])
    ref = model.apply({"params": params}, ids, mask)
    bf = Transformer(model.config.replace(dtype=jnp.bfloat16))
    out = jax.jit(bf.apply)({"params": params}, ids, mask)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.1)
    pb = Transformer(model.config.replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    p16 = init_params(pb, jax.random.key(0))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))


@pytest.mark.parametrize("family,scan", [("gpt2", False), ("qwen3", True)])
def test_logical_specs_match_params(family, scan):
    model, params = make(family, scan_layers=scan)
    specs = logical_specs(model)
    chex.assert_trees_all_equal_structs(jax.tree.map(lambda _: 0, params),
                                        jax.tree.map(lambda _: 0, specs, is_leaf=lambda x: isinstance(x, PartitionSpec)))
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    for spec, (path, leaf) in zip(spec_leaves, jax.tree_util.tree_leaves_with_path(params)):
        assert len(spec) == leaf.ndim and set(spec) <= AXES
        in_scanned_block = path[0].key == "layers"
        assert (spec[0] == "layers") == in_scanned_block, (path, spec)
    if scan:
        assert logical_specs(model)["layers"]["attn"]["q"] == PartitionSpec("layers", "embed", "q_heads", "head_dim")


def test_scalar_head_and_bad_head():
    model, params = make("llama")
    scalar = Transformer(model.config, head="scalar")
    p = init_params(scalar, jax.random.key(0))
    assert p["score"].shape == (32, 1) and "lm_head" not in p
    out = scalar.apply({"params": p}, rand_ids((2, 5)), jnp.ones((2, 5), jnp.int32))
    assert out.shape == (2, 5) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="head="):
        init_params(Transformer(model.config, head="value"), jax.random.key(0))
