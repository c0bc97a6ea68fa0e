"""One-line errors of a run (issue #18): reward functions, a full disk during a save, config-only checks that
run before any model or data is loaded, a non-finite learning rate, and the NaN message's step numbering."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoint_space, rewards
from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.checkpoint_space import DiskFullError
from rlhf_jax.config import ConfigError
from rlhf_jax.rewards import RewardFunctionError
from rlhf_jax.run_config import OptimConfig, RunConfig
from rlhf_jax.train.loop import Loop, run_loop
from rlhf_jax.train.step import NonFiniteError

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, RLHF_JAX_HOST_TUNABLES="0", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
           TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu")
PROMPTS, RESPONSES = ["p0", "p1", "p2"], ["a", "b", "c"]


# ------------------------------------------------------------------------------------------ reward functions
def _raises_on_p1(prompts, responses):
    if "p1" in prompts:
        raise ZeroDivisionError("division by zero")
    return [1.0] * len(prompts)


@pytest.mark.parametrize("fn,match", [
    (_raises_on_p1, r"^reward function 'f' raised ZeroDivisionError: division by zero on row 1 \(prompt 'p1'\)$"),
    (lambda p, r: 0.5, r"^reward function 'f': returned float '0.5'; expected a list of one score .* 3 here$"),
    (lambda p, r: [1.0, 2.0], r"^reward function 'f': returned 2 scores for a batch of 3$"),
    (lambda p, r: [1.0, float("inf"), 0.0], r"^reward function 'f': row 1 \(prompt 'p1'\): score is inf"),
    (lambda p, r: [1.0, 2.0, -np.inf], r"^reward function 'f': row 2 \(prompt 'p2'\): score is -inf"),
    (lambda p, r: [1.0, "0.5", 0.0], r"^reward function 'f': row 1 \(prompt 'p1'\): score '0.5' \(str\) is not a number"),
    (lambda p, r: np.array(["0.5", "1", "2"]), r"row 0 \(prompt 'p0'\): score '0.5' \(str\) is not a number"),
    (lambda p, r: [float("nan"), 1.0, 1.0], r"row 0 \(prompt 'p0'\): score is NaN"),
])
def test_bad_reward_function_output_is_one_line_naming_function_and_first_bad_row(fn, match):
    with pytest.raises(RewardFunctionError, match=match) as e:
        rewards.call_reward_fn(fn, PROMPTS, RESPONSES, name="reward function 'f'")
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)  # the CLI prints ValueErrors as one line


def test_good_reward_outputs_still_accepted():
    out = rewards.call_reward_fn(lambda p, r: np.array([1, 2, 3], np.int64), PROMPTS, RESPONSES)
    np.testing.assert_array_equal(out, [1.0, 2.0, 3.0])
    out = rewards.call_reward_fn(lambda p, r: (None, np.float32(0.5), True), PROMPTS, RESPONSES)
    assert np.isnan(out[0]) and out[1:].tolist() == [0.5, 1.0]


def test_the_loop_names_the_iteration_of_a_reward_function_error(tmp_path):
    def step(index, state):
        if index == 2:
            rewards.call_reward_fn(lambda p, r: 0.5, PROMPTS, RESPONSES, name="reward function 'f'")
        return state, {"loss": 1.0}, None

    run = RunConfig(output_dir=str(tmp_path), tensorboard=False, progress="off", log_every=1)
    with pytest.raises(RewardFunctionError, match=r"^toy iteration 3: reward function 'f': returned float"):
        run_loop(Loop(name="toy", run=run, output_dir=tmp_path, total=5, step=step), {"w": jnp.zeros(())})
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
    # (step 2's metrics are fetched one step late; the error at iteration 3 stops before that)


# --------------------------------------------------------------------------------------------- full disk
def _state():
    return {"w": jnp.asarray(np.random.default_rng(0).standard_normal((64, 256)), jnp.float32)}  # 64 KB


def test_a_save_that_cannot_fit_is_refused_at_that_save_naming_folder_and_free_space(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_space, "free_bytes", lambda d: 10_000)
    with Checkpointer(tmp_path / "ck") as ck:
        with pytest.raises(DiskFullError) as e:
            ck.save(7, _state(), meta={"step": 7})
        assert ck.all_steps() == []
    msg = str(e.value)
    assert msg.startswith(f"disk full: checkpoint step 7 could not be written to {tmp_path / 'ck'}: 9.8 KB free")
    assert "needs about 64.0 KB" in msg and "\n" not in msg


def test_an_orbax_write_failing_with_enospc_becomes_one_line_naming_the_failed_step(tmp_path, monkeypatch):
    """Injected at the Orbax boundary: the background write of step 2 fails the way Orbax reports ENOSPC."""
    ck = Checkpointer(tmp_path / "ck")
    ck.save(1, _state(), meta={"step": 1})
    ck.wait_until_finished()
    err = ValueError(f'RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database at local file "{tmp_path}/ck/'
                     '2.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": Failed to write 134625 '
                     "bytes to file 7: No space left on device [os_error_code='28']")

    def failed():
        raise err

    monkeypatch.setattr(ck._manager, "check_for_errors", failed)
    with pytest.raises(DiskFullError, match=rf"^disk full: checkpoint step 2 could not be written to {tmp_path}/ck: "):
        ck.save(3, _state(), meta={"step": 3})  # the next save reports step 2's failure
    monkeypatch.undo()
    ck.close()
    assert ck.all_steps() == [1]


_FULL_DISK_RUN = r"""
import pathlib, sys
import jax.numpy as jnp, numpy as np
from rlhf_jax.run_config import RunConfig
from rlhf_jax.train.loop import Loop, run_loop
out = pathlib.Path(sys.argv[1])
if sys.argv[2] == "orbax":  # skip the free-space check: the write itself fails in Orbax's threads
    import rlhf_jax.checkpoint_space as s
    s.state_bytes = lambda tree: 0
