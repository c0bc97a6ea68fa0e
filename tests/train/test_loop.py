"""Tests for rlhf_jax/train/loop.py: the one host loop of every command (real Orbax checkpoints)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.config import ConfigError, load_config
from rlhf_jax.recipes import REGISTRY, trainer_config_class
from rlhf_jax.run_config import RunConfig
from rlhf_jax.train.loop import Loop, run_loop
from rlhf_jax.train.step import NonFiniteError


class Counter:
    """A checkpointable 'data iterator': its position is saved with the state and restored on resume."""

    def __init__(self):
        self.pos = 0

    def __next__(self):
        self.pos += 1
        return self.pos

    def state(self):
        return {"pos": self.pos}

    def restore(self, s):
        self.pos = s["pos"]


def _loop(tmp_path, *, total=6, losses=None, finite=None, **run_kw):
    """A loop whose state {"w"} is a float that grows by the step's data value; metrics are host floats."""
    data = Counter()
    losses = losses or {}
    finite = finite or {}

    def step(index, state):
        x = next(data)
        ok = finite.get(index + 1, True)
        new = {"w": state["w"] + (x if ok else 0)}
        return new, {"loss": losses.get(index + 1, float(10 - index)), "finite": float(ok), "x": float(x)}, \
            [{"row": index}]

    run = RunConfig(output_dir=str(tmp_path), tensorboard=False, progress="off", log_every=1, **run_kw)
    exported = []
    loop = Loop(name="toy", run=run, output_dir=tmp_path, total=total, step=step, data={"toy": data},
                sample_every=2, export=lambda s: exported.append(float(s["w"])) or tmp_path / "model")
    return loop, exported


