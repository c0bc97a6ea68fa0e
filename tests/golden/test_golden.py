"""Golden metrics: every CLI trainer, run for 3 steps on tiny configs, logs exactly what the pre-refactor code
(commit 8fe9375) logged.

`runner.py` says what runs and what is recorded. On the recording's machine fingerprint (jax/jaxlib
versions, CPU architecture and flags, usable cores, XLA_FLAGS) the values must be bit-for-bit equal; on a
different fingerprint they are compared with rtol=1e-4, atol=1e-6 (strings and record structure still
exactly).

To check another tree than the installed package: ``PYTHONPATH=/path/to/tree python -m pytest tests/golden``.
To re-record (only from the pre-refactor tree!): see runner.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys

import numpy as np
import pytest

_HERE = pathlib.Path(__file__).resolve().parent
GOLDEN_PATH = _HERE / "metrics.json"
ATOL = 1e-6
# On another CPU (a different machine fingerprint) XLA picks other kernels: after 3 RL steps values drift by up to
# ~1.4e-4 relative (ppo_rm on a host with other CPU flags, 2026-12-07), so the cross-machine check uses 1e-3.
CROSS_RTOL = 1e-3
# Pair accuracies count margins > 0; at step 0 the policy is the reference and the margins are rounding noise
# (~1e-7), so on another CPU one pair of the 8 may flip: one pair is allowed there, nothing more.
PAIR_FLIP = 1.0 / 8


def _load_runner():
    # By file path: works under --import-mode=importlib, from any working directory, with or without xdist.
    name = "rlhf_jax_golden_runner"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _HERE / "runner.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


runner = _load_runner()


@pytest.fixture(scope="session")
def golden() -> dict:
    return json.loads(GOLDEN_PATH.read_text())


@pytest.fixture(scope="session")
def current(request, tmp_path_factory) -> dict:
    """Run the variants this session selected (all of them, unless -k narrowed it) in one child process."""
    selected = [item.callspec.params["variant"] for item in request.session.items
                if getattr(item, "callspec", None) is not None and "variant" in item.callspec.params
                and pathlib.Path(item.path).resolve() == pathlib.Path(__file__).resolve()]
    names = [n for n in runner.VARIANTS if n in set(selected)] or list(runner.VARIANTS)
    return runner.run_variants(names, scratch=tmp_path_factory.mktemp("golden_runs"))


def test_recording_matches_the_runner_definition(golden):
    """metrics.json holds every variant with the same command, config and overrides as runner.VARIANTS."""
    assert golden["format"] == runner.FORMAT and golden["steps"] == runner.STEPS
    assert set(golden["variants"]) == set(runner.VARIANTS), (
        f"recorded variants {sorted(golden['variants'])} != runner.VARIANTS {sorted(runner.VARIANTS)}; "
        "re-record from the pre-refactor tree (see runner.py)")
    for name, rec in golden["variants"].items():
        command, config, _ = runner.VARIANTS[name]
        assert (rec["command"], rec["config"], rec["overrides"]) == (command, config, runner.describe_overrides(name)), (
            f"{name}: the runner's definition changed since recording; re-record from the pre-refactor tree")
        assert rec["records"], f"{name}: nothing recorded"


def _flatten(records: list[dict], variant: str):
    """(numeric labels, numeric values, {label: non-numeric value}) of a record list."""
    labels, values, other = [], [], {}
    for i, rec in enumerate(records):
        for k in sorted(rec):
            v, label = rec[k], f"{variant}[{i}].{k}"
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                labels.append(label)
                values.append(float(v))
            else:
                other[label] = v
    return labels, np.asarray(values, np.float64), other


def _fingerprint_note(golden: dict, now: dict) -> str:
    diff = {k: (golden["fingerprint"].get(k), now.get(k)) for k in set(golden["fingerprint"]) | set(now)
            if golden["fingerprint"].get(k) != now.get(k)}
    return (f"machine fingerprint differs from the recording's ({diff}), so values were compared with "
            f"np.isclose(rtol={CROSS_RTOL}, atol={ATOL}; accuracies within one pair) instead of bit-for-bit")


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(runner.VARIANTS))
def test_golden_metrics(variant, golden, current):
    got = current["variants"][variant]
    assert "error" not in got, f"{variant}: the run failed: {got.get('error')}"
    expected = golden["variants"][variant]["records"]
    actual = got["records"]
    exact = golden["fingerprint"] == current["fingerprint"]
    where = f"(code under test: {current['code_root']}; recorded from {golden['recorded_from']})"
    if exact:
        diffs = runner.diff_exact(expected, actual, variant)
        assert not diffs, (f"{variant}: not bit-identical to the golden recording on the same machine fingerprint "
                           f"{where}; {len(diffs)} difference(s):\n  " + "\n  ".join(diffs[:40]))
        return
    note = _fingerprint_note(golden, current["fingerprint"])
    assert len(expected) == len(actual), f"{variant}: {len(expected)} records recorded, {len(actual)} now ({note})"
    for i, (e, a) in enumerate(zip(expected, actual)):
        assert set(e) == set(a), (f"{variant}[{i}]: keys differ: missing {sorted(set(e) - set(a))}, extra "
                                  f"{sorted(set(a) - set(e))} ({note})")
    e_labels, e_vals, e_other = _flatten(expected, variant)
    a_labels, a_vals, a_other = _flatten(actual, variant)
    assert e_labels == a_labels, f"{variant}: numeric fields differ in type/position ({note})"
    assert e_other == a_other, (f"{variant}: non-numeric fields differ: "
                                f"{ {k: (e_other[k], a_other.get(k)) for k in e_other if e_other[k] != a_other.get(k)} } "
                                f"({note})")
    atol = np.array([PAIR_FLIP + ATOL if lab.endswith("accuracy") else ATOL for lab in e_labels])
    close = np.isclose(a_vals, e_vals, rtol=CROSS_RTOL, atol=atol, equal_nan=True)
    off = [f"{lab}: recorded {ev!r}, now {av!r}" for lab, ev, av, ok in zip(e_labels, e_vals, a_vals, close) if not ok]
    assert close.all(), (f"{variant}: {note} {where}; outside rtol={CROSS_RTOL} (accuracies: one pair):\n  "
                         + "\n  ".join(off[:40]))


def test_exact_comparison_helpers():
    """diff_exact is bit-exact (no tolerance), NaN-aware and key-strict."""
    assert runner.diff_exact([{"a": 1.0, "s": "x"}], [{"a": 1.0, "s": "x"}]) == []
    assert runner.diff_exact([{"a": 1.0}], [{"a": math.nextafter(1.0, 2.0)}])
    assert runner.diff_exact([{"a": float("nan")}], [{"a": float("nan")}]) == []
    assert runner.diff_exact([{"a": 1.0}], [{"a": 1.0, "b": 2.0}])
    assert runner.diff_exact([{"s": "x"}], [{"s": "y"}])
    assert runner.diff_exact([{"a": 1.0}], [{"a": 1.0}, {"a": 1.0}])
    assert not runner.is_timing_key("loss") and not runner.is_timing_key("kl_coef")
    assert all(runner.is_timing_key(k) for k in ("time", "steps_per_s", "tokens_per_s", "time/generate",
                                                 "time/train_frac"))
