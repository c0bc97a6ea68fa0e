"""`rlhf-jax plan` of a LoRA DPO run: the reference is the policy's adapters-off base, so nothing but the policy
is resident (a full fine-tune plans a second, reference copy of the params)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from rlhf_jax import fixtures

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _plan(tmp_path, *overrides):
    d = tmp_path / "model"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(fixtures.tiny_config("llama", vocab_size=4096, hidden=64, layers=2)))
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "rlhf_jax", "plan", str(ROOT / "configs" / "dpo_tiny_cpu.yaml"),
                           f"model.path={d}", *overrides, "--topology", "cpu-8", "--json", str(out)],
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_lora_dpo_plan_has_no_reference_copy(tmp_path):
    full = _plan(tmp_path / "full")
    ours = _plan(tmp_path / "lora", "model.lora.rank=4", "model.lora.targets=[all]")
    assert any("reference" in k for k in full["contributors"])
    assert not any("reference" in k for k in ours["contributors"])
    names = [p["name"] for p in ours["programs"]]
    assert "reference_logps" in names and "train_step" in names
