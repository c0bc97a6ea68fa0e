"""Tests for rlhf_jax/rollout/decode.py: log-probs equal a teacher-forced forward, greedy = argmax, EOS
masking, early stop, determinism, padding invariance, and a bounded number of traces."""

import pathlib
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, ops, rollout
from rlhf_jax.data.batching import pad_prompts
from rlhf_jax.rollout import decode, sampling

from .conftest import VOCAB, tiny_config

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))  # importlib mode: tests/compile_log.py
from compile_log import count_compiles  # noqa: E402

PAD = 0
T = 10  # most tests share (T, eos, temperature) so they reuse one compiled program
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], list(range(20, 33)), [40]]  # mixed lengths → left padding (P = 16)


def _batch(prompts=PROMPTS, buckets=(8, 16)):
    return pad_prompts(prompts, pad_token_id=PAD, buckets=buckets)


def _teacher_forced_logits(model, params, r: rollout.Rollout):
    logits = model.apply({"params": params}, r.ids_BxS, r.mask_BxS)
    return logits[:, r.prompt_length - 1 : -1]  # logits at s predict token s + 1


def _first_eos(ids_T, eos):
    hits = np.flatnonzero(np.isin(ids_T, eos))
    return int(hits[0]) if hits.size else None


def test_logp_matches_teacher_forced_every_family(family_model):
    family, model, params = family_model
    ids, mask = _batch()
    r = rollout.generate(model, params, ids, mask, key=jax.random.key(1), max_new_tokens=T,
                         eos_token_id=1, pad_token_id=PAD)
    chex.assert_shape([r.response_ids_BxT, r.response_mask_BxT, r.logp_BxT, r.sampling_logp_BxT], (4, T))
    chex.assert_shape(r.lengths_B, (4,))
    np.testing.assert_array_equal(r.prompt_ids_BxP, ids)
    tf_logp = ops.token_logprobs(_teacher_forced_logits(model, params, r), r.response_ids_BxT)
    m = np.asarray(r.response_mask_BxT, bool)
    assert m[:, 0].all()
    np.testing.assert_allclose(np.asarray(r.logp_BxT)[m], np.asarray(tf_logp)[m], atol=1e-5, rtol=0,
                               err_msg=family)
    np.testing.assert_array_equal(np.asarray(r.logp_BxT)[~m], 0.0)
    np.testing.assert_array_equal(r.logp_BxT, r.sampling_logp_BxT)  # no truncation at temperature 1


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 5, None), (1.3, None, 0.8), (0.9, 8, 0.9)])
def test_logp_convention_with_truncation(llama_model, temperature, top_k, top_p):
    model, params = llama_model
    ids, mask = _batch()
    r = rollout.generate(model, params, ids, mask, key=jax.random.key(2), max_new_tokens=8, temperature=temperature,
                         top_k=top_k, top_p=top_p, eos_token_id=1, pad_token_id=PAD)
    m = np.asarray(r.response_mask_BxT, bool)
    scaled = _teacher_forced_logits(model, params, r) / rollout.logprob_temperature(temperature)
    # logp_BxT: the temperature-scaled, untruncated distribution (what the trainer recomputes)
    np.testing.assert_allclose(np.asarray(r.logp_BxT)[m],
                               np.asarray(ops.token_logprobs(scaled, r.response_ids_BxT))[m], atol=1e-5)
    # sampling_logp_BxT: the truncated distribution the tokens were drawn from
    B, T, V = scaled.shape
    filtered = scaled.reshape(B * T, V)
    if top_k is not None:
        filtered = sampling.apply_top_k(filtered, top_k=top_k)
    if top_p is not None:
        filtered = sampling.apply_top_p(filtered, top_p=top_p)
    filtered = filtered.reshape(B, T, V)
    np.testing.assert_allclose(np.asarray(r.sampling_logp_BxT)[m],
                               np.asarray(ops.token_logprobs(filtered, r.response_ids_BxT))[m], atol=1e-5)
    picked = np.take_along_axis(np.asarray(filtered), np.asarray(r.response_ids_BxT)[..., None], -1)[..., 0]
    assert np.isfinite(picked[m]).all(), "a token outside the top-k/top-p set was sampled"
    assert (np.asarray(r.sampling_logp_BxT)[m] >= np.asarray(r.logp_BxT)[m] - 1e-6).all()


