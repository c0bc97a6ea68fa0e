"""Tests for rlhf_jax.checkpoint: round trip with types kept, keep-last-N, keep-best, resume, atomicity."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.checkpoint import Checkpointer, abstract_like
from rlhf_jax.train.resume import resolve_resume


class KLState(NamedTuple):
    """Adaptive-KL controller state (stand-in for the trainer's)."""

    beta: jax.Array
    n_seen: jax.Array


class TrainState(NamedTuple):
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array  # typed key
    raw_rng: jax.Array  # raw uint32 key
    kl: KLState


def make_state(seed: int) -> TrainState:
    k = jax.random.key(seed)
    params = {
        "dense": {"kernel": jax.random.normal(k, (4, 3)), "bias": jnp.arange(3.0)},
        "embed": jax.random.normal(jax.random.fold_in(k, 1), (5, 4), dtype=jnp.bfloat16),
    }
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments
    return TrainState(
        step=jnp.int32(seed),
        params=params,
        opt_state=opt_state,
        rng=jax.random.fold_in(k, 7),
        raw_rng=jax.random.PRNGKey(seed + 100),
        kl=KLState(beta=jnp.float32(0.1 * seed), n_seen=jnp.int64(seed * 10) if jax.config.x64_enabled else jnp.int32(seed * 10)),
    )


def assert_state_equal(a: TrainState, b: TrainState) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)  # NamedTuples stay NamedTuples
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_keeps_types_values_and_meta(tmp_path):
    state = make_state(3)
    meta = {"data_position": {"epoch": 1, "index": np.int64(42)}, "config": {"lr": 1e-5}}
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(10, state, meta=meta, metrics={"loss": jnp.float32(0.5)})
        ckpt.wait_until_finished()
        restored, got_meta = ckpt.restore(target=abstract_like(make_state(0)))
    assert_state_equal(restored, state)
    assert isinstance(restored.kl, KLState) and isinstance(restored.opt_state[1][0], optax.ScaleByAdamState)
    assert restored.params["dense"]["kernel"].sharding == state.params["dense"]["kernel"].sharding
    assert got_meta == {"data_position": {"epoch": 1, "index": 42}, "config": {"lr": 1e-5}, "metrics": {"loss": 0.5}}
    # the restored typed key draws the same numbers as the original
    np.testing.assert_array_equal(jax.random.uniform(restored.rng, (3,)), jax.random.uniform(state.rng, (3,)))


def test_keep_last_n_and_resume_from_latest(tmp_path):
    d = tmp_path / "ckpt"
    with Checkpointer(d, keep_last_n=2) as ckpt:
        for s in (1, 2, 3, 4):
            ckpt.save(s, make_state(s), meta={"pos": s})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [3, 4]
    # a new process-equivalent opens the directory and resumes from the latest step
    assert resolve_resume("auto", d) == (d.absolute(), 4)
    with Checkpointer(d, keep_last_n=2) as again:
        assert again.latest_step() == 4
        state, meta = again.restore(target=make_state(0))
        assert_state_equal(state, make_state(4))
        assert meta == {"pos": 4}
        state3, _ = again.restore(3, target=make_state(0))
        assert_state_equal(state3, make_state(3))
        assert again.restore_meta(3) == {"pos": 3}
        with pytest.raises(FileNotFoundError, match="step 1 not in"):
            again.restore(1, target=make_state(0))


@pytest.mark.parametrize("mode, best_loss", [("min", 0.5), ("max", 9.0)])
def test_keep_best_survives_rotation_and_restart(tmp_path, mode, best_loss):
    d = tmp_path / "ckpt"
    losses = {1: 3.0, 2: 0.5, 3: 9.0, 4: 2.0, 5: 4.0, 6: float("nan")}
    finite = {s: v for s, v in losses.items() if np.isfinite(v) and s <= 4}
    best = (min if mode == "min" else max)(finite, key=finite.get)
    with Checkpointer(d, keep_last_n=2, keep_best_metric="loss", keep_best_mode=mode) as ckpt:
        for s in (1, 2, 3, 4):
            ckpt.save(s, make_state(s), metrics={"loss": losses[s]})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == sorted({best, 3, 4})
        assert ckpt.best_step() == best
    with Checkpointer(d, keep_last_n=2, keep_best_metric="loss", keep_best_mode=mode) as ckpt:  # restart
        for s in (5, 6):
            ckpt.save(s, make_state(s), metrics={"loss": losses[s]})  # NaN at step 6 is never "best"
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == sorted({best, 5, 6})
        assert ckpt.best_step() == best
        state, meta = ckpt.restore(ckpt.best_step(), target=make_state(0))
        assert_state_equal(state, make_state(best))
        assert meta["metrics"]["loss"] == best_loss


