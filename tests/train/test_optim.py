"""Tests for rlhf_jax.train.optim: schedule values, decay mask policy, clipping, AdamW vs a numpy oracle."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.config import ConfigError
from rlhf_jax.run_config import OptimConfig
from rlhf_jax.train.optim import decay_mask, lora_plus_mask, make_optimizer, make_schedule

PARAMS = {
    "embed": {"embedding": jnp.ones((10, 4))},
    "block_0": {
        "attn": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))},
        "ln_1": {"scale": jnp.ones((4,))},
        "mlp": {"kernel": jnp.full((4, 8), 2.0)},
    },
    "wte": jnp.ones((10, 4)),
}


@pytest.mark.parametrize(
    "schedule, expected",
    [
        # warmup 2, total 6, peak 1.0, min ratio 0.2 → decay over u = (t-2)/4
        ("constant", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [0.0, 0.5, 1.0, 0.8, 0.6, 0.4, 0.2]),
        ("cosine", [0.0, 0.5] + [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * u / 4)) for u in range(5)]),
    ],
)
def test_schedule_golden(schedule, expected):
    cfg = OptimConfig(learning_rate=1.0, schedule=schedule, warmup_steps=2, min_lr_ratio=0.2)
    fn = make_schedule(cfg, total_steps=6)
    got = [float(fn(t)) for t in range(7)]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(jax.jit(fn)(jnp.int32(4))), expected[4], rtol=1e-6)


def test_schedule_rejects_warmup_beyond_total():
    with pytest.raises(ValueError, match="warmup_steps"):
        make_schedule(OptimConfig(schedule="cosine", warmup_steps=10), total_steps=10)


def test_decay_mask_policy():
    mask = decay_mask(PARAMS, no_decay_patterns=OptimConfig().no_decay_patterns)
    assert mask == {
        "embed": {"embedding": False},
        "block_0": {"attn": {"kernel": True, "bias": False}, "ln_1": {"scale": False}, "mlp": {"kernel": True}},
        "wte": False,
    }
    abstract = jax.eval_shape(lambda: PARAMS)
    assert decay_mask(abstract, no_decay_patterns=()) == jax.tree.map(lambda x: x.ndim >= 2, PARAMS)


def test_adamw_step_matches_numpy_oracle_with_mask_and_clip():
    cfg = OptimConfig(learning_rate=0.1, weight_decay=0.5, max_grad_norm=1.0, b1=0.9, b2=0.99, eps=1e-8)
    tx = make_optimizer(cfg, total_steps=10)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), PARAMS)
    updates, _ = jax.jit(tx.update)(grads, tx.init(PARAMS), PARAMS)
    gnorm = math.sqrt(sum(9.0 * x.size for x in jax.tree.leaves(PARAMS)))
    g = 3.0 / gnorm  # clipped gradient, every entry equal
    m, v = 0.1 * g, 0.01 * g * g  # first step moments
    adam = (m / 0.1) / (math.sqrt(v / 0.01) + 1e-8)  # bias-corrected
    mask = decay_mask(PARAMS, no_decay_patterns=cfg.no_decay_patterns)

    def expected(p, decays):
        return -0.1 * (adam + (0.5 * np.asarray(p) if decays else 0.0))

    want = jax.tree.map(expected, PARAMS, mask)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), updates, want)


def test_no_clip_when_max_grad_norm_is_none():
    tx = make_optimizer(OptimConfig(learning_rate=1.0, max_grad_norm=None), total_steps=1)
    p = {"w": jnp.zeros((2, 2))}
    upd, _ = tx.update({"w": jnp.full((2, 2), 100.0)}, tx.init(p), p)
    ref = optax.adamw(1.0, weight_decay=0.0)
    want, _ = ref.update({"w": jnp.full((2, 2), 100.0)}, ref.init(p), p)
    np.testing.assert_allclose(upd["w"], want["w"], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ LoRA+
LORA_PARAMS = {
    "layers_0": {"attn": {"q": jnp.ones((4, 2, 2)), "q_lora_a": jnp.full((4, 2), 0.5),
                          "q_lora_b": jnp.full((2, 2, 2), 0.25)},
                 "mlp": {"up_lora_a": jnp.full((4, 2), 0.5), "up_lora_b": jnp.full((2, 8), 0.25)}},
    "score": jnp.ones((4, 1)),
}


def test_lora_plus_mask_marks_only_b_leaves():
    assert lora_plus_mask(LORA_PARAMS) == {
        "layers_0": {"attn": {"q": False, "q_lora_a": False, "q_lora_b": True},
                     "mlp": {"up_lora_a": False, "up_lora_b": True}},
        "score": False,
    }
    assert lora_plus_mask(jax.eval_shape(lambda: LORA_PARAMS)) == lora_plus_mask(LORA_PARAMS)


@pytest.mark.parametrize("jit", [False, True])
def test_lora_plus_step_golden_with_decay_and_clip(jit):
    """One AdamW step, grads all 3 (clipped to global norm 1), lr 0.1, decay 0.5 on rank >= 2 leaves, ratio 16:
    every update is -0.1·(adam + 0.5·p); B's is 16 times that (its decay too), A's and the head's unchanged."""
    cfg = OptimConfig(learning_rate=0.1, weight_decay=0.5, max_grad_norm=1.0, b1=0.9, b2=0.99, eps=1e-8,
                      lora_plus_ratio=16.0)
    tx = make_optimizer(cfg, total_steps=10)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), LORA_PARAMS)
    update = jax.jit(tx.update) if jit else tx.update
    updates, _ = update(grads, tx.init(LORA_PARAMS), LORA_PARAMS)
    g = 3.0 / math.sqrt(sum(9.0 * x.size for x in jax.tree.leaves(LORA_PARAMS)))
    adam = ((0.1 * g) / 0.1) / (math.sqrt(0.01 * g * g / 0.01) + 1e-8)
    want = jax.tree.map(lambda p, b: -0.1 * (16.0 if b else 1.0) * (adam + 0.5 * np.asarray(p)),
                        LORA_PARAMS, lora_plus_mask(LORA_PARAMS))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), updates, want)
    # hand values: adam = 1 (to 1e-7), so A: -0.1·(1 + 0.25) = -0.125; B: -1.6·(1 + 0.125) = -1.8
    np.testing.assert_allclose(updates["layers_0"]["attn"]["q_lora_a"], -0.125, rtol=1e-5)
    np.testing.assert_allclose(updates["layers_0"]["attn"]["q_lora_b"], -1.8, rtol=1e-5)