def _records(tmp_path):
    return [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_runs_logs_every_step_once_and_exports(tmp_path):
    loop, exported = _loop(tmp_path, save_every=2)
    res = run_loop(loop, {"w": jnp.zeros((), jnp.float32)})
    assert float(res.state['w']) == 21.0 and exported == [21.0] and res.export_dir == str(tmp_path / "model")
    assert [r["step"] for r in _records(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [h["x"] for h in res.history] == [1, 2, 3, 4, 5, 6]


def test_resume_continues_from_checkpoint_with_data_position(tmp_path):
    loop, _ = _loop(tmp_path, save_every=2)
    loop.stop_at_step = 3  # "killed" after step 3; the last checkpoint is step 3 (the stop step saves)
    part = run_loop(loop, {"w": jnp.zeros((), jnp.float32)})
    assert float(part.state['w']) == 6.0 and part.export_dir is None
    loop2, exported = _loop(tmp_path, save_every=2)
    res = run_loop(loop2, {"w": jnp.zeros((), jnp.float32)})
    assert float(res.state['w']) == 21.0 and exported == [21.0]  # data positions 4, 5, 6 followed on
    steps = [r["step"] for r in _records(tmp_path) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # each step logged exactly once


def test_first_step_time_is_recorded_per_process_start(tmp_path, capsys, monkeypatch):
    """Each start (fresh, then a resume) appends one first_step.jsonl line and prints the seconds since the
    process started (the real clock: /proc here, so at least this test process's age)."""
    from rlhf_jax.runtime import clock

    age = clock.seconds_since_process_start()
    assert age > 0.0
    loop, _ = _loop(tmp_path, save_every=2)
    loop.stop_at_step = 3
    run_loop(loop, {"w": jnp.zeros((), jnp.float32)})
    loop2, _ = _loop(tmp_path, save_every=2)
    run_loop(loop2, {"w": jnp.zeros((), jnp.float32)})
    lines = [json.loads(ln) for ln in (tmp_path / "first_step.jsonl").read_text().splitlines()]
    assert [r["start_step"] for r in lines] == [0, 3]
    tick = 0.05  # /proc/uptime and starttime count in 10 ms ticks
    assert all(r["to_first_step_s"] >= age - tick for r in lines)
    assert lines[1]["to_first_step_s"] >= lines[0]["to_first_step_s"] - tick
    assert all(r["processes"] == 1 for r in lines)
    out = capsys.readouterr().out
    assert "toy: first step of a fresh run done" in out and "toy: first step after resuming at step 3 done" in out
    # without /proc the clock counts from its import, still a non-negative number of seconds
    monkeypatch.setattr(clock, "PROC", str(tmp_path / "no-proc"))
    assert 0.0 <= clock.seconds_since_process_start() < age + 3600


def test_resume_drops_records_after_checkpoint_and_a_torn_line(tmp_path, capsys):
    loop, _ = _loop(tmp_path, save_every=2)
    loop.stop_at_step = 2
    run_loop(loop, {"w": jnp.zeros((), jnp.float32)})
    with open(tmp_path / "metrics.jsonl", "a") as f:  # step 3 logged, then killed mid-write of step 4
        f.write(json.dumps({"step": 3, "split": "train", "loss": 1.0}) + "\n" + '{"step": 4, "spl')
    loop2, _ = _loop(tmp_path, save_every=2)
    run_loop(loop2, {"w": jnp.zeros((), jnp.float32)})
    assert "torn last line" in capsys.readouterr().out
    assert [r["step"] for r in _records(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_nan_stop_raises_naming_the_logged_step_and_saves_nothing_after(tmp_path):
    loop, _ = _loop(tmp_path, finite={3: False}, save_every=1)
    with pytest.raises(NonFiniteError, match="step 3"):
        run_loop(loop, {"w": jnp.zeros((), jnp.float32)})
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]


def test_nan_skip_goes_on_until_max_consecutive_skips(tmp_path):
    loop, _ = _loop(tmp_path, finite={2: False, 4: False}, nan_policy="skip", max_nan_skips=2)
    res = run_loop(loop, {"w": jnp.zeros((), jnp.float32)})  # never 2 in a row
    assert float(res.state['w']) == 21.0 - 2 - 4
    loop, _ = _loop(tmp_path / "b", finite={2: False, 3: False}, nan_policy="skip", max_nan_skips=2)
    with pytest.raises(NonFiniteError, match="2 consecutive"):
        run_loop(loop, {"w": jnp.zeros((), jnp.float32)})


def test_keep_best_metric_keeps_the_best_checkpoint(tmp_path):
    losses = {1: 5.0, 2: 1.0, 3: 4.0, 4: 3.0, 5: 6.0, 6: 7.0}
    loop, _ = _loop(tmp_path, losses=losses, save_every=1, keep_last_n=1, keep_best_metric="train/loss",
                    keep_best_mode="min")
    run_loop(loop, {"w": jnp.zeros((), jnp.float32)})
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert 2 in kept and 6 in kept and len(kept) == 2, kept


def test_evaluate_on_cadence_and_at_the_end(tmp_path):
    loop, _ = _loop(tmp_path, eval_every=4)
    seen = []
    loop.evaluate = lambda s: seen.append(float(s["w"])) or {"score": float(s["w"])}
    res = run_loop(loop, {"w": jnp.zeros((), jnp.float32)})
    assert seen == [10.0, 21.0] and res.latest["eval/score"] == 21.0
    assert [r["step"] for r in _records(tmp_path) if r.get("split") == "eval"] == [4, 6]


def test_sample_tables_on_cadence(tmp_path):
    loop, _ = _loop(tmp_path)
    run_loop(loop, {"w": jnp.zeros((), jnp.float32)})
    tables = [p.name for p in tmp_path.rglob("*") if "samples" in p.name]
    assert tables, "no sample table written"


ONLINE = ("ppo", "grpo", "rloo", "reinforce_pp", "remax", "raft", "online_dpo")


@pytest.mark.parametrize("command", ONLINE)
def test_online_commands_check_their_heldout_evaluation_keys(command):
    """Held-out evaluation (online.heldout) needs held-out prompts; with them, eval_every and eval/ keep-best load."""
    cls = trainer_config_class(command)
    base = ["model.path=m", "data.path=d"]
    with pytest.raises(ConfigError, match="run.eval_every"):
        load_config(cls, None, base + ["run.eval_every=5"])
    with pytest.raises(ConfigError, match="run.keep_best_metric"):
        load_config(cls, None, base + ["run.keep_best_metric=eval/gold_score", "run.keep_best_mode=max"])
    with pytest.raises(ConfigError, match="run.keep_best_mode"):
        load_config(cls, None, base + ["data.eval_path=e.jsonl", "run.keep_best_metric=eval/score"])
    for held_out in ("data.eval_path=e.jsonl", "data.eval_fraction=0.1"):
        cfg = load_config(cls, None, base + [held_out, "run.eval_every=5", "run.keep_best_metric=eval/score",
                                             "run.keep_best_mode=max"])
        assert cfg.run.eval_every == 5 and cfg.run.keep_best_metric == "eval/score"
    cfg = load_config(cls, None, base + ["run.keep_best_metric=train/score", "run.keep_best_mode=max",
                                         "run.max_nan_skips=3", "run.total_steps=null", "run.epochs=2"])
    assert cfg.run.keep_best_metric == "train/score" and cfg.run.epochs == 2


def test_registry_names_every_cli_command():
    assert set(ONLINE) | {"sft", "rm", "dpo", "label", "critique", "ilql"} == set(REGISTRY)
    assert all(np.all([isinstance(x, str) for x in v]) for v in REGISTRY.values())


def test_sigterm_finishes_the_step_saves_and_raises_preempted(tmp_path, capsys):
    import os
    import signal

    from rlhf_jax.train.preempt import Preempted

    loop, exported = _loop(tmp_path, save_every=0)
    inner = loop.step

    def step(index, state):  # the signal lands mid-step (twice: the second is ignored)
        if index == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
        return inner(index, state)

    loop.step = step
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as err:
        run_loop(loop, {"w": jnp.zeros((), jnp.float32)})
    assert err.value.step == 3 and err.value.exit_code == 143 and exported == []
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    out = capsys.readouterr()
    assert f"[rlhf_jax] SIGTERM at step 3: checkpoint saved to {tmp_path / 'checkpoints' / '3'}; resume with the " \
           "same command" in out.out
    assert "SIGINT again: ignored" in out.err
    assert [r["step"] for r in _records(tmp_path) if "loss" in r] == [1, 2, 3]  # step 3 flushed before the save
    loop2, exported = _loop(tmp_path, save_every=0)
    res = run_loop(loop2, {"w": jnp.zeros((), jnp.float32)})
    assert float(res.state["w"]) == 21.0 and exported == [21.0]
    assert [r["step"] for r in _records(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5, 6]


# ------------------------------------------------------------------ run folder (issue #18: preemption-safe runs)
import dataclasses  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from rlhf_jax.run_config import OptimConfig  # noqa: E402
from rlhf_jax.train.run import start_run  # noqa: E402


@dataclasses.dataclass(frozen=True)
class _Cfg:
    run: RunConfig
    optim: OptimConfig = OptimConfig()


def _started(tmp_path, *, total=6, optim=None, **run_kw):
    """start_run + a toy loop whose export writes a model folder with a config.json."""
    loop, exported = _loop(tmp_path, total=total, **run_kw)

    def export(s):
        (tmp_path / "model").mkdir(exist_ok=True)
        (tmp_path / "model" / "config.json").write_text("{}")
        exported.append(float(s["w"]))
        return tmp_path / "model"

    loop.export = export
    start_run(_Cfg(run=loop.run, optim=optim or OptimConfig()), loop.run)
    return loop, exported


def test_config_yaml_is_written_when_the_run_starts_and_a_math_change_is_refused(tmp_path, capsys):
    loop, _ = _started(tmp_path)
    assert not (tmp_path / "config.yaml").exists()  # not before the loop starts
    loop.stop_at_step = 3
    run_loop(loop, {"w": jnp.zeros((), jnp.float32)})
    assert "learning_rate: 1.0e-05" in (tmp_path / "config.yaml").read_text()
    loop, _ = _started(tmp_path, optim=OptimConfig(learning_rate=2e-5, b1=0.8), save_every=2, keep_last_n=5)
    with pytest.raises(ValueError, match=r"differs from its config.yaml: optim.learning_rate: 1e-05 -> 2e-05; "
                                         r"optim.b1: 0.9 -> 0.8; set run.allow_config_change=true") as err:
        run_loop(loop, {"w": jnp.zeros((), jnp.float32)})
    assert "save_every" not in str(err.value) and "keep_last_n" not in str(err.value)  # free keys
    loop, exported = _started(tmp_path, optim=OptimConfig(learning_rate=2e-5), allow_config_change=True)
    res = run_loop(loop, {"w": jnp.zeros((), jnp.float32)})
    assert float(res.state["w"]) == 21.0 and "resuming with optim.learning_rate" in capsys.readouterr().out
    assert "learning_rate: 2.0e-05" in (tmp_path / "config.yaml").read_text()


def test_a_finished_run_is_not_run_again(tmp_path, capsys):
    loop, exported = _started(tmp_path)
    run_loop(loop, {"w": jnp.zeros((), jnp.float32)})
    assert exported == [21.0]
    loop, exported = _started(tmp_path)
    loop.step = None  # never called
    res = run_loop(loop, {"w": jnp.zeros((), jnp.float32)})
    assert exported == [] and float(res.state["w"]) == 21.0 and res.latest["train/loss"] == 5.0
    assert res.export_dir == str(tmp_path / "model")
    assert "is a finished run (step 6 of 6, model exported to" in capsys.readouterr().out
    # a longer run.total_steps goes on from there
    loop, exported = _started(tmp_path, total=7)
    assert float(run_loop(loop, {"w": jnp.zeros((), jnp.float32)}).state["w"]) == 28.0 and exported == [28.0]


def test_resume_never_refuses_a_used_folder_unless_overwrite(tmp_path, capsys):
    loop, _ = _started(tmp_path)
    run_loop(loop, {"w": jnp.zeros((), jnp.float32)})
    with pytest.raises(ValueError, match="already holds a run .*checkpoints.*set run.overwrite=true"):
        _started(tmp_path, resume="never")
    loop, exported = _started(tmp_path, resume="never", overwrite=True)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "model").exists()
    run_loop(loop, {"w": jnp.zeros((), jnp.float32)})
    assert exported == [21.0] and [r["step"] for r in _records(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_restore_shape_mismatch_names_the_param(tmp_path):
    loop, _ = _loop(tmp_path)
    run_loop(loop, {"w": jnp.zeros((), jnp.float32)})
    loop, _ = _loop(tmp_path, total=8)
    with pytest.raises(ValueError, match=r"does not fit this run's state: w: saved \(\), now \(2,\)\. .*new "
                                         r"run.output_dir, or run.resume=never run.overwrite=true"):
        run_loop(loop, {"w": jnp.zeros((2,), jnp.float32)})


def test_output_dir_that_is_a_file_or_not_writable(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        start_run(None, RunConfig(output_dir=str(tmp_path / "f")))
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not writable"):
            start_run(None, RunConfig(output_dir=str(ro)))


def test_lock_of_a_live_process_refuses_and_a_dead_one_is_taken_over(tmp_path, capsys):
    import socket

    out = tmp_path / "run"
    out.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid, "started": "x"}))
        with pytest.raises(ValueError, match=f"is in use by pid {live.pid} on host {socket.gethostname()}"):
            start_run(None, RunConfig(output_dir=str(out)))
    finally:
        live.kill()
        live.wait()
    start_run(None, RunConfig(output_dir=str(out)))  # the pid is dead now: taken over
    assert f"taking over the stale lock {out / 'run.lock'} (of pid {live.pid}" in capsys.readouterr().out
    assert json.loads((out / "run.lock").read_text())["pid"] == os.getpid()


def test_stale_temporary_exports_are_removed_and_exports_are_world_readable(tmp_path, capsys):
    import jax

    from rlhf_jax.models import ModelConfig, Transformer, init_params, save_pretrained
    from rlhf_jax.fixtures import tiny_config

    (tmp_path / ".model.tmp-abc").mkdir()
    (tmp_path / ".model.tmp-abc" / "model.safetensors").write_text("half")
    start_run(None, RunConfig(output_dir=str(tmp_path)))
    assert not (tmp_path / ".model.tmp-abc").exists() and "removed" in capsys.readouterr().out
    model = Transformer(ModelConfig.from_hf(tiny_config("llama", vocab_size=64, hidden=16, layers=1, heads=2,
                                                        kv_heads=1, max_positions=32)))
    out = save_pretrained(tmp_path / "model", model, init_params(model, jax.random.key(0)))
    assert os.stat(out).st_mode & 0o777 == 0o755
    assert all(os.stat(f).st_mode & 0o777 == 0o644 for f in out.iterdir())
