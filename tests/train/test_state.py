"""TrainState: fresh state, born-sharded optimizer state, abstract restore target."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import sharding as shd
from rlhf_jax.checkpoint import abstract_like
from rlhf_jax.train.state import TrainState, create_train_state, init_train_state


def _params():
    return {"dense": {"kernel": jnp.ones((4, 6)), "bias": jnp.zeros(6)}, "scale": jnp.ones(4)}


def test_init_state_fields():
    tx = optax.adam(1e-3)
    state = init_train_state(_params(), tx)
    assert state.step.dtype == jnp.int32 and int(state.step) == 0
    assert int(state.num_skipped) == 0
    chex.assert_trees_all_equal_structs(state.opt_state, tx.init(_params()))
    # a TrainState is a pure array pytree: no optimizer functions inside
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))


def test_state_is_a_pytree_through_jit():
    tx = optax.sgd(0.1)
    state = init_train_state(_params(), tx)
    out = jax.jit(lambda s: s.replace(step=s.step + 1))(state)
    assert isinstance(out, TrainState) and int(out.step) == 1


def test_single_device_mesh_state_and_abstract_target():
    mesh = shd.make_mesh(shd.MeshConfig(data=-1))
    params = _params()
    p_sh = jax.tree.map(lambda _: shd.replicated(mesh), params)
    placed = jax.device_put(params, p_sh)
    tx = optax.adamw(1e-3)
    state, sh = create_train_state(placed, tx, mesh=mesh, params_shardings=p_sh)
    assert isinstance(sh, TrainState)
    assert state.params["dense"]["kernel"] is placed["dense"]["kernel"]  # reused, not copied
    abstract = abstract_like(state)
    leaves = jax.tree.leaves(abstract)
    assert all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None for x in leaves)
    chex.assert_trees_all_equal_structs(abstract, state)


def test_mesh_requires_param_shardings():
    mesh = shd.make_mesh(shd.MeshConfig(data=-1))
    with pytest.raises(ValueError, match="params_shardings is required"):
        create_train_state(_params(), optax.sgd(0.1), mesh=mesh)


_SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import jax.numpy as jnp, optax
    from jax.sharding import PartitionSpec as P
    from rlhf_jax import sharding as shd
    from rlhf_jax.train.state import create_train_state
    mesh = shd.make_mesh(shd.MeshConfig(data=1, fsdp=2, tensor=2))
    specs = {"w": P("embed", "vocab"), "b": P("vocab")}
    shapes = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32), "b": jax.ShapeDtypeStruct((4,), jnp.float32)}
    p_sh = shd.logical_to_shardings(specs, mesh, shapes=shapes)
    params = shd.create_sharded(lambda k: {"w": jax.random.normal(k, (8, 4)), "b": jnp.zeros(4)},
                                jax.random.key(0), out_shardings=p_sh)
    tx = optax.adamw(1e-3)
    state, sh = create_train_state(params, tx, mesh=mesh, params_shardings=p_sh)
    mu = state.opt_state[0].mu
    assert mu["w"].sharding.spec == P("fsdp", "tensor"), mu["w"].sharding
    assert mu["b"].sharding.spec == P("tensor"), mu["b"].sharding
    assert state.opt_state[0].count.sharding.spec == P()
    assert state.step.sharding.spec == P()
    assert len(mu["w"].addressable_shards) == 4 and mu["w"].addressable_shards[0].data.shape == (4, 2)
    print("OK")
""")


@pytest.mark.multidevice
def test_optimizer_state_born_sharded_like_params():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=root, env={**os.environ, "PYTHONPATH": root},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