def test_resolve_resume_paths(tmp_path):
    d = tmp_path / "run" / "checkpoints"
    assert resolve_resume("never", d) is None
    assert resolve_resume("auto", d) is None  # nothing yet
    with Checkpointer(d, keep_last_n=None) as ckpt:
        for s in (5, 7):
            ckpt.save(s, {"x": jnp.ones(2) * s})
    assert resolve_resume(str(d), tmp_path / "elsewhere") == (d.absolute(), 7)
    assert resolve_resume(str(d / "5"), tmp_path / "elsewhere") == (d.absolute(), 5)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume(str(tmp_path / "missing"), d)
    with Checkpointer(d, read_only=True) as ro:
        restored, _ = ro.restore(5, target={"x": jnp.zeros(2)})
    np.testing.assert_array_equal(restored["x"], [5.0, 5.0])


def test_meta_must_be_json(tmp_path):
    with Checkpointer(tmp_path / "c") as ckpt:
        with pytest.raises(TypeError, match="not JSON-serialisable"):
            ckpt.save(1, {"x": jnp.ones(1)}, meta={"bad": object()})


_SAVER = textwrap.dedent(
    """
    import os, signal, sys, jax.numpy as jnp
    from rlhf_jax.checkpoint import Checkpointer
    directory, kill_at = sys.argv[1], int(sys.argv[2])
    step = 0

    def dying(real):  # os.rename/os.replace that SIGKILL this process at its first tmp-path rename of step kill_at
        def rename(src, dst, *args, **kwargs):
            if step >= kill_at and "tmp" in os.path.basename(os.fspath(src)):
                print("killed", step, "renaming", os.path.basename(os.fspath(src)), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst, *args, **kwargs)
        return rename

    os.rename, os.replace = dying(os.rename), dying(os.replace)
    ckpt = Checkpointer(directory, keep_last_n=2)
    big = jnp.ones((8, 1024, 1024), jnp.float32)  # 32 MiB per step
    for step in range(1, kill_at + 1):
        ckpt.save(step, {"big": big * step, "step": jnp.int32(step)}, meta={"step": step})
        ckpt.wait_until_finished()
        print("saved", step, flush=True)
    sys.exit("step %d was saved without renaming a tmp path: the kill never landed" % kill_at)
    """
)


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    """SIGKILL in the middle of saving step 3 leaves steps 1 and 2 loadable and step 3 not listed.

    The saver kills itself at the first rename of a tmp path while step 3 is being written into its
    ``3.orbax-checkpoint-tmp*`` folder (Orbax 0.12: an item of the step being finalised; the step folder is
    renamed into place last): the kill lands mid-save by construction, not by a reader racing the
    background write (which a loaded machine could lose)."""
    kill_at = 3
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]), JAX_PLATFORMS="cpu")
    d = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", _SAVER, str(d), str(kill_at)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["saved 1", "saved 2"] and lines[2].startswith("killed 3 renaming "), proc.stdout
    assert [p for p in d.iterdir() if "tmp" in p.name], sorted(p.name for p in d.iterdir())  # step 3, unfinished
    with Checkpointer(d, keep_last_n=2) as ckpt:
        assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
        state, meta = ckpt.restore(target={"big": jnp.zeros((8, 1024, 1024)), "step": jnp.int32(0)})
    assert meta == {"step": 2} and int(state["step"]) == 2
    np.testing.assert_array_equal(np.asarray(state["big"][:, :2, :2]), np.full((8, 2, 2), 2.0))
    assert not [p for p in d.iterdir() if "tmp" in p.name]  # leftovers cleaned up on open


_MULTI = textwrap.dedent(
    """
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 2)
    port, pid, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
    from rlhf_jax.checkpoint import Checkpointer, abstract_like
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    rows = NamedSharding(mesh, P("data"))
    full = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    w = jax.make_array_from_callback(full.shape, rows, lambda idx: full[idx])
    keys = jax.jit(lambda: jax.random.split(jax.random.key(5), 4), out_shardings=rows)()
    state = {"w": w, "keys": keys, "step": jnp.int32(3)}
    with Checkpointer(directory, keep_last_n=1) as ckpt:   # every process calls save
        ckpt.save(3, state, meta={"pos": 17})
        ckpt.save(4, state, meta={"pos": 18})
    # restore onto a different layout: replicated w, keys still sharded
    target = abstract_like(state)
    target["w"] = jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=NamedSharding(mesh, P()))
    with Checkpointer(directory, keep_last_n=1) as ckpt:
        assert ckpt.all_steps() == [4], ckpt.all_steps()
        got, meta = ckpt.restore(target=target)
    assert meta == {"pos": 18}, meta
    assert got["w"].sharding.spec == P(), got["w"].sharding
    np.testing.assert_array_equal(np.asarray(got["w"].addressable_data(0)), full)
    assert got["keys"].sharding == keys.sharding
    same = jax.jit(lambda a, b: jnp.all(jax.random.key_data(a) == jax.random.key_data(b)), out_shardings=NamedSharding(mesh, P()))
    assert bool(same(got["keys"], keys))
    print("ok", pid, flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_process_save_and_restore_onto_new_layout(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    d = tmp_path / "ckpt"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _MULTI, str(port), str(i), str(d)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=180))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"ok {i}" in out, f"process {i} failed:\n{err[-3000:]}"
