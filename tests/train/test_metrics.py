"""Tests for rlhf_jax.train.metrics and rlhf_jax.train.plots."""

from __future__ import annotations

import io
import json
import math
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from rlhf_jax.train.metrics import DeferredMetrics, MetricsLogger, Progress, Timer, to_floats
from rlhf_jax.train.plots import best_mode, plot_curves, read_metrics, summary_table


def read_tb_events(logdir):
    """Decode TFRecord event files (length u64, crc u32, payload, crc u32) into Event protos."""
    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            payload = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            ev = event_pb2.Event()
            ev.ParseFromString(payload)
            events.append(ev)
    return events


def test_logger_writes_jsonl_tensorboard_and_samples(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        logger.log(1, {"loss": jnp.float32(2.5), "accuracy": np.float64(0.25), "lr": 1e-3})
        logger.log(2, {"loss": 1.5, "kl": float("nan")})
        logger.log(2, {"loss": 1.75}, split="eval")
        logger.log_table(2, [{"prompt": "a|b", "response": "x\ny", "reward": np.float32(0.5)}, {"prompt": "c", "reward": 1}])
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in recs] == [(1, "train"), (2, "train"), (2, "eval")]
    assert recs[0]["loss"] == 2.5 and recs[0]["accuracy"] == 0.25 and recs[0]["lr"] == 1e-3
    assert math.isnan(recs[1]["kl"]) and recs[2]["loss"] == 1.75
    assert all(r["time"] >= 0 for r in recs)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples == [
        {"step": 2, "table": "samples", "prompt": "a|b", "response": "x\ny", "reward": 0.5},
        {"step": 2, "table": "samples", "prompt": "c", "reward": 1},
    ]
    events = read_tb_events(tmp_path / "tensorboard")
    scalars = {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value if v.HasField("simple_value")}
    assert scalars[("train/loss", 1)] == 2.5 and scalars[("train/loss", 2)] == 1.5
    assert scalars[("eval/loss", 2)] == 1.75 and scalars[("train/accuracy", 1)] == 0.25
    texts = [v for e in events for v in e.summary.value if v.tag.startswith("samples")]
    assert texts and "a\\|b" in texts[0].tensor.string_val[0].decode()


def test_logger_non_main_writes_nothing(tmp_path):
    with MetricsLogger(tmp_path / "run", is_main=False) as logger:
        assert logger.log(1, {"loss": jnp.float32(1.0)}) == {"loss": 1.0}
        logger.log_table(1, [{"a": 1}])
    assert not (tmp_path / "run").exists()


def test_logger_rejects_non_scalar_and_missing_wandb(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        with pytest.raises(ValueError, match="metric 'logits' must be a scalar"):
            logger.log(1, {"logits": jnp.ones(3)})
    # wandb is an optional extra: enabling it without the package must fail with a clear message
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="wandb is not installed"):
            MetricsLogger(tmp_path / "w", wandb=True)


def test_progress_quiet_under_ci_prints_compact_lines(monkeypatch):
    monkeypatch.setenv("CI", "1")

    class TTY(io.StringIO):
        def isatty(self):
            return True

    out = TTY()
    with Progress(10, desc="ppo", print_every=5, stream=out) as p:
        assert p._bar is None
        for i in range(10):
            p.update(loss=1.0 / (i + 1), reward=float(i))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("ppo step 5/10 (50%) | loss=0.2 reward=4 | ")
    assert lines[1].startswith("ppo step 10/10 (100%) | loss=0.1 reward=9 | ") and "ETA 00:00" in lines[1]


def test_progress_bar_on_tty_without_ci_and_off_is_silent(monkeypatch):
    monkeypatch.delenv("CI", raising=False)

    class TTY(io.StringIO):
        def isatty(self):
            return True

    out = TTY()
    with Progress(4, desc="sft", stream=out) as p:
        assert p._bar is not None
        p.update(2, loss=0.5)
    assert "loss=0.5" in out.getvalue() and "2/4" in out.getvalue()
    quiet = TTY()
    with Progress(4, enabled="off", stream=quiet) as p:
        p.update(4, loss=1.0)
    assert quiet.getvalue() == ""
    not_tty = io.StringIO()
    with Progress(4, stream=not_tty, print_every=2) as p:  # not a TTY → compact lines
        assert p._bar is None
        p.update(2)
    assert not_tty.getvalue().startswith("step 2/4 (50%)")


def test_timer_accumulates_splits():
    timer = Timer()
    for _ in range(2):
        with timer("generate"):
            time.sleep(0.02)
        with timer("train"):
            time.sleep(0.01)
    m = timer.as_metrics()
    assert timer.counts == {"generate": 2, "train": 2}
    assert m["time/generate"] >= 0.04 and m["time/train"] >= 0.02
    assert m["time/generate_frac"] + m["time/train_frac"] == pytest.approx(1.0)
    timer.reset()
    assert timer.as_metrics() == {}


def test_deferred_metrics_returns_previous_step():
    deferred = DeferredMetrics()
    step_fn = jax.jit(lambda x: {"loss": x * 2.0, "n": jnp.int32(3)})
    got = []
    for step in range(3):
        ready = deferred.push(step, step_fn(jnp.float32(step)))
        got.append(ready)
    got.append(deferred.flush())
    assert got == [None, (0, {"loss": 0.0, "n": 3.0}), (1, {"loss": 2.0, "n": 3.0}), (2, {"loss": 4.0, "n": 3.0})]
    assert deferred.flush() is None
    assert to_floats({"a": np.array([1.5])}) == {"a": 1.5}


def test_plot_curves_and_summary(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        for s in range(1, 6):
            logger.log(s, {"loss": 1.0 / s, "accuracy": 0.1 * s if s != 5 else 0.3})
        logger.log(5, {"loss": 0.5, "accuracy": 0.6}, split="eval")
    png = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "plots" / "curves.png", keys=("loss", "accuracy", "absent"))
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match=r"none of \['absent'\].*logged metrics: \['accuracy', 'loss'\]"):
        plot_curves(tmp_path / "metrics.jsonl", tmp_path / "x.png", keys=("absent",))
    text = summary_table(tmp_path / "metrics.jsonl", outputs={"checkpoints": "/run/ckpt"})
    lines = text.splitlines()
    assert lines[1].startswith("steps 1..5")
    row = {ln.split()[0]: ln.split()[1:] for ln in lines[3:-1]}
    assert row["train/loss"][:3] == ["0.2", "@5", "0.2"]
    assert row["train/accuracy"][:4] == ["0.3", "@5", "0.4", "@4"]  # best is max for accuracy
    assert row["eval/accuracy"][0] == "0.6"
    assert lines[-1] == "checkpoints: /run/ckpt"
    assert best_mode("eval_reward_mean") == "max" and best_mode("kl") == "min"


def test_read_metrics_names_bad_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "split": "train", "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not valid JSON"):
        read_metrics(p)
