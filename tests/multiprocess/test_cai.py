"""Constitutional AI commands on 2 processes × 4 devices equal 1 process × 8 devices: ``critique`` (each host
revises its slice of every prompt batch; process 0 writes one file in prompt order), ``label`` with the
pairwise judge, and ``rm`` on soft labels (metrics to rtol 1e-5)."""

from __future__ import annotations

import json
import pathlib
import random

import pytest

from _compare import launch, two_equal_one


def _rows(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_critique_two_processes_write_the_same_files(assets, tmp_path):
    # 16 prompts in global batches of 12: the second batch is 4 real rows, so on 2 x 4 host 1's slice is all padding
    overrides = [f"model.path={assets['model']}", f"helper_model={assets['model']}",
                 f"data.path={assets['prompts_eval']}", "rollout.batch_size=12", "rollout.max_new_tokens=6",
                 "revision.max_new_tokens=6", "n_revisions=2", "max_context_len=48"]
    out = {}
    for procs, devices in ((1, 8), (2, 4)):
        path = tmp_path / f"{procs}x{devices}" / "revised.jsonl"
        launch("critique", "critique_tiny_cpu.yaml", overrides + [f"output_path={path}"], procs, devices)
        out[procs] = (_rows(path), _rows(path.with_name("revised.trace.jsonl")))
    prompts = [json.loads(line)["prompt"] for line in pathlib.Path(assets["prompts_eval"]).read_text().splitlines()]
    assert [r["prompt"] for r in out[1][0]] == prompts
    assert out[2] == out[1]  # rows and traces, text for text


@pytest.mark.slow
def test_pairwise_label_two_processes_equal_one(assets, tmp_path):
    overrides = [f"model.path={assets['model']}", f"data.path={assets['prompts_eval']}", "rollout.batch_size=6",
                 "rollout.max_new_tokens=8", "ranker=pairwise_judge", "num_samples=2",
                 "pairwise_judge.principles=['Which is kinder?','Which is shorter?']"]
    rows = {}
    for procs, devices in ((1, 8), (2, 4)):
        path = tmp_path / f"{procs}x{devices}.jsonl"
        launch("label", "label_tiny_cpu.yaml", overrides + [f"output_path={path}"], procs, devices)
        rows[procs] = _rows(path)
    assert len(rows[1]) > 0 and len(rows[2]) == len(rows[1])
    for a, b in zip(rows[1], rows[2]):
        assert (a["prompt"], a["chosen"], a["rejected"]) == (b["prompt"], b["chosen"], b["rejected"])
        assert b["chosen_prob"] == pytest.approx(a["chosen_prob"], rel=1e-5, abs=1e-6)


@pytest.mark.slow
def test_soft_label_rm_two_processes_equal_one(assets, tmp_path):
    rng = random.Random(0)
    soft = tmp_path / "soft_pairs.jsonl"
    soft.write_text("".join(json.dumps({**r, "chosen_prob": round(rng.uniform(0.5, 1.0), 3)}) + "\n"
                            for r in _rows(pathlib.Path(assets["pref_train"]))))
    overrides = [f"model.path={assets['model']}", f"data.path={soft}", "data.eval_path=null", "batch_size=8",
                 "run.eval_every=0", "optim.warmup_steps=1", "run.keep_best_metric=null"]
    two_equal_one("rm", "rm_tiny_cpu.yaml", overrides, tmp_path)
