"""LoRA dropout (PEFT ``lora_dropout``): y = x W + (alpha/r) · (drop(x) A) B, drop(x) = x ⊙ m / (1 − p), only in
forwards given a dropout key (training steps); rate 0 or no key is the exact program without dropout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import Transformer, lora
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.transformer import dense

from .tiny import random_params

LLAMA = dict(model_type="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=8, intermediate_size=48, max_position_embeddings=64, norm_eps=1e-5, activation="silu")
D, P = 32, 0.25


def _spec(rate, rank=4):
    return lora.LoRAConfig(rank=rank, alpha=2.0 * rank, targets=("all",), dropout=rate).spec()


class One(nn.Module):
    """One LoRA-adapted projection ``q`` of width D → D (the module `dense` runs in)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        return dense(self, "q", x, self.param("q", nn.initializers.zeros, (D, D)), 1, ("embed", "mlp"))


def _one(rate, a, b, w, x, key=None):
    m = One(ModelConfig(**LLAMA).replace(lora=_spec(rate, rank=a.shape[1])))
    rngs = None if key is None else {lora.DROPOUT_RNG: key}
    return m.apply({"params": {"q": w, "q_lora_a": a, "q_lora_b": b}}, x, rngs=rngs)


def test_dropout_input_is_scaled_bernoulli_mask():
    x = jnp.arange(1.0, 4001.0).reshape(40, 100)
    got = np.asarray(lora.dropout_input(x, rate=P, key=jax.random.key(3)))
    kept = got != 0
    np.testing.assert_allclose(got[kept], np.asarray(x)[kept] / (1 - P), rtol=1e-6)
    assert abs(kept.mean() - (1 - P)) < 0.03  # 4000 draws: std of the rate ~0.007
    # jit and no-jit draw the same mask (values equal up to XLA's rewrite of the division)
    jitted = np.asarray(jax.jit(lambda k: lora.dropout_input(x, rate=P, key=k))(jax.random.key(3)))
    np.testing.assert_array_equal(jitted != 0, kept)
    np.testing.assert_allclose(jitted, got, rtol=1e-6)


def test_adapter_path_equals_hand_masked_version_and_base_path_is_untouched():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(1.0, 2.0, size=(3, 5, D)), jnp.float32)  # no zeros: a zero out = a dropped unit
    w = jnp.asarray(rng.normal(size=(D, D)), jnp.float32)
    key = jax.random.key(7)
    # A = B = I (rank D): the adapter path IS scale · drop(x), which reveals the mask
    eye = jnp.eye(D, dtype=jnp.float32)
    scale = 2.0
    branch = np.asarray(_one(P, eye, eye, w, x, key) - x @ w)
    mask = np.abs(branch) > 1e-4
    assert 0.6 < mask.mean() < 0.9  # about 1 − p of the units are kept
    np.testing.assert_allclose(branch[mask], scale * np.asarray(x)[mask] / (1 - P), rtol=1e-5)
    # random A, B, same key (same mask): y = x W + scale · ((x ⊙ m / (1 − p)) A) B, by numpy
    a = jnp.asarray(rng.normal(size=(D, 4)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(4, D)), jnp.float32)
    got = np.asarray(_one(P, a, b, w, x, key))
    xd = np.asarray(x) * mask / (1 - P)
    want = np.asarray(x) @ np.asarray(w) + (8.0 / 4) * (xd @ np.asarray(a)) @ np.asarray(b)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # no key (sampler, scoring, eval, export) or rate 0: no dropout, bit-identical to the plain branch
    plain = np.asarray(_one(0.0, a, b, w, x))
    np.testing.assert_array_equal(np.asarray(_one(P, a, b, w, x)), plain)
    np.testing.assert_array_equal(np.asarray(_one(0.0, a, b, w, x, key)), plain)


def test_gradients_flow_through_kept_units_only():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.uniform(1.0, 2.0, size=(1, 1, D)), jnp.float32)  # one token: one mask row
    w = jnp.asarray(rng.normal(size=(D, D)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(D, 4)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(4, D)), jnp.float32)
    key = jax.random.key(11)
    eye = jnp.eye(D, dtype=jnp.float32)
    kept = np.abs(np.asarray(_one(P, eye, eye, w, x, key) - x @ w))[0, 0] > 1e-4
    assert 0 < kept.sum() < D
    g_a = np.asarray(jax.grad(lambda a_: jnp.sum(_one(P, a_, b, w, x, key) ** 2))(a))
    assert np.all(g_a[~kept] == 0) and np.all(np.abs(g_a[kept]).sum(axis=1) > 0)
    # the gradient equals the hand-derived one: dA = scale · drop(x)ᵀ (dy Bᵀ), dy = 2 y
    y = np.asarray(_one(P, a, b, w, x, key))[0, 0]
    xd = np.asarray(x)[0, 0] * kept / (1 - P)
    np.testing.assert_allclose(g_a, 2.0 * np.outer(xd, (2 * y) @ np.asarray(b).T), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scan", [False, True])
def test_training_view_on_the_transformer(scan):
    c = ModelConfig(**LLAMA, scan_layers=scan)
    m0, mp = Transformer(c.replace(lora=_spec(0.0))), Transformer(c.replace(lora=_spec(P)))
    params = random_params(mp, seed=2)  # B random: the branch is live
    ids = jnp.asarray(np.arange(20).reshape(2, 10) % 64)
    mask = jnp.ones_like(ids)
    y0 = m0.apply({"params": params}, ids, mask)
    key = jax.random.key(5)
    # rate 0 or no key: the module itself, the same program
    assert lora.training(m0, key) is m0 and lora.training(mp, None) is mp
    np.testing.assert_array_equal(np.asarray(mp.apply({"params": params}, ids, mask)), np.asarray(y0))
    y1 = lora.training(mp, key).apply({"params": params}, ids, mask)
    y2 = lora.training(mp, key).apply({"params": params}, ids, mask)
    y3 = lora.training(mp, jax.random.key(6)).apply({"params": params}, ids, mask)
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))  # a key's masks are reproducible
    assert float(jnp.abs(y1 - y0).max()) > 1e-3 and float(jnp.abs(y1 - y3).max()) > 1e-3
    # the adapters-off reference (B = 0) is the base whatever the masks
    off = lora.adapters_off(params)
    np.testing.assert_array_equal(np.asarray(lora.training(mp, key).apply({"params": off}, ids, mask)),
                                  np.asarray(m0.apply({"params": off}, ids, mask)))


def test_dropout_config_range():
    assert lora.LoRAConfig(dropout=0.1).spec().dropout == 0.1
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="model.lora.dropout"):
            lora.LoRAConfig(dropout=bad)
