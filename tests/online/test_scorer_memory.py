"""`online.scoring.make_scorer` holds ONE reward model: it is read straight into `frozen_dtype` (no frozen copy
beside the loaded params, which was one more model in the peak host memory of every online run), with the
same values and scores as loading it and then casting it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import fixtures
from rlhf_jax import sharding as shd
from rlhf_jax.online import sampler as sampler_mod
from rlhf_jax.online.config import RewardConfig
from rlhf_jax.online.scoring import make_scorer, reward_model_scores
from rlhf_jax.train.run import ModelLoadConfig, load_model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scorer_memory")
    tok = fixtures.build_tokenizer(root / "tokenizer")
    kw = dict(tokenizer=tok, hidden=32, layers=2, heads=4, kv_heads=2, max_positions=64)
    return (fixtures.build_tiny_model(root / "policy", "llama", **kw),
            fixtures.build_tiny_model(root / "rm", "llama", head="scalar", **kw))


@pytest.mark.parametrize("frozen_dtype", ["float32", "bfloat16"])
def test_reward_model_loaded_once_in_frozen_dtype(model_dirs, frozen_dtype, monkeypatch):
    policy_dir, rm_dir = model_dirs
    mesh = shd.make_mesh(shd.MeshConfig())
    model_cfg = ModelLoadConfig(path=str(policy_dir))
    actor = load_model(model_cfg, mesh=mesh, head="lm")
    # what make_scorer held before: the reward model loaded in the model's dtype, then a cast copy
    old = load_model(ModelLoadConfig(path=str(rm_dir)), mesh=mesh, head="scalar", rules=shd.INFERENCE_RULES)
    old_params = sampler_mod.frozen_copy(old.params, old.shardings, frozen_dtype)

    def no_copy(*a, **k):
        raise AssertionError("make_scorer made a frozen copy of the reward model")

    monkeypatch.setattr(sampler_mod, "frozen_copy", no_copy)
    reward = RewardConfig(model_path=str(rm_dir), functions=(), normalize=False)
    scorer = make_scorer(reward, model_cfg=model_cfg, actor=actor, mesh=mesh, frozen_dtype=frozen_dtype)
    module, params, shardings = scorer.reward_model
    leaves, old_leaves = jax.tree.leaves(params), jax.tree.leaves(old_params)
    assert jax.tree.structure(params) == jax.tree.structure(old_params)
    assert {x.dtype for x in leaves} == {jnp.dtype(frozen_dtype)}
    for x, y in zip(leaves, old_leaves):  # the same values as load-then-cast, bit for bit
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)), np.asarray(y.astype(jnp.float32)))
        assert x.sharding == y.sharding
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 100, size=(3, 7)), jnp.int32)
    mask = jnp.ones_like(ids).at[0, :2].set(0)
    np.testing.assert_array_equal(np.asarray(reward_model_scores(module, params, ids, mask)),
                                  np.asarray(reward_model_scores(old.model, old_params, ids, mask)))


def test_reward_model_upcast_still_copies(model_dirs, monkeypatch):
    """A bf16 policy (model.dtype=bfloat16) with frozen_dtype=float32 keeps the old path: load in bf16, then
    the float32 frozen copy (loading the checkpoint straight in float32 would give other values)."""
    policy_dir, rm_dir = model_dirs
    mesh = shd.make_mesh(shd.MeshConfig())
    model_cfg = ModelLoadConfig(path=str(policy_dir), dtype="bfloat16")
    actor = load_model(model_cfg, mesh=mesh, head="lm")
    calls = []
    original = sampler_mod.frozen_copy
    monkeypatch.setattr(sampler_mod, "frozen_copy", lambda *a, **k: calls.append(1) or original(*a, **k))
    reward = RewardConfig(model_path=str(rm_dir), functions=(), normalize=False)
    scorer = make_scorer(reward, model_cfg=model_cfg, actor=actor, mesh=mesh, frozen_dtype="float32")
    assert calls == [1]
    assert {x.dtype for x in jax.tree.leaves(scorer.reward_model[1])} == {jnp.dtype(jnp.float32)}
