"""Tests for rlhf_jax.train.optim: schedule values, decay mask policy, clipping, AdamW vs a numpy oracle."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.run_config import OptimConfig
from rlhf_jax.train.optim import decay_mask, make_optimizer, make_schedule

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
