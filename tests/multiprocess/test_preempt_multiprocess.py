"""Preemption on 2 processes × 4 devices (issue #18): SIGTERM to one process, or to both as a scheduler does.

Real ``launch/local_multiprocess.sh`` runs: every process stops after the same step, one checkpoint is
committed, every process exits 143, and the same command resumes: on 2 × 4 bit-identical to the
uninterrupted 2 × 4 run, on 1 × 8 equal to it to float rounding (as in ``test_commands.py``).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time

import pytest

import _compare as mp

CONSTANT = {"sft": ["optim.schedule=constant"], "grpo": []}  # total_steps then changes nothing of the math


def _args(assets: dict, command: str, overrides: list[str], out: pathlib.Path) -> tuple[str, list[str]]:
    """(config, arguments) of `command` with test_commands' settings, logging every step into `out`."""
    config, base = mp._commands(assets)[command]
    return config, [*mp.RUN, f"run.output_dir={out}", *base, *CONSTANT[command], *overrides]


def _command(assets: dict, command: str, overrides: list[str], out: pathlib.Path, procs: int, devices: int):
    return mp.launch_argv(command, *_args(assets, command, overrides, out), procs, devices, grace_s=60)


def _run(assets: dict, command: str, overrides: list[str], out: pathlib.Path, procs: int, devices: int) -> list[dict]:
    """The run's metrics without timings, each with its split."""
    mp.launch(command, *_args(assets, command, overrides, out), procs, devices, grace_s=60)
    records = mp.read_metrics(out)
    return [dict(v, split=r["split"]) for v, r in zip(mp._values(records), records)]


def _train_steps(records: list[dict]) -> list[int]:
    return [r["step"] for r in records if r["split"] == "train"]


def _workers(out: pathlib.Path) -> dict[int, int]:
    """{RLHF_JAX_PROCESS_ID: pid} of the python processes of the run writing to `out`."""
    found = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = pathlib.Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            env = dict(e.split(b"=", 1) for e in pathlib.Path(f"/proc/{p}/environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if f"run.output_dir={out}".encode() in argv and b"python" in pathlib.Path(argv[0].decode()).name.encode():
            found[int(env[b"RLHF_JAX_PROCESS_ID"])] = int(p)
    return found


def _logged(out: pathlib.Path) -> list[int]:
    path = out / "metrics.jsonl"
    steps = []
    for ln in (path.read_text().splitlines() if path.exists() else []):
        try:
            steps.append(json.loads(ln)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return steps


def _preempt(assets: dict, command: str, out: pathlib.Path, targets: tuple[int, ...]) -> tuple[int, str, str]:
    """Start a long 2 × 4 run, wait for 2 logged steps, SIGTERM the processes `targets`; return the result."""
    cmd, env = _command(assets, command, ["run.total_steps=100000", "run.save_every=0"], out, 2, 4)
    proc = subprocess.Popen(cmd, cwd=mp.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while len(_logged(out)) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "the run never logged 2 steps"
            time.sleep(0.2)
        pids = _workers(out)
        assert sorted(pids) == [0, 1], pids
        for i in targets:
            os.kill(pids[i], signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, stdout, stderr


def _check_stopped_together(rc: int, stdout: str, stderr: str, out: pathlib.Path) -> int:
    """Both processes exited 143 after checkpointing the same step; returns that step."""
    assert rc == 143, stderr[-4000:]
    assert "[launch] exit statuses: p0=143 p1=143" in stderr, stderr[-4000:]
    lines = re.findall(r"\[p0\] \[rlhf_jax\] SIGTERM at step (\d+): checkpoint saved to (\S+); resume with the same "
                       r"command", stdout)
    assert len(lines) == 1, stdout[-4000:]
    step = int(lines[0][0])
    assert lines[0][1] == str(out / "checkpoints" / str(step))
    assert [p.name for p in (out / "checkpoints").iterdir()] == [str(step)]  # one committed step, no tmp folder
    assert _logged(out) == list(range(1, step + 1))
    assert "Traceback" not in stderr and not (out / "run.lock").exists()
    return step


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_on_2x4_and_1x8(assets, tmp_path):
    out = tmp_path / "run"
    step = _check_stopped_together(*_preempt(assets, "sft", out, targets=(1,)), out)
    shutil.copytree(out, tmp_path / "copy")
    more = [f"run.total_steps={step + 3}"]
    straight = _run(assets, "sft", more, tmp_path / "straight", 2, 4)
    resumed = _run(assets, "sft", more, out, 2, 4)  # the same command, on 2 x 4
    assert _train_steps(resumed) == list(range(1, step + 4))
    assert resumed == straight  # bit-identical
    on_one = _run(assets, "sft", more, tmp_path / "copy", 1, 8)  # and on 1 x 8
    assert _train_steps(on_one) == list(range(1, step + 4)) and len(on_one) == len(straight)
    for r1, r2 in zip(on_one, straight):
        assert r1.keys() == r2.keys() and r1["split"] == r2["split"]
        for k in set(r2) - {"split"}:
            assert r1[k] == pytest.approx(r2[k], rel=1e-5, abs=1e-6), (r2["step"], k, r1[k], r2[k])


@pytest.mark.slow
def test_sigterm_to_both_processes_grpo_checkpoints_together_and_resumes_bit_identically(assets, tmp_path):
    out = tmp_path / "run"
    step = _check_stopped_together(*_preempt(assets, "grpo", out, targets=(0, 1)), out)
    more = [f"run.total_steps={step + 1}"]
    straight = _run(assets, "grpo", more, tmp_path / "straight", 2, 4)
    resumed = _run(assets, "grpo", more, out, 2, 4)
    assert _train_steps(resumed) == list(range(1, step + 2))
    assert resumed == straight


_BAD_ON_PROCESS_1 = '''
import json
import os
def bad(prompts, responses, **columns):
    if os.environ.get("RLHF_JAX_PROCESS_ID") == "1":
        return 0.5  # a bare float, on process 1 only
    return [0.0] * len(prompts)
'''


@pytest.mark.slow
def test_a_reward_function_error_on_one_host_stops_every_host_with_one_line(assets, tmp_path):
    """The failing host's error reaches all of them (no host is left waiting in a collective): status 2 on both."""
    (tmp_path / "bad.py").write_text(_BAD_ON_PROCESS_1)
    cmd, env = _command(assets, "grpo", ["run.total_steps=3", f"reward.functions=['{tmp_path}/bad.py:bad']"],
                        tmp_path / "run", 2, 4)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=mp.ROOT)
    assert p.returncode == 2 and "[launch] exit statuses: p0=2 p1=2" in p.stderr, p.stderr[-4000:]
    line = ("rlhf-jax grpo: error: grpo iteration 1: process 1: reward function 'bad': returned float '0.5'; expected a "
            "list of one score (float or None) per row, 8 here")
    assert f"[p0] {line}\n" in p.stderr and f"[p1] {line}\n" in p.stderr, p.stderr[-4000:]
    assert "Traceback" not in p.stderr