w = jnp.asarray(np.random.default_rng(0).standard_normal((64, 1024)), jnp.float32)  # 256 KB per checkpoint
run = RunConfig(output_dir=str(out), tensorboard=False, progress="off", save_every=2, keep_last_n=5)
run_loop(Loop(name="toy", run=run, output_dir=out, total=12, step=lambda i, s: ({"w": s["w"] + 1}, {"loss": 1.0}, None)),
         {"w": w})
"""


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) to mount a private tmpfs")
@pytest.mark.parametrize("path", ["precheck", "orbax"])
def test_a_real_full_disk_gives_one_line_at_the_failed_save(tmp_path, path):
    """A 700 KB tmpfs (mounted in a private user+mount namespace) holds two 256 KB checkpoints, not three."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs -o size=700k tmpfs {mnt}"],
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {probe.stderr.strip()}")
    script = tmp_path / "run.py"
    script.write_text(_FULL_DISK_RUN)
    code = f"mount -t tmpfs -o size=700k tmpfs {mnt} && exec {sys.executable} {script} {mnt}/run {path}"
    p = subprocess.run(["unshare", "-Urm", "sh", "-c", code], env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rlhf_jax.checkpoint_space.DiskFullError: disk full: checkpoint step 6 could not be "
                           f"written to {mnt}/run/checkpoints: "), p.stderr[-3000:]
    assert " free on that disk" in last
    assert "No space left" not in p.stderr and "ERROR:absl" not in p.stderr  # Orbax's log records are dropped


# ---------------------------------------------------------------------------------- config-only checks
def test_infinite_learning_rate_is_rejected_at_config_load():
    with pytest.raises(ConfigError, match="learning_rate.*must be a finite number >= 0, got inf"):
        OptimConfig(learning_rate=float("inf"))


def _cli(*args: str, devices: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(ENV, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env or {}))
    return subprocess.run([sys.executable, "-m", "rlhf_jax", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("command,config,args,devices,expected", [
    ("sft", "sft_tiny_cpu.yaml", ["run.total_steps=5", "optim.warmup_steps=10"], 1,
     "config key 'optim.warmup_steps': 10 must be < the run's 5 optimizer steps (run.total_steps=5) for schedule "
     "'cosine'"),
    ("sft", "sft_tiny_cpu.yaml", ["batch_size=6"], 4,
     "config key 'batch_size': 6 is not divisible by the mesh's batch axes data x fsdp = 4 x 1 = 4"),
    ("sft", "sft_tiny_cpu.yaml", ["batch_size=8", "num_micro_batches=3"], 1,
     "config key 'num_micro_batches': must divide batch_size=8, got 3"),
    ("dpo", "dpo_tiny_cpu.yaml", ["batch_size=6"], 4, "config key 'batch_size': 6 is not divisible by the mesh's"),
    ("grpo", "grpo_tiny_cpu.yaml", ["run.total_steps=3", "actor_optim.schedule=linear", "actor_optim.warmup_steps=6"],
     1, "config key 'actor_optim.warmup_steps': 6 must be < the run's 6 optimizer steps (run.total_steps=3 x 2 "
        "updates per step)"),
    ("grpo", "grpo_tiny_cpu.yaml", [], 4, None),
])
def test_config_errors_come_before_the_model_is_loaded(tmp_path, command, config, args, devices, expected):
    """model.path and data.path point at nothing: the config error is still the one reported."""
    p = _cli(command, str(REPO / "configs" / config), f"model.path={tmp_path}/no_model", f"data.path={tmp_path}/no.jsonl",
             f"run.output_dir={tmp_path}/out", *args, devices=devices)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1, p.stderr[-3000:]
    if expected is None:  # a valid config: the first error is then the missing model
        assert "no_model" in err[0], err
        return
    assert err[0].startswith(f"rlhf-jax {command}: error: {expected}"), err
    assert not (tmp_path / "out").exists()  # nothing was created either


# ------------------------------------------------------------------------------------- NaN step numbering
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_the_nan_message_names_the_step_logged_in_metrics_jsonl(tmp_path, policy):
    """The update of index 2 is logged as step 3: the message and metrics.jsonl agree on that number."""
    def step(index, state):
        return state, {"loss": float("nan") if index == 2 else 1.0, "finite": 0.0 if index == 2 else 1.0}, None

    run = RunConfig(output_dir=str(tmp_path), tensorboard=False, progress="off", log_every=1, nan_policy=policy)
    loop = Loop(name="toy", run=run, output_dir=tmp_path, total=6, step=step)
    if policy == "stop":
        with pytest.raises(NonFiniteError, match="non-finite loss or gradient at step 3;"):
            run_loop(loop, {"w": jnp.zeros(())})
    else:
        run_loop(loop, {"w": jnp.zeros(())})
    records = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    if policy == "stop":
        assert [r["step"] for r in records] == [1, 2]  # the bad update (step 3) is not logged
    else:
        assert [r["step"] for r in records if r["finite"] == 0.0] == [3]  # the skipped update is logged as step 3