def test_greedy_is_argmax_of_teacher_forced(family_model):
    family, model, params = family_model
    ids, mask = _batch()
    r = rollout.generate(model, params, ids, mask, key=jax.random.key(0), max_new_tokens=T, temperature=0.0,
                         eos_token_id=1, pad_token_id=PAD)
    logits = np.asarray(_teacher_forced_logits(model, params, r))
    m = np.asarray(r.response_mask_BxT, bool)
    chosen = np.take_along_axis(logits, np.asarray(r.response_ids_BxT)[..., None], -1)[..., 0]
    np.testing.assert_allclose(chosen[m], logits.max(-1)[m], atol=1e-5, err_msg=family)
    np.testing.assert_allclose(np.asarray(r.logp_BxT)[m],
                               np.asarray(ops.token_logprobs(jnp.asarray(logits), r.response_ids_BxT))[m], atol=1e-5)
    r2 = rollout.generate(model, params, ids, mask, key=jax.random.key(9), max_new_tokens=T, temperature=0.0,
                          eos_token_id=1, pad_token_id=PAD)
    np.testing.assert_array_equal(r.response_ids_BxT, r2.response_ids_BxT)  # greedy ignores the key


def test_padding_and_batch_mates_do_not_change_a_row(llama_model):
    model, params = llama_model
    kw = dict(key=jax.random.key(0), max_new_tokens=T, temperature=0.0, eos_token_id=1, pad_token_id=PAD)
    alone = rollout.generate(model, params, *_batch([PROMPTS[1]], buckets=(2,)), **kw)
    batched = rollout.generate(model, params, *_batch(), **kw)  # same prompt, 14 pad slots, other rows
    np.testing.assert_array_equal(alone.response_ids_BxT[0], batched.response_ids_BxT[1])
    np.testing.assert_allclose(alone.logp_BxT[0], batched.logp_BxT[1], atol=1e-5)


@pytest.mark.parametrize("eos", ["int", "tuple"])
def test_eos_masking(llama_model, eos):
    model, params = llama_model
    eos_ids = (3,) if eos == "int" else tuple(range(2, VOCAB, 4))  # a quarter of the vocab ends a response
    ids, mask = _batch()
    r = rollout.generate(model, params, ids, mask, key=jax.random.key(4), max_new_tokens=16, temperature=2.0,
                         eos_token_id=eos_ids[0] if eos == "int" else eos_ids, pad_token_id=PAD)
    resp, m, logp = (np.asarray(x) for x in (r.response_ids_BxT, r.response_mask_BxT, r.logp_BxT))
    saw_eos = False
    for b in range(resp.shape[0]):
        e = _first_eos(resp[b], eos_ids)
        n = 16 if e is None else e + 1
        saw_eos |= e is not None
        np.testing.assert_array_equal(m[b], np.arange(16) < n)
        np.testing.assert_array_equal(resp[b, n:], PAD)
        np.testing.assert_array_equal(logp[b, n:], 0.0)
        assert (logp[b, :n] < 0).all()
        assert int(r.lengths_B[b]) == n
    np.testing.assert_array_equal(r.mask_BxS, np.concatenate([mask, m], 1))
    if eos == "tuple":
        assert saw_eos


def test_min_new_tokens_suppresses_eos(llama_model):
    model, params = llama_model
    eos_ids = tuple(range(2, VOCAB, 2))  # half the vocab
    r = rollout.generate(model, params, *_batch(), key=jax.random.key(5), max_new_tokens=10, min_new_tokens=4,
                         eos_token_id=eos_ids, pad_token_id=PAD)
    resp = np.asarray(r.response_ids_BxT)
    assert not np.isin(resp[:, :4], eos_ids).any()
    assert (np.asarray(r.lengths_B) >= 4).all()
    assert (np.asarray(r.sampling_logp_BxT)[:, :4] > np.asarray(r.logp_BxT)[:, :4]).all()  # renormalised q


_CALLS = []


class _CountingModel:
    """Wraps a model; counts forward passes that actually run (host callback per call)."""

    def __init__(self, model):
        self.model, self.config = model, model.config

    def apply(self, *args, **kwargs):
        jax.debug.callback(lambda: _CALLS.append(1))
        return self.model.apply(*args, **kwargs)


