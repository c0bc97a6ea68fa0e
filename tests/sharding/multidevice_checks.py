"""Sharding invariance on N simulated CPU devices. NOT collected directly: test_multidevice.py runs
this file with pytest in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=N, so
other tests keep their single device.

Meshes (data, fsdp, tensor) come from RLHF_JAX_TEST_MESHES ("8,1,1;1,8,1;2,2,2;1,1,1" by default):
each SFT step and PPO-style step equals the 1-device run (loss, grads, updated params, optimizer
state; float32, matmul precision highest, rtol 1e-5), params are really split, and a second step
does not recompile.
"""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # --import-mode=importlib
import sharding_harness as H  # noqa: E402
from rlhf_jax import sharding as shd  # noqa: E402

MESHES = [shd.MeshConfig.parse(m) for m in os.environ.get("RLHF_JAX_TEST_MESHES", "8,1,1;1,8,1;2,2,2;1,1,1").split(";")]
NDEV = jax.device_count()
KEY = jax.random.key(0)
RTOL, ATOL = 1e-5, 1e-6
# Adam's first update g/(sqrt(v)+eps) amplifies the ~1e-7 summation-order noise of a gradient entry
# near eps into ~lr-sized parameter noise, so the update is checked in two well-conditioned halves:
# sharded grads == 1-device grads, and sharded update == 1-device optimizer update OF THOSE grads.


def mesh_for(cfg):
    n = math.prod(s for s in (cfg.data, cfg.fsdp, cfg.tensor) if s > 0)
    return shd.make_mesh(cfg, devices=jax.devices()[: (NDEV if -1 in (cfg.data, cfg.fsdp, cfg.tensor) else n)])


@pytest.fixture(scope="module")
def probs():
    return H.problems(batch_size=2 * NDEV)


@pytest.fixture(scope="module")
def reference(probs):
    assert jax.device_count() >= 8 or "RLHF_JAX_TEST_MESHES" in os.environ, jax.devices()
    return {name: H.run_unsharded(p, KEY) for name, p in probs.items()}


def _close(path, a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path))


@jax.jit
def _apply_update(grads, params):
    updates, opt_state = H.TX.update(grads, H.TX.init(params), params)
    return H.optax.apply_updates(params, updates), opt_state


@pytest.mark.parametrize("cfg", MESHES, ids=lambda c: f"{c.data}x{c.fsdp}x{c.tensor}")
@pytest.mark.parametrize("name", ["sft", "ppo"])
def test_step_matches_single_device(cfg, name, probs, reference):
    mesh = mesh_for(cfg)
    first, params, step = H.run_sharded(probs[name], KEY, mesh, steps=2)
    ref_loss, ref_grads, ref_params, ref_opt = reference[name]
    assert np.isfinite(ref_loss) and ref_loss > 0
    np.testing.assert_allclose(first[0], ref_loss, rtol=RTOL)
    jax.tree_util.tree_map_with_path(_close, first[1], ref_grads)
    init_params = jax.jit(probs[name].init)(KEY)
    exp_params, exp_opt = jax.device_get(_apply_update(first[1], init_params))
    jax.tree_util.tree_map_with_path(_close, first[2], exp_params)
    jax.tree_util.tree_map_with_path(_close, first[3], exp_opt)
    jax.tree_util.tree_map_with_path(_close, first[3], ref_opt)  # Adam moments: linear in g, g^2
    # params changed (the comparison is not vacuous)
    assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
               for a, b in zip(jax.tree.leaves(first[2]), jax.tree.leaves(init_params)))
    # and the sharded update agrees with the 1-device run's params up to Adam's eps-amplified noise
    for a, b in zip(jax.tree.leaves(first[2]), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * 1e-2 * 10)
    # one compilation for two steps: explicit optimizer-state shardings, donated state
    assert step.jitted._cache_size() == 1


@pytest.mark.parametrize("cfg", MESHES, ids=lambda c: f"{c.data}x{c.fsdp}x{c.tensor}")
def test_params_and_batch_really_split(cfg, probs):
    mesh = mesh_for(cfg)
    prob = probs["sft"]
    p_sh = shd.logical_to_shardings(prob.specs, mesh, shapes=jax.eval_shape(prob.init, KEY))
    params = shd.create_sharded(prob.init, KEY, out_shardings=p_sh)
    big = H.big_param(params)
    n = mesh.shape["fsdp"] * mesh.shape["tensor"]  # ("embed", "mlp") -> ("fsdp", "tensor")
    assert big.sharding.spec == P("fsdp", "tensor")
    assert len(big.addressable_shards) == mesh.size
    for s in big.addressable_shards:
        assert s.data.size * n == big.size, (s.device, s.data.shape, big.shape)
    np.testing.assert_array_equal(np.asarray(big), np.asarray(H.big_param(jax.jit(prob.init)(KEY))))
    batch = shd.shard_batch(prob.batch, mesh)
    nb = mesh.shape["data"] * mesh.shape["fsdp"]
    for s in batch.ids_BxS.addressable_shards:
        assert s.data.shape == (batch.ids_BxS.shape[0] // nb, H.SEQ)
    np.testing.assert_array_equal(np.asarray(batch.ids_BxS), prob.batch.ids_BxS)


def test_inference_rules_replicate_over_fsdp(probs):
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=4, tensor=2), jax.devices()[:8])
    prob = probs["sft"]
    p_sh = shd.logical_to_shardings(prob.specs, mesh, shapes=jax.eval_shape(prob.init, KEY), rules=shd.INFERENCE_RULES)
    params = shd.create_sharded(prob.init, KEY, out_shardings=p_sh)
    big = H.big_param(params)
    assert big.sharding.spec == P(None, "tensor")
    assert all(s.data.size * 2 == big.size for s in big.addressable_shards)


def test_indivisible_batch_names_axis_and_sizes():
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2), jax.devices()[:8])
    with pytest.raises(ValueError, match=r"batch leaf \['x'\]: batch size 6 .*\('data', 'fsdp'\).*size 4"):
        shd.shard_batch({"x": np.zeros((6, 3))}, mesh)
    with pytest.raises(ValueError, match=r"batch leaf \['x'\] is a scalar"):
        shd.shard_batch({"x": np.zeros(())}, mesh)


def test_indivisible_param_and_unknown_axis_name_the_path():
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=4, tensor=2), jax.devices()[:8])
    shapes = {"blk": {"w": jax.ShapeDtypeStruct((6, 8), jnp.float32)}}
    with pytest.raises(ValueError, match=r"\['blk'\]\['w'\]: dim 0 \(logical axis 'embed'\) of size 6 .*fsdp.*4"):
        shd.logical_to_shardings({"blk": {"w": P("embed", "mlp")}}, mesh, shapes=shapes)
    with pytest.raises(ValueError, match=r"\['blk'\]\['w'\]: logical axis 'hidden' has no sharding rule"):
        shd.logical_to_shardings({"blk": {"w": P("hidden", "mlp")}}, mesh, shapes=shapes)
    with pytest.raises(ValueError, match=r"\['blk'\]\['w'\]: logical spec .* has 1 entries"):
        shd.logical_to_shardings({"blk": {"w": P("mlp")}}, mesh, shapes=shapes)


def test_mesh_config_must_use_every_device():
    with pytest.raises(ValueError, match=f"has 4 devices, but {NDEV} are available"):
        shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=1))
    m = shd.make_mesh(shd.MeshConfig(data=-1, fsdp=2, tensor=2))
    assert dict(m.shape) == {"data": NDEV // 4, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