def test_lora_plus_ratio_one_is_the_plain_optimizer():
    """The default ratio builds exactly the old chain: same optimizer-state tree, bit-identical updates."""
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3) * jnp.arange(p.size).reshape(p.shape), LORA_PARAMS)
    cfg = OptimConfig(learning_rate=0.01, weight_decay=0.1)
    old = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        make_schedule(cfg, 5), weight_decay=0.1, mask=lambda p: decay_mask(p, no_decay_patterns=cfg.no_decay_patterns)))
    new = make_optimizer(cfg, total_steps=5)
    s_old, s_new = old.init(LORA_PARAMS), new.init(LORA_PARAMS)
    assert jax.tree.structure(s_old) == jax.tree.structure(s_new)
    for _ in range(2):
        u_old, s_old = old.update(grads, s_old, LORA_PARAMS)
        u_new, s_new = new.update(grads, s_new, LORA_PARAMS)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), u_new, u_old)


def test_lora_plus_ratio_must_be_positive():
    with pytest.raises(ConfigError, match="lora_plus_ratio"):
        OptimConfig(lora_plus_ratio=0.0)


def test_lora_plus_ratio_equals_a_larger_scale_under_adam():
    """Why alpha and lora_plus_ratio are one knob for B under Adam (README "Results", LoRA+): Adam's update is
    invariant to the gradient's scale, so training (A, B) with scale c·s at lr η gives the same ΔW = c·s·A B as
    training (A, B') with scale s and B' at c·η (B' = c·B all along). No clipping; eps made negligible."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x, y = jax.random.normal(k1, (16, 6)), jax.random.normal(k2, (16, 5))
    a0 = jax.random.uniform(k3, (6, 2), minval=-0.4, maxval=0.4)

    def train(scale, ratio):
        p = {"w_lora_a": a0, "w_lora_b": jnp.zeros((2, 5))}
        tx = make_optimizer(OptimConfig(learning_rate=0.01, eps=1e-12, max_grad_norm=None, lora_plus_ratio=ratio), 9)
        s = tx.init(p)
        loss = lambda p: jnp.mean((x @ (scale * p["w_lora_a"] @ p["w_lora_b"]) - y) ** 2)  # noqa: E731
        for _ in range(8):
            u, s = tx.update(jax.grad(loss)(p), s, p)
            p = optax.apply_updates(p, u)
        return scale * p["w_lora_a"] @ p["w_lora_b"]

    np.testing.assert_allclose(train(8.0, 1.0), train(2.0, 4.0), rtol=2e-4, atol=1e-6)
    assert not np.allclose(train(2.0, 4.0), train(2.0, 1.0), rtol=0.05)  # the ratio does change the run