def test_stops_early_when_every_row_finished(llama_model):
    model, params = llama_model
    counting = _CountingModel(model)
    ids, mask = _batch()  # P = 16: 1 prefill call + one call per decode step
    kw = dict(key=jax.random.key(6), max_new_tokens=32, pad_token_id=PAD)
    _CALLS.clear()
    r = jax.block_until_ready(rollout.generate(counting, params, ids, mask, eos_token_id=tuple(range(VOCAB)), **kw))
    assert len(_CALLS) == 1 + 1 and (np.asarray(r.lengths_B) == 1).all()
    _CALLS.clear()
    eos_ids = tuple(range(2, VOCAB, 3))
    r = jax.block_until_ready(rollout.generate(counting, params, ids, mask, eos_token_id=eos_ids, temperature=2.0,
                                               **kw))
    longest = int(np.max(r.lengths_B))
    assert longest < 32
    assert len(_CALLS) == 1 + longest


def test_deterministic_for_a_key(llama_model):
    model, params = llama_model
    ids, mask = _batch()
    run = lambda k: rollout.generate(model, params, ids, mask, key=jax.random.key(k), max_new_tokens=T,  # noqa: E731
                                     eos_token_id=1, pad_token_id=PAD)
    a, b, c = run(7), run(7), run(8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.response_ids_BxT, c.response_ids_BxT)


def test_new_params_do_not_retrace(llama_model):
    model, params = llama_model
    ids, mask = _batch()
    kw = dict(key=jax.random.key(0), max_new_tokens=T, eos_token_id=1, pad_token_id=PAD)
    first = rollout.generate(model, params, ids, mask, **kw)
    with count_compiles() as compiles:
        for scale in (1.5, 2.0, 3.0):
            new = jax.tree.map(lambda p: p * scale, params)
            out = rollout.generate(model, new, ids, mask, **kw)
    assert compiles["jit(_generate_impl)"] == 0, compiles
    assert not np.array_equal(first.logp_BxT, out.logp_BxT)  # the new params were really used


def test_bucketed_dataset_compiles_one_program_per_bucket(llama_model):
    model, params = llama_model
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, size=16)
    prompts = [list(rng.integers(2, VOCAB, size=n)) for n in lengths]
    buckets = (8, 16, 32, 64)
    used = set()
    with count_compiles() as compiles:
        for i in range(0, 16, 2):
            ids, mask = pad_prompts(prompts[i:i + 2], pad_token_id=PAD, buckets=buckets)
            used.add(ids.shape[1])
            rollout.generate(model, params, ids, mask, key=jax.random.key(i), max_new_tokens=4, eos_token_id=1,
                             pad_token_id=PAD, temperature=0.9)
    assert len(used) >= 2
    assert 1 <= compiles["jit(_generate_impl)"] <= len(used), compiles  # at most one program per bucket


def test_rollout_crosses_jit(llama_model):
    model, params = llama_model
    r = rollout.generate(model, params, *_batch(), key=jax.random.key(0), max_new_tokens=T, eos_token_id=1,
                         pad_token_id=PAD)
    total = jax.jit(lambda ro: (ro.ids_BxS.shape, jnp.sum(ro.logp_BxT * ro.response_mask_BxT)))
    shape, s = total(r)
    assert shape == (4, 16 + T)
    np.testing.assert_allclose(s, np.sum(np.asarray(r.logp_BxT)), rtol=1e-6)
    np.testing.assert_array_equal(r.loss_mask_BxS[:, :16], 0)
    np.testing.assert_array_equal(r.loss_mask_BxS[:, 16:], r.response_mask_BxT)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_prompt_repeats_equal_sampling_repeated_prompts(llama_model, temperature):
    """R samples per prompt with the prefill shared equal sampling the host-repeated prompts (np.repeat order):
    same tokens, same masks, log-probs equal to float rounding (the prefill ran on U rows instead of U·R)."""
    model, params = llama_model
    ids, mask = _batch()
    kw = dict(key=jax.random.key(5), max_new_tokens=T, eos_token_id=1, pad_token_id=PAD, temperature=temperature)
    shared = rollout.generate(model, params, ids, mask, prompt_repeats=3, **kw)
    plain = rollout.generate(model, params, np.repeat(ids, 3, axis=0), np.repeat(mask, 3, axis=0), **kw)
    chex.assert_shape([shared.response_ids_BxT, shared.logp_BxT], (12, T))
    np.testing.assert_array_equal(shared.prompt_ids_BxP, np.repeat(ids, 3, axis=0))
    np.testing.assert_array_equal(shared.prompt_mask_BxP, np.repeat(mask, 3, axis=0))
    np.testing.assert_array_equal(shared.response_ids_BxT, plain.response_ids_BxT)
    np.testing.assert_array_equal(shared.response_mask_BxT, plain.response_mask_BxT)
    np.testing.assert_allclose(shared.logp_BxT, plain.logp_BxT, atol=1e-5, rtol=0)
    if temperature > 0:  # the R samples of a prompt differ (they are not copies of one sample)
        assert len({tuple(r) for r in np.asarray(shared.response_ids_BxT)[:3]}) > 1
    tf_logp = ops.token_logprobs(_teacher_forced_logits(model, params, shared), shared.response_ids_BxT)
    m = np.asarray(shared.response_mask_BxT, bool)
    if temperature > 0:
        np.testing.assert_allclose(np.asarray(shared.logp_BxT)[m], np.asarray(tf_logp)[m], atol=1e-5, rtol=0)


