"""Behaviour of the Flax decoder itself: padding, packing, KV-cache decoding, scan/remat, bf16, specs.

Compiles dominate the cost on CPU: params are drawn on the host (no `init` compile), models are built once,
and batches that test several rows at once share one compiled program.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from rlhf_jax.models import (KVCache, ModelConfig, Transformer, default_positions, init_cache, init_params,
                             logical_specs, split_cache)
from rlhf_jax.fixtures import tiny_config

from .tiny import random_params

V = 61
AXES = {"vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "layers", "norm", None}


@functools.lru_cache(maxsize=None)
def make(family, **runtime):
    """(model, params) per family and runtime options, built once per session."""
    hf = tiny_config(family, vocab_size=V, hidden=32, layers=2, heads=4, kv_heads=2, max_positions=64)
    if family == "mistral":
        hf["sliding_window"] = 5  # small enough to matter in these sequences
    model = Transformer(ModelConfig.from_hf(hf, **runtime))
    return model, random_params(model)


@functools.lru_cache(maxsize=None)
def jitted(model: Transformer):
    """One `jax.jit(model.apply)` per model, so equal (model, shapes) pairs share a compiled program."""
    return jax.jit(model.apply)


def rand_ids(shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 1, V)


@pytest.mark.parametrize("family", ["gpt2", "llama3", "mistral", "qwen3"])
def test_left_padded_row_equals_row_alone(family):
    model, params = make(family)
    ids = rand_ids((1, 7))
    alone = model.apply({"params": params}, ids, jnp.ones((1, 7), jnp.int32))  # not jitted
    pads, ones = jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 7), jnp.int32)
    # Row 0 left-padded, row 1 right-padded: one jitted call checks both (rows are independent).
    both_ids = jnp.concatenate([jnp.concatenate([pads, ids], 1), jnp.concatenate([ids, pads], 1)])
    both_mask = jnp.concatenate([jnp.concatenate([pads, ones], 1), jnp.concatenate([ones, pads], 1)])
    both = jitted(model)({"params": params}, both_ids, both_mask)
    assert bool(jnp.isfinite(both).all()), "padded query rows must not be NaN"
    np.testing.assert_allclose(both[:1, 3:], alone, atol=1e-5)
    np.testing.assert_allclose(both[1:, :7], alone, atol=1e-5)


def test_default_positions():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(default_positions(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]])


def test_packed_segments_equal_separate_sequences():
    model, params = make("llama")
    a, b = rand_ids((1, 4), 1), rand_ids((1, 5), 2)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.array([[1] * 4 + [2] * 5])
    pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    out = jitted(model)({"params": params}, packed, jnp.ones((1, 9), jnp.int32), positions_BxS=pos,
                        segment_ids_BxS=seg)
    # a and b as two rows of one call (one compile); a is right-padded, which never changes its tokens.
    rows = jnp.concatenate([jnp.concatenate([a, jnp.zeros((1, 1), a.dtype)], 1), b])
    separate = jitted(model)({"params": params}, rows, jnp.array([[1, 1, 1, 1, 0], [1] * 5], jnp.int32))
    np.testing.assert_allclose(out[:, :4], separate[:1, :4], atol=1e-5)
    np.testing.assert_allclose(out[:, 4:], separate[1:], atol=1e-5)


def test_causal_future_tokens_do_not_change_past_logits():
    model, params = make("qwen2")
    ids = rand_ids((1, 7))  # (1, 7) eager: the primitives compiled for the padding test are reused
    changed = ids.at[0, 3:].set((ids[0, 3:] + 7) % V)
    mask = jnp.ones((1, 7), jnp.int32)
    a = model.apply({"params": params}, ids, mask)
    b = model.apply({"params": params}, changed, mask)
    np.testing.assert_array_equal(a[:, :3], b[:, :3])
    assert float(jnp.abs(a[:, 3:] - b[:, 3:]).max()) > 1e-3


@pytest.mark.parametrize("family,scan", [("llama", False), ("gpt2", False), ("mistral", True), ("qwen3", True)])
def test_prefill_then_token_by_token_equals_full_forward(family, scan):
    model, params = make(family, scan_layers=scan)
    step = jitted(model)
    B, P, T = 2, 6, 4  # the full forward is [2, 10]: gpt2 reuses the padding test's compiled program
    prompt = rand_ids((B, P), 3)
    prompt_mask = jnp.array([[0, 0, 1, 1, 1, 1], [1] * 6], jnp.int32)
    prompt = jnp.where(prompt_mask == 1, prompt, 0)
    new_tokens = rand_ids((B, T), 4)
    full_ids = jnp.concatenate([prompt, new_tokens], 1)
    full_mask = jnp.concatenate([prompt_mask, jnp.ones((B, T), jnp.int32)], 1)
    full = step({"params": params}, full_ids, full_mask)

    smax = P + T + 3  # spare slots stay masked
    cache_mask = jnp.concatenate([prompt_mask, jnp.zeros((B, smax - P), jnp.int32)], 1)
    cache = init_cache(model.config, B, smax)
    pos = default_positions(prompt_mask)
    logits, cache = step({"params": params}, prompt, cache_mask, positions_BxS=pos, cache=cache, cache_index=0)
    chex.assert_shape(logits, (B, P, V))
    assert isinstance(cache, KVCache)
    chex.assert_shape(cache.k, (2, B, model.config.num_kv_heads, smax, model.config.head_dim))
    np.testing.assert_allclose(logits[prompt_mask == 1], full[:, :P][prompt_mask == 1], atol=1e-5)
    next_pos = pos[:, -1] + 1
    for t in range(T):
        cache_mask = cache_mask.at[:, P + t].set(1)
        logits, cache = step({"params": params}, new_tokens[:, t:t + 1], cache_mask,
                             positions_BxS=(next_pos + t)[:, None], cache=cache, cache_index=jnp.int32(P + t))
        np.testing.assert_allclose(logits[:, 0], full[:, P + t], atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_split_cache_decodes_like_the_stacked_cache(scan):
    """`split_cache` (one buffer per layer, what the sampler decodes with) gives the stacked cache's logits and
    contents; a scanned model stacks it for its scan and hands it back split."""
    model, params = make("llama", scan_layers=scan)
    B, P, smax = 2, 5, 8
    ids = rand_ids((B, P + 2), 7)
    mask = jnp.array([[0, 1, 1, 1, 1], [1] * 5], jnp.int32)
    cache_mask = jnp.concatenate([mask, jnp.zeros((B, smax - P), jnp.int32)], 1)
    pos = default_positions(mask)

    def decode(cache):
        outs = []
        logits, cache = model.apply({"params": params}, ids[:, :P], cache_mask, positions_BxS=pos, cache=cache,
                                    cache_index=0)
        outs.append(logits)
        for t in range(2):
            m = cache_mask.at[:, : P + t + 1].set(jnp.concatenate([mask, jnp.ones((B, t + 1), jnp.int32)], 1))
            logits, cache = model.apply({"params": params}, ids[:, P + t : P + t + 1], m,
                                        positions_BxS=(pos[:, -1] + 1 + t)[:, None], cache=cache,
                                        cache_index=jnp.int32(P + t))
            outs.append(logits)
        return outs, cache

    stacked = init_cache(model.config, B, smax)
    split = split_cache(stacked)
    assert split.per_layer and not stacked.per_layer and split.max_len == stacked.max_len == smax
    chex.assert_shape(list(split.k), (B, model.config.num_kv_heads, smax, model.config.head_dim))
    ref, ref_cache = jax.jit(decode)(stacked)
    out, out_cache = jax.jit(decode)(split)
    assert out_cache.per_layer and len(out_cache.k) == model.config.num_layers
    for a, b in zip(out, ref):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(jnp.stack(out_cache.k), ref_cache.k, atol=1e-6)
    np.testing.assert_allclose(jnp.stack(out_cache.v), ref_cache.v, atol=1e-6)


def test_scan_layers_and_remat_match_unrolled():
    model, params = make("qwen3")
    ids, mask = rand_ids((2, 10)), jnp.ones((2, 10), jnp.int32)
    ref = jitted(model)({"params": params}, ids, mask)  # [2, 10]: compiled by the padding test already
    from rlhf_jax.models import stack_layers, unstack_layers
    scanned = Transformer(model.config.replace(scan_layers=True, remat="dots_saveable"))
    stacked = stack_layers(params, 2)
    chex.assert_trees_all_equal_shapes(stacked, jax.eval_shape(lambda: init_params(scanned, jax.random.key(0))))
    np.testing.assert_allclose(scanned.apply({"params": stacked}, ids, mask), ref, atol=1e-5)  # not jitted
    chex.assert_trees_all_equal(unstack_layers(stacked, 2), params)
    full = Transformer(model.config.replace(remat="full"))
    loss = lambda m, p: m.apply({"params": p}, ids, mask).sum()  # noqa: E731
    # Both gradients in one compiled program (one compile instead of two).
    g_ref, g_remat = jax.jit(lambda p: (jax.grad(lambda q: loss(model, q))(p), jax.grad(lambda q: loss(full, q))(p)))(
        params)
    chex.assert_trees_all_close(g_remat, g_ref, atol=1e-4)


def test_bf16_compute_is_finite_and_close_to_f32():
    model, params = make("llama")
    ids, mask = rand_ids((2, 5)), jnp.array([[0, 1, 1, 1, 1], [1] * 5], jnp.int32)
    ref = jitted(model)({"params": params}, ids, mask)  # [2, 5]: compiled by the packing test already
    bf = Transformer(model.config.replace(dtype=jnp.bfloat16))
    out = jax.jit(bf.apply)({"params": params}, ids, mask)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out).all())
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.1)
    pb = Transformer(model.config.replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    p16 = jax.eval_shape(lambda: init_params(pb, jax.random.key(0)))  # init's output dtypes, no compile
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
    abstract = jax.eval_shape(lambda: init_params(scalar, jax.random.key(0)))
    assert abstract["score"].shape == (32, 1) and "lm_head" not in abstract
    p = random_params(scalar)
    out = scalar.apply({"params": p}, rand_ids((1, 7)), jnp.ones((1, 7), jnp.int32))  # eager, like the padding test
    assert out.shape == (1, 7) and out.dtype == jnp.float32
    with pytest.raises(ValueError, match="head="):
        init_params(Transformer(model.config, head="value"), jax.random.key(0))


@pytest.mark.parametrize("n_in,x_shape,w_shape", [(1, (2, 5, 6), (6, 3, 4)), (2, (2, 5, 3, 4), (3, 4, 6)),
                                                  (1, (7, 6), (6, 5))])
def test_project_and_its_vjp_equal_the_einsum(n_in, x_shape, w_shape):
    """`project` (one 2-D GEMM, custom VJP with 2-D weight gradients) = the einsum and its autodiff."""
    from rlhf_jax.models.project import project
    kx, kw, kg = jax.random.split(jax.random.key(3), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    letters = "abcdefgh"
    lead = letters[: len(x_shape) - n_in]
    ins, outs = letters[4: 4 + n_in], "xyz"[: len(w_shape) - n_in]
    ref = lambda x, w: jnp.einsum(f"{lead}{ins},{ins}{outs}->{lead}{outs}", x, w)  # noqa: E731
    out_shape = x_shape[: len(x_shape) - n_in] + w_shape[n_in:]
    g = jax.random.normal(kg, out_shape)
    for fn in (project, jax.jit(project, static_argnums=2)):
        y, vjp = jax.vjp(lambda x, w: fn(x, w, n_in), x, w)
        y_ref, vjp_ref = jax.vjp(ref, x, w)
        chex.assert_shape(y, out_shape)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(vjp(g), vjp_ref(g)):
            chex.assert_equal_shape([got, want])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
