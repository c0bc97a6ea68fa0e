"""Generic train step: accumulation invariance (1xB == 4xB/4 == numpy oracle), NaN stop/skip, rng, jit cache."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import ops
from rlhf_jax.train.state import TrainState, init_train_state
from rlhf_jax.train.step import (NonFiniteError, StepMetrics, check_finite, make_train_step,
                                 split_micro_batches, train_step_fn)


class ToyBatch(NamedTuple):
    x_BxTxD: jax.Array
    y_BxT: jax.Array
    mask_BxT: jax.Array


class ToyAux(NamedTuple):
    correct: jax.Array


def toy_loss(params, batch: ToyBatch, key):
    """Per-token softmax cross-entropy of a linear model, token-mean via ops.aggregate."""
    del key
    logits_BxTxV = jnp.einsum("btd,dv->btv", batch.x_BxTxD, params["w"]) + params["b"]
    logp_BxT = ops.token_logprobs(logits_BxTxV, batch.y_BxT)
    loss_sum, count = ops.aggregate(-logp_BxT, batch.mask_BxT, mode="token-mean")
    correct = jnp.sum((jnp.argmax(logits_BxTxV, -1) == batch.y_BxT) * batch.mask_BxT)
    return (loss_sum, count), ToyAux(correct=correct.astype(jnp.float32))


def make_data(B=8, T=5, D=3, V=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    y = rng.integers(0, V, size=(B, T)).astype(np.int32)
    lengths = rng.integers(0, T + 1, size=B)  # uneven counts: a mean of micro-batch means would differ
    lengths[0] = T
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    params = {"w": rng.normal(size=(D, V)).astype(np.float32) * 0.5, "b": np.zeros(V, np.float32)}
    return jax.tree.map(jnp.asarray, params), ToyBatch(jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask))


def numpy_oracle(params, batch):
    """Token-mean CE and its gradient over the whole batch, by hand in numpy (float64)."""
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    x, y, m = (np.asarray(a) for a in batch)
    logits = np.einsum("btd,dv->btv", x, w) + b
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(w.shape[1])[y]
    n = m.sum()
    loss = -(np.log((p * onehot).sum(-1)) * m).sum() / n
    dlogits = (p - onehot) * m[..., None] / n
    return loss, np.einsum("btd,btv->dv", x, dlogits), dlogits.sum((0, 1))


def run_one(params, batch, *, M, tx=None, policy_unused=None):
    tx = tx or optax.sgd(1.0)
    state = init_train_state(params, tx)
    step = make_train_step(toy_loss, tx=tx, num_micro_batches=M, donate=False)
    return step(state, batch, jax.random.key(0))


class TestAccumulation:
    @pytest.mark.parametrize("M", [1, 2, 4, 8])
    def test_matches_numpy_oracle(self, M):
        params, batch = make_data()
        loss, gw, gb = numpy_oracle(params, batch)
        state, metrics = run_one(params, batch, M=M)
        # SGD with lr 1: new = old - grad
        np.testing.assert_allclose(np.asarray(params["w"]) - np.asarray(state.params["w"]), gw, atol=1e-6)
        np.testing.assert_allclose(np.asarray(params["b"]) - np.asarray(state.params["b"]), gb, atol=1e-6)
        np.testing.assert_allclose(float(metrics.loss), loss, rtol=1e-6)
        assert float(metrics.count) == float(np.asarray(batch.mask_BxT).sum())
        np.testing.assert_allclose(float(metrics.grad_norm), np.sqrt((gw ** 2).sum() + (gb ** 2).sum()),
                                   rtol=1e-5)

    def test_1xB_equals_4xBquarter_with_adam(self):
        params, batch = make_data(B=16, seed=1)
        tx = optax.adamw(1e-2)
        s1, m1 = run_one(params, batch, M=1, tx=tx)
        s4, m4 = run_one(params, batch, M=4, tx=tx)
        chex.assert_trees_all_close(s1.params, s4.params, atol=1e-6)
        chex.assert_trees_all_close(s1.opt_state, s4.opt_state, atol=1e-6)
        np.testing.assert_allclose(float(m1.loss), float(m4.loss), rtol=1e-6)
        np.testing.assert_allclose(float(m1.aux.correct), float(m4.aux.correct))

    def test_aux_sums_over_micro_batches(self):
        params, batch = make_data()
        _, metrics = run_one(params, batch, M=4)
        (_, _), aux = toy_loss(params, batch, None)
        assert float(metrics.aux.correct) == float(aux.correct)

    def test_split_is_strided_and_checks_divisibility(self):
        x = jnp.arange(8)
        np.testing.assert_array_equal(split_micro_batches(x, 4), [[0, 4], [1, 5], [2, 6], [3, 7]])
        with pytest.raises(ValueError, match="not divisible by num_micro_batches=3"):
            split_micro_batches(x, 3)

    def test_jit_matches_no_jit_and_compiles_once(self):
        params, batch = make_data()
        tx = optax.adam(1e-2)
        raw = train_step_fn(toy_loss, tx=tx, num_micro_batches=2)
        s_raw, m_raw = raw(init_train_state(params, tx), batch, jax.random.key(0))
        step = make_train_step(toy_loss, tx=tx, num_micro_batches=2)
        state = init_train_state(params, tx)
        state, m_jit = step(state, batch, jax.random.key(0))
        chex.assert_trees_all_close(s_raw.params, state.params, atol=1e-6)
        for _ in range(3):
            state, _ = step(state, batch, jax.random.key(0))
        assert step._cache_size() == 1
        assert int(state.step) == 4

    def test_zero_count_gives_zero_gradient(self):
        params, batch = make_data()
        batch = batch._replace(mask_BxT=jnp.zeros_like(batch.mask_BxT))
        state, metrics = run_one(params, batch, M=2)
        chex.assert_trees_all_close(state.params, params)
        assert bool(metrics.finite) and float(metrics.loss) == 0.0


class TestNonFiniteGuard:
    def _nan_batch(self):
        params, batch = make_data()
        x = batch.x_BxTxD.at[0, 0, 0].set(jnp.nan)
        return params, batch._replace(x_BxTxD=x)

    def test_skip_keeps_state_and_counts(self):
        params, batch = self._nan_batch()
        tx = optax.adam(1e-2)
        state = init_train_state(params, tx)
        step = make_train_step(toy_loss, tx=tx, donate=False)
        new, metrics = step(state, batch, jax.random.key(0))
        assert not bool(metrics.finite)
        chex.assert_trees_all_close(new.params, params)
        chex.assert_trees_all_close(new.opt_state, state.opt_state)
        assert int(new.num_skipped) == 1 and int(metrics.num_skipped) == 1
        assert int(new.step) == 1
        check_finite(jax.device_get(metrics), nan_policy="skip")  # no raise
        # a good batch afterwards updates normally
        _, good = make_data()
        new2, m2 = step(new, good, jax.random.key(0))
        assert bool(m2.finite) and int(new2.num_skipped) == 1
        assert not np.allclose(np.asarray(new2.params["w"]), np.asarray(params["w"]))

    def test_stop_raises_with_step_number(self):
        params, batch = self._nan_batch()
        tx = optax.sgd(0.1)
        step = make_train_step(toy_loss, tx=tx, donate=False)
        state = init_train_state(params, tx)
        _, good = make_data()
        state, m0 = step(state, good, jax.random.key(0))
        state, m1 = step(state, batch, jax.random.key(0))
        check_finite(jax.device_get(m0), nan_policy="stop")
        with pytest.raises(NonFiniteError, match="step 1"):
            check_finite(jax.device_get(m1), nan_policy="stop")
        assert np.all(np.isfinite(np.asarray(state.params["w"])))

    def test_inf_in_gradient_only(self):
        params, batch = make_data()
        params = {**params, "w": params["w"].at[0, 0].set(jnp.inf)}
        _, metrics = run_one(params, batch, M=1)
        assert not bool(metrics.finite)

    def test_bad_policy(self):
        with pytest.raises(ValueError, match="nan_policy"):
            check_finite(StepMetrics(*([jnp.array(1.0)] * 8)), nan_policy="ignore")


def test_key_depends_on_step_and_micro_batch():
    """loss_fn receives fold_in(fold_in(key, step), m): distinct per micro-batch, reproducible."""
    seen = []

    def loss(params, batch, key):
        u = jax.random.uniform(key)
        return (jnp.sum(params["w"]) * 0 + u, jnp.array(1.0)), ToyAux(correct=u)

    params = {"w": jnp.ones(2)}
    batch = ToyBatch(jnp.zeros((4, 1, 1)), jnp.zeros((4, 1), jnp.int32), jnp.ones((4, 1), jnp.int32))
    tx = optax.sgd(0.1)
    step = make_train_step(loss, tx=tx, num_micro_batches=2, donate=False)
    state = init_train_state(params, tx)
    key = jax.random.key(3)
    _, m_a = step(state, batch, key)
    _, m_b = step(state, batch, key)
    k = jax.random.fold_in(key, 0)
    want = jax.random.uniform(jax.random.fold_in(k, 0)) + jax.random.uniform(jax.random.fold_in(k, 1))
    np.testing.assert_allclose(float(m_a.aux.correct), float(want), rtol=1e-6)
    assert float(m_a.aux.correct) == float(m_b.aux.correct)
    state1 = state.replace(step=jnp.ones((), jnp.int32))
    _, m_c = step(state1, batch, key)
    assert float(m_c.aux.correct) != float(m_a.aux.correct)


_MULTIDEVICE = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_default_matmul_precision", "highest")
    import chex, numpy as np, optax
    from rlhf_jax import sharding as shd
    from rlhf_jax.train.state import create_train_state, init_train_state
    from rlhf_jax.train.step import make_train_step
    from tests.train.test_step import make_data, toy_loss
    params, batch = make_data(B=16, seed=2)
    tx = optax.adamw(1e-2)
    ref_state = init_train_state(params, tx)
    ref, ref_m = make_train_step(toy_loss, tx=tx, donate=False)(ref_state, batch, jax.random.key(0))
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=1))
    rep = shd.replicated(mesh)
    p_sh = jax.tree.map(lambda _: rep, params)
    placed = jax.device_put(params, p_sh)
    state, st_sh = create_train_state(placed, tx, mesh=mesh, params_shardings=p_sh)
    step = make_train_step(toy_loss, tx=tx, num_micro_batches=2, mesh=mesh, state_shardings=st_sh)
    new, m = step(state, shd.shard_batch(jax.device_get(batch), mesh), jax.random.key(0))
    chex.assert_trees_all_close(jax.device_get(new.params), jax.device_get(ref.params), atol=1e-6)
    np.testing.assert_allclose(float(m.loss), float(ref_m.loss), rtol=1e-6)
    new, m = step(new, shd.shard_batch(jax.device_get(batch), mesh), jax.random.key(0))
    assert step.jitted._cache_size() == 1
    print("OK", len(jax.devices()))
""")


@pytest.mark.multidevice
def test_four_devices_two_micro_batches_match_single_device():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root}
    out = subprocess.run([sys.executable, "-c", _MULTIDEVICE], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK 4" in out.stdout