def test_prompt_repeats_prefill_runs_on_distinct_prompts_only():
    """The compiled prefill's activations are [U, P-1, D], not [U·R, P-1, D]."""
    model = models.Transformer(tiny_config("llama").replace(hidden_size=72, num_heads=4, num_kv_heads=4,
                                                            head_dim=18), head="lm")
    params = models.init_params(model, jax.random.key(0))
    ids, mask = _batch()
    settings = decode.SamplingSettings(max_new_tokens=T, temperature=1.0, top_k=None, top_p=None, eos_token_ids=(1,),
                                       pad_token_id=PAD, min_new_tokens=0, cache_dtype=None, prompt_repeats=4)
    hlo = decode._compiled(model, settings, None, None, ()).lower(params, ids, mask, jax.random.key(0)).as_text()
    assert "tensor<4x15x72xf32>" in hlo  # prefill over the U = 4 prompts
    assert "tensor<16x15x72xf32>" not in hlo  # never over the 16 decode rows
    assert "tensor<16x1x72xf32>" in hlo  # the decode runs all 16 rows


def test_bad_inputs_raise(llama_model):
    model, params = llama_model
    ids, mask = _batch()
    kw = dict(key=jax.random.key(0), max_new_tokens=4, eos_token_id=1, pad_token_id=PAD)
    right = np.ascontiguousarray(mask[:, ::-1])
    with pytest.raises(ValueError, match=r"LEFT-padded.*rows \[0, 1, 2, 3\]"):
        rollout.generate(model, params, ids, right, **kw)
    empty = mask.copy()
    empty[2] = 0
    with pytest.raises(ValueError, match=r"rows \[2\] have no real token"):
        rollout.generate(model, params, ids, empty, **kw)
    with pytest.raises(ValueError, match="max_new_tokens"):
        rollout.generate(model, params, ids, mask, **{**kw, "max_new_tokens": 0})
    with pytest.raises(ValueError, match="eos_token_id"):
        rollout.generate(model, params, ids, mask, **{**kw, "eos_token_id": ()})
    with pytest.raises(ValueError, match="top_p"):
        rollout.generate(model, params, ids, mask, top_p=1.5, **kw)
    with pytest.raises(ValueError, match="prompt_repeats"):
        rollout.generate(model, params, ids, mask, prompt_repeats=0, **kw)


def test_compiled_program_updates_cache_in_place_and_skips_prefill_logits():
    """The KV cache is carried through the while_loop without copies, and the prefill's [B, P-1, V] LM-head
    product is dead code (only single-token logits are ever computed)."""
    V = 112  # distinct from every other width of the fixture, so shapes with V identify the LM head
    model = models.Transformer(tiny_config("llama").replace(vocab_size=V), head="lm")
    params = models.init_params(model, jax.random.key(0))
    ids, mask = _batch()
    settings = decode.SamplingSettings(max_new_tokens=T, temperature=1.0, top_k=None, top_p=None, eos_token_ids=(1,),
                                       pad_token_id=PAD, min_new_tokens=0, cache_dtype=None)
    lowered = decode._compiled(model, settings, None, None, ()).lower(params, ids, mask, jax.random.key(0))
    hlo = lowered.compile().as_text()
    c = model.config
    cache_shape = f"f32[{c.num_layers},4,{16 + T},{c.num_kv_heads},{c.head_dim}]"
    assert " while(" in hlo
    copies = [ln for ln in hlo.splitlines() if " copy(" in ln and ln.split("=")[1].strip().startswith(cache_shape)]
    assert not copies, copies[:3]
    assert f"[4,15,{V}]" not in hlo and f"[60,{V}]" not in hlo
    assert f"f32[4,1,{V}]" in hlo or f"f32[4,{V}]" in hlo
