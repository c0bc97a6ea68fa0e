"""Demo task: gold score golden values, corpora are deterministic, short and correctly labelled."""

import json

import pytest

from rlhf_jax import tasks


@pytest.mark.parametrize("response,want", [
    (" good nice bad.", (2 - 1) / 3),
    (" good great happy.", 1.0),
    (" awful rude.", -1.0),
    (" red blue good.", 1 / 3),
    (" Good, BAD!", 0.0),
    ("", 0.0),
    (" ???", 0.0),
    (" zzz good", 0.5),  # unknown words count as neutral
])
def test_response_score_golden(response, want):
    assert tasks.response_score(response) == pytest.approx(want)


def test_gold_score_batched_signature():
    out = tasks.gold_score(["Describe the dog:"] * 2, [" good.", " bad."], answer=["x", "y"])
    assert out == [1.0, -1.0]
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        tasks.gold_score(["a", "b"], ["c"])


def test_preferences_are_labelled_by_gold_and_untied():
    rows = tasks.preference_rows(300, seed=0)
    assert len(rows) == 300
    for r in rows:
        assert tasks.response_score(r["chosen"]) > tasks.response_score(r["rejected"])


def test_sft_corpus_mixed_quality_and_deterministic():
    rows = tasks.sft_rows(2000, seed=1)
    assert rows == tasks.sft_rows(2000, seed=1)
    scores = [tasks.response_score(r["completion"]) for r in rows]
    mean = sum(scores) / len(scores)
    assert abs(mean) < 0.05  # room for RL to improve
    assert max(scores) == 1.0 and min(scores) == -1.0
    assert all(len(r["prompt"]) + len(r["completion"]) < 80 for r in rows)


def test_write_task_data(tmp_path):
    paths = tasks.write_task_data(tmp_path, n_sft=10, n_pref=5, n_eval=4, n_prompts=3, seed=0)
    assert set(paths) == {"sft_train", "sft_eval", "pref_train", "pref_eval", "prompts_train", "prompts_eval"}
    lines = paths["pref_train"].read_text().splitlines()
    assert len(lines) == 5 and set(json.loads(lines[0])) == {"prompt", "chosen", "rejected"}
    assert paths["sft_train"].read_text() != paths["sft_eval"].read_text()
