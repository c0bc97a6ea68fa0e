"""Preemption-safe runs (issue #18), end to end on real `python -m rlhf_jax sft` processes of a tiny job:
SIGTERM/SIGINT checkpoint and exit 143/130, the same command resumes."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from rlhf_jax import fixtures, tasks

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, RLHF_JAX_HOST_TUNABLES="0", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
           TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("preempt_assets")
    tok = fixtures.build_tokenizer(root / "tokenizer")
    model = fixtures.build_tiny_model(root / "model", "llama", tokenizer=tok, hidden=16, layers=1, heads=2,
                                      kv_heads=1, max_positions=64)
    data = tasks.write_task_data(root / "data", n_sft=64, n_pref=16, n_eval=8, n_prompts=8, seed=0)
    return {"model": str(model), "train": str(data["sft_train"])}


def sft_cmd(assets: dict, out: pathlib.Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_jax", "sft", str(REPO / "configs/sft_tiny_cpu.yaml"),
            f"model.path={assets['model']}", f"data.path={assets['train']}", "data.eval_path=null", "batch_size=4",
            "optim.schedule=constant", "optim.warmup_steps=0", "run.total_steps=100000", "run.log_every=1",
            "run.save_every=0", "run.eval_every=0", "run.progress=off", f"run.output_dir={out}", *extra]


def logged_steps(out: pathlib.Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for ln in path.read_text().splitlines():
        try:
            steps.append(json.loads(ln)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return steps


def start_and_signal(cmd: list[str], out: pathlib.Path, signum: int, *, after_step: int = 2, times: int = 1,
                     env: dict | None = None):
    """Start `cmd`, wait until it has logged `after_step`, send `signum` (`times` times); return the result."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not any(s >= after_step for s in logged_steps(out)):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run never logged a step"
        time.sleep(0.2)
    for _ in range(times):
        proc.send_signal(signum)
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=240)
    return proc.returncode, stdout, stderr


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_checkpoints_exits_and_the_same_command_resumes(assets, tmp_path, signum, code):
    out = tmp_path / "run"
    rc, stdout, stderr = start_and_signal(sft_cmd(assets, out), out, signum, times=2)
    assert rc == code, stderr[-3000:]
    name = signal.Signals(signum).name
    line = [ln for ln in stdout.splitlines() if ln.startswith(f"[rlhf_jax] {name} at step ")]
    assert len(line) == 1, stdout
    step = int(line[0].split("at step ")[1].split(":")[0])
    ckpt = out / "checkpoints" / str(step)
    assert line[0] == f"[rlhf_jax] {name} at step {step}: checkpoint saved to {ckpt}; resume with the same command"
    assert ckpt.is_dir() and not list((out / "checkpoints").glob("*tmp*"))
    assert logged_steps(out)[-1] == step and "Traceback" not in stderr
    # the same command (two more steps) resumes from that checkpoint and finishes
    done = subprocess.run(sft_cmd(assets, out, f"run.total_steps={step + 2}"), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints'}/{step}" in done.stdout
    assert logged_steps(out) == list(range(1, step + 3))
    assert (out / "model" / "config.json").exists()


def test_a_preemption_exits_143_even_with_tracebacks_on(assets, tmp_path):
    """RLHF_JAX_TRACEBACK=1 shows errors' tracebacks; a preemption is no error: still 143, no traceback."""
    out = tmp_path / "run"
    rc, stdout, stderr = start_and_signal(sft_cmd(assets, out), out, signal.SIGTERM,
                                          env=dict(ENV, RLHF_JAX_TRACEBACK="1"))
    assert rc == 143 and "Traceback" not in stderr, stderr[-3000:]
    assert "[rlhf_jax] SIGTERM at step " in stdout


_SLOW_STEP = r"""
import os, pathlib, signal, sys, time
import jax.numpy as jnp
from rlhf_jax.run_config import RunConfig
from rlhf_jax.train.loop import Loop, run_loop
out = pathlib.Path(sys.argv[1])
def step(index, state):
    if index == 2:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # a step that cannot finish within run.preempt_grace_s
    return {"w": state["w"] + 1}, {"loss": 1.0}, None
run = RunConfig(output_dir=str(out), tensorboard=False, progress="off", save_every=1, preempt_grace_s=0.5)
run_loop(Loop(name="toy", run=run, output_dir=out, total=10, step=step), {"w": jnp.zeros(())})
"""


def test_a_step_past_the_grace_period_exits_without_saving_and_keeps_the_last_checkpoint(tmp_path):
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", _SLOW_STEP, str(tmp_path)], env=ENV, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 143 and time.time() - t0 < 25, p.stderr[-2000:]
    assert "did not finish within run.preempt_grace_s=0.5s" in p.stderr
    from rlhf_jax.checkpoint import Checkpointer

    with Checkpointer(tmp_path / "checkpoints", read_only=True) as ckpt:
        assert ckpt.all_steps() == [1, 2]
        state, meta = ckpt.restore(2, target={"w": jnp.zeros(())})
    assert float(state["w"]) == 2.0 and meta["step"] == 2


def test_a_second_command_on_a_live_run_is_refused_naming_the_owner(assets, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen(sft_cmd(assets, out), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not logged_steps(out):
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.2)
        second = subprocess.run(sft_cmd(assets, out), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=240)
        assert second.returncode == 2, second.stderr[-2000:]
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and f"is in use by pid {first.pid} on host" in err[0], second.stderr
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=240) == 143
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    assert not (out / "run.lock").exists()  # released on a clean (preempted) exit
