"""The ``[out, in]`` decode copy (`rlhf_jax.models.weight_layout`): same model, same tokens, one compile.

Every family (tied and untied heads, unrolled and scanned layers, with LoRA adapters): the converted params
have exactly the shapes the ``out_in`` model declares, its logits equal the ``in_out`` model's to float32
rounding, and greedy decoding gives the same tokens. The conversion compiles once per (scan, shardings); the
trainers' sampler with ``rollout.weight_layout: out_in`` gives the rollout of the training layout;
``for_decoding`` follows the backend, the size of the weights and ``RLHF_JAX_DECODE_LAYOUT``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import fixtures, models, rollout, sharding
from rlhf_jax.models import lora, weight_layout
from rlhf_jax.online.config import RolloutConfig
from rlhf_jax.online.sampler import Sampler

FAMILIES = ("gpt2", "llama", "llama3", "mistral", "qwen2", "qwen3")
V = 96


def _model(family, *, scan=False, lora_spec=None, tie=None):
    cfg = models.ModelConfig.from_hf(fixtures.tiny_config(family, vocab_size=V, hidden=32, max_positions=128,
                                                          tie_word_embeddings=tie))
    cfg = cfg.replace(initializer_range=0.2, scan_layers=scan, lora=lora_spec)
    model = models.Transformer(cfg, head="lm")
    params = models.init_params(model, jax.random.key(0))
    if lora_spec is not None:  # non-zero B, so the adapters change the logits
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 0.05 if getattr(p[-1], "key", "").endswith("_lora_b") else x, params)
    return model, params


def _ids(b=3, s=12):
    ids = jax.random.randint(jax.random.key(1), (b, s), 3, V)
    mask = jnp.ones((b, s), jnp.int32).at[0, :4].set(0)  # a left-padded row
    return ids, mask


def _shapes(tree):
    return jax.tree.map(lambda x: x.shape, tree)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("family", FAMILIES)
def test_out_in_copy_has_the_declared_shapes_and_the_same_logits(family, scan):
    model, params = _model(family, scan=scan)
    t_model, t_params = models.to_out_in(model, params)
    assert t_model.config.weight_layout == "out_in" and model.config.weight_layout == "in_out"
    assert _shapes(t_params) == _shapes(models.init_params(t_model, jax.random.key(0)))
    moved = {p[-1].key for (p, x), y in
             zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(t_params)) if x.shape != y.shape}
    assert {"q", "o", "down"} <= moved <= set(weight_layout.PROJECTIONS), moved  # the projections, only they
    ids, mask = _ids()
    a = model.apply({"params": params}, ids, mask)
    b = t_model.apply({"params": t_params}, ids, mask)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    # every [in…, out…] weight has its [out…, in…] twin, element for element
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(t_params)):
        perm = weight_layout._permutation(path, x.ndim, scan)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x if perm is None else jnp.transpose(x, perm)))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_lora_adapters_keep_their_shapes_and_the_logits(tie):
    spec = lora.LoRAConfig(rank=4, alpha=8.0, targets=("all", "lm_head") if not tie else ("all",)).spec()
    model, params = _model("llama", lora_spec=spec, tie=tie)
    t_model, t_params = models.to_out_in(model, params)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(t_params)):
        if "_lora_" in jax.tree_util.keystr(path):
            assert x.shape == y.shape, jax.tree_util.keystr(path)
    ids, mask = _ids()
    np.testing.assert_allclose(np.asarray(t_model.apply({"params": t_params}, ids, mask)),
                               np.asarray(model.apply({"params": params}, ids, mask)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_gives_the_same_tokens(family):
    model, params = _model(family)
    t_model, t_params = models.to_out_in(model, params)
    ids, mask = _ids(4, 9)
    kw = dict(max_new_tokens=10, temperature=0.0, eos_token_id=1, pad_token_id=0, key=jax.random.key(0))
    a = rollout.generate(model, params, ids, mask, **kw)
    b = rollout.generate(t_model, t_params, ids, mask, **kw)
    np.testing.assert_array_equal(np.asarray(b.response_ids_BxT), np.asarray(a.response_ids_BxT))
    np.testing.assert_array_equal(np.asarray(b.response_mask_BxT), np.asarray(a.response_mask_BxT))
    np.testing.assert_allclose(np.asarray(b.logp_BxT), np.asarray(a.logp_BxT), atol=1e-5)


def test_conversion_compiles_once_and_leaves_the_input_valid():
    model, params = _model("llama")
    weight_layout._transpose_fn.cache_clear()
    first = models.to_out_in(model, params)[1]
    fn = weight_layout._transpose_fn(False, None)
    second = models.to_out_in(model, jax.tree.map(lambda x: x * 1.0, params))[1]
    assert fn._cache_size() == 1  # one trace and compile for every later iteration of a sampler
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, first), jax.tree.map(np.asarray, second))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(first)):
        assert not a.is_deleted() and a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
    with pytest.raises(ValueError, match="already 'out_in'"):
        models.to_out_in(weight_layout.out_in_model(model), first)


def test_for_decoding_follows_the_backend_and_the_env_switch(monkeypatch):
    model, params = _model("qwen2")
    monkeypatch.delenv(weight_layout.ENV, raising=False)
    m, p = models.for_decoding(model, params)  # a tiny model: its weights stay in cache, nothing to gain
    assert m is model and p is params and weight_layout.projection_bytes(params) < weight_layout.MIN_PROJECTION_BYTES
    monkeypatch.setattr(weight_layout, "MIN_PROJECTION_BYTES", weight_layout.projection_bytes(params))
    m, _ = models.for_decoding(model, params)
    assert m.config.weight_layout == ("out_in" if jax.default_backend() == "cpu" else "in_out")
    monkeypatch.setenv(weight_layout.ENV, "in_out")
    m, p = models.for_decoding(model, params)
    assert m is model and p is params
    monkeypatch.setenv(weight_layout.ENV, "out_in")
    assert models.for_decoding(model, params)[0].config.weight_layout == "out_in"
    monkeypatch.setenv(weight_layout.ENV, "rows")
    with pytest.raises(ValueError, match="RLHF_JAX_DECODE_LAYOUT='rows'"):
        models.for_decoding(model, params)
    with pytest.raises(ValueError, match="weight_layout='rows'"):
        model.config.replace(weight_layout="rows")


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_sampler_with_out_in_layout_samples_the_training_layouts_rollout(scan):
    from rlhf_jax.data import PromptBatch
    from rlhf_jax.data.batching import pad_prompts

    model, params = _model("llama", scan=scan)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1), devices=jax.devices()[:1])
    params = jax.device_put(params, sharding.param_shardings(model, mesh))
    tok = type("Tok", (), {"eos_token_id": 1, "pad_token_id": 0})()
    ids, mask = pad_prompts([[5, 6, 7], [8, 9, 10, 11, 12], [13], [14, 15]], pad_token_id=0, buckets=(8,))
    batch = PromptBatch(prompt_ids_BxP=ids, prompt_mask_BxP=mask, index_B=np.arange(4))
    out = {}
    for layout in ("in_out", "out_in"):
        sampler = Sampler(model, tok, RolloutConfig(batch_size=4, max_new_tokens=8, weight_layout=layout), mesh)
        out[layout] = jax.tree.map(np.asarray, sampler(params, batch, jax.random.key(3), temperature=0.0))
        assert sampler.decode_model.config.weight_layout == layout
    for f in ("response_ids_BxT", "response_mask_BxT"):
        np.testing.assert_array_equal(getattr(out["out_in"], f), getattr(out["in_out"], f))
    np.testing.assert_allclose(out["out_in"].logp_BxT, out["in_out"].logp_BxT, atol=1e-5)
    assert out["in_out"].response_mask_BxT.sum() > 4
    with pytest.raises(ValueError, match="weight_layout"):
        RolloutConfig(weight_layout="columns")


def test_rollout_auto_layout_is_out_in_only_for_a_large_full_actor_on_cpu(monkeypatch):
    from rlhf_jax.online.sampler import out_in

    model, params = _model("llama")
    assert not out_in(model, "auto") and out_in(model, "out_in") and not out_in(model, "in_out")
    monkeypatch.setattr(weight_layout, "MIN_PROJECTION_BYTES", weight_layout.projection_bytes(params))
    assert out_in(model, "auto") == (jax.default_backend() == "cpu")  # "large" now
    spec = lora.LoRAConfig(rank=4, alpha=8.0, targets=("all",)).spec()
    assert not out_in(_model("llama", lora_spec=spec)[0], "auto")  # LoRA runs keep memory first
    assert not out_in(weight_layout.out_in_model(model), "auto")  # already [out, in]
