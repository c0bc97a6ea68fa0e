"""Every format x every file type loads and encodes identically; file errors name the path (and row)."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from rlhf_jax.data import DataConfig, DataFileError, encode, load_rows
from rlhf_jax.data.batches import PreferenceBatch, PromptBatch, SFTBatch, UnpairedBatch
from rlhf_jax.data.iterator import BatchIterator

from ._helpers import FILE_KINDS, write_rows


def _chat(*turns):
    return [{"role": r, "content": c} for r, c in turns]


ROWS = {
    "prompt_completion": [{"prompt": f"Say {i}:", "completion": f" number {i}"} for i in range(4)],
    "prompt_completion_chat": [
        {"prompt": _chat(("user", f"Say {i}")), "completion": _chat(("assistant", f"number {i}"))} for i in range(4)
    ],
    "messages": [{"messages": _chat(("system", "Be brief."), ("user", f"hi {i}"), ("assistant", f"yo {i}"))} for i in range(4)],
    "preference": [{"prompt": f"Q{i}?", "chosen": " good", "rejected": f" bad {i}"} for i in range(4)],
    "preference_implicit_chat": [
        {"chosen": _chat(("user", f"Q{i}"), ("assistant", "good")), "rejected": _chat(("user", f"Q{i}"), ("assistant", "bad"))}
        for i in range(4)
    ],
    "unpaired": [{"prompt": f"Q{i}?", "completion": " ok", "label": i % 2 == 0} for i in range(4)],
    "prompt": [{"prompt": _chat(("user", f"What is {i}+1?")), "answer": str(i + 1)} for i in range(4)],
}
EXPECT = {  # row set -> (detected format, task, batch type)
    "prompt_completion": ("prompt_completion", "sft", SFTBatch),
    "prompt_completion_chat": ("prompt_completion", "sft", SFTBatch),
    "messages": ("messages", "sft", SFTBatch),
    "preference": ("preference", "preference", PreferenceBatch),
    "preference_implicit_chat": ("preference", "preference", PreferenceBatch),
    "unpaired": ("unpaired", "unpaired", UnpairedBatch),
    "prompt": ("prompt", "prompt", PromptBatch),
}
CFG = DataConfig(path="unused", max_seq_len=64, max_prompt_len=32, max_completion_len=32, shuffle=False)


@pytest.mark.parametrize("kind", FILE_KINDS)
@pytest.mark.parametrize("name", sorted(ROWS))
def test_every_format_and_file_type_loads(tmp_path, tokenizer, name, kind):
    fmt, task, batch_type = EXPECT[name]
    path = write_rows(ROWS[name], tmp_path, kind)
    rows = load_rows(path)
    assert rows.num_rows == 4
    data = encode(rows, tokenizer, CFG, task=task, source=path)
    reference = encode(datasets.Dataset.from_list(ROWS[name]), tokenizer, CFG, task=task, source="reference")
    assert data.stats.format == fmt and len(data) == 4 and data.stats.skipped == {}
    for got, want in zip(data.prompt_ids, reference.prompt_ids):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(data.completion_ids, reference.completion_ids):
        assert len(got) == len(want) == {"sft": 1, "unpaired": 1, "preference": 2, "prompt": 0}[task]
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
    batch = next(BatchIterator(data, CFG, batch_size=2, pad_id=0))
    assert isinstance(batch, batch_type)
    assert all(x.dtype == np.int32 and x.shape[0] == 2 for x in batch)
    if task == "prompt":
        assert data.extra("answer", batch.index_B) == ["1", "2"]
    if task == "unpaired":
        np.testing.assert_array_equal(batch.label_B, [1, 0])


def test_missing_file_names_path(tmp_path):
    with pytest.raises(DataFileError, match=r"nope\.jsonl: no such file"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataFileError, match="data.path is empty"):
        load_rows("")


def test_unsupported_type_names_path(tmp_path):
    (tmp_path / "rows.csv").write_text("prompt\nhi\n")
    with pytest.raises(DataFileError, match=r"rows\.csv: unsupported file type"):
        load_rows(str(tmp_path / "rows.csv"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataFileError, match="not one written by Dataset.save_to_disk"):
        load_rows(str(tmp_path / "folder"))


def test_bad_json_line_names_path_and_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": \n')
    with pytest.raises(DataFileError, match=r"bad\.jsonl: cannot read as json: row 2 \(line 3\): invalid JSON"):
        load_rows(str(path))


def test_dataset_dict_split_and_env_path(tmp_path, monkeypatch):
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list([{"prompt": "a"}] * 3), test=datasets.Dataset.from_list([{"prompt": "b"}])
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    monkeypatch.setenv("MY_DATA", str(tmp_path))
    assert load_rows("$MY_DATA/dd").num_rows == 3
    assert load_rows("$MY_DATA/dd", split="test")[0] == {"prompt": "b"}
    with pytest.raises(DataFileError, match=r"split 'dev' not found; splits are \['train', 'test'\]"):
        load_rows(str(tmp_path / "dd"), split="dev")
    monkeypatch.delenv("MY_DATA")
    with pytest.raises(DataFileError, match="environment variable"):
        load_rows("$MY_DATA/dd")
