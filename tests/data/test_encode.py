"""Chat templating, loss masks, truncation counts, malformed rows (errors and skip counts), config checks."""

from __future__ import annotations

import copy

import datasets
import numpy as np
import pytest

from rlhf_jax.data import DataConfig, MalformedRowError, encode
from rlhf_jax.data.formats import extract_prompt
from rlhf_jax.data.iterator import BatchIterator

from ._helpers import write_rows
from rlhf_jax.data import load_rows


def _chat(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def _cfg(**kw):
    base = dict(path="unused", max_seq_len=128, max_prompt_len=64, max_completion_len=64, shuffle=False)
    return DataConfig(**{**base, **kw})


def _first_batch(rows, tokenizer, cfg, task, batch_size=1):
    data = encode(datasets.Dataset.from_list(rows), tokenizer, cfg, task=task, source="mem")
    return next(BatchIterator(data, cfg, batch_size=batch_size, pad_id=tokenizer.pad_token_id)), data


def _decode(tokenizer, ids, mask):
    return tokenizer.decode([int(t) for t, m in zip(ids, mask) if m])


class TestChatAndMasks:
    def test_messages_completion_is_last_assistant_turn(self, tokenizer):
        messages = _chat(("system", "Be brief."), ("user", "hi there"), ("assistant", "hello!"))
        batch, _ = _first_batch([{"messages": messages}], tokenizer, _cfg(), "sft")
        ids, mask, loss = batch.input_ids_BxS[0], batch.attention_mask_BxS[0], batch.loss_mask_BxS[0]
        assert _decode(tokenizer, ids, mask) == tokenizer.apply_chat_template(messages, tokenize=False)
        assert _decode(tokenizer, ids, loss) == "hello!<|im_end|>\n"
        # Loss tokens are a contiguous run at the end of the real tokens.
        n = int(mask.sum())
        assert loss[:n].tolist() == sorted(loss[:n].tolist()) and loss[n:].sum() == 0

    def test_trailing_assistant_turns_all_trained(self, tokenizer):
        messages = _chat(("user", "q"), ("assistant", "a1"), ("assistant", "a2"))
        batch, _ = _first_batch([{"messages": messages}], tokenizer, _cfg(), "sft")
        got = _decode(tokenizer, batch.input_ids_BxS[0], batch.loss_mask_BxS[0])
        assert got == "a1<|im_end|>\n<|im_start|>assistant\na2<|im_end|>\n"

    def test_plain_prompt_completion_appends_eos(self, tokenizer):
        batch, _ = _first_batch([{"prompt": "Say one:", "completion": " one"}], tokenizer, _cfg(), "sft")
        assert _decode(tokenizer, batch.input_ids_BxS[0], batch.attention_mask_BxS[0]) == "Say one: one<|im_end|>"
        assert _decode(tokenizer, batch.input_ids_BxS[0], batch.loss_mask_BxS[0]) == " one<|im_end|>"
        batch, _ = _first_batch([{"prompt": "Say one:", "completion": " one"}], tokenizer, _cfg(add_eos=False), "sft")
        assert _decode(tokenizer, batch.input_ids_BxS[0], batch.loss_mask_BxS[0]) == " one"

    def test_completion_only_loss_false_trains_all_but_first(self, tokenizer):
        rows = [{"prompt": _chat(("user", "q")), "completion": _chat(("assistant", "a"))}]
        batch, _ = _first_batch(rows, tokenizer, _cfg(completion_only_loss=False), "sft")
        mask, loss = batch.attention_mask_BxS[0], batch.loss_mask_BxS[0]
        np.testing.assert_array_equal(loss, np.concatenate([[0], mask[1:]]))

    def test_preference_chat_masks(self, tokenizer):
        row = {"prompt": _chat(("user", "Q")), "chosen": _chat(("assistant", "good")), "rejected": _chat(("assistant", "very bad"))}
        b, _ = _first_batch([row], tokenizer, _cfg(), "preference")
        assert b.chosen_ids_BxS.shape == b.rejected_ids_BxS.shape  # one bucket for both sides
        assert _decode(tokenizer, b.chosen_ids_BxS[0], b.chosen_loss_mask_BxS[0]) == "good<|im_end|>\n"
        assert _decode(tokenizer, b.rejected_ids_BxS[0], b.rejected_loss_mask_BxS[0]) == "very bad<|im_end|>\n"
        prompt = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        for ids, mask, loss in ((b.chosen_ids_BxS, b.chosen_mask_BxS, b.chosen_loss_mask_BxS), (b.rejected_ids_BxS, b.rejected_mask_BxS, b.rejected_loss_mask_BxS)):
            assert _decode(tokenizer, ids[0], mask[0] * (1 - loss[0])) == prompt

    def test_prompt_batch_left_padded_with_generation_prompt(self, tokenizer):
        rows = [{"prompt": _chat(("user", "a much longer question here")), "answer": "1"}, {"prompt": _chat(("user", "q")), "answer": "2"}]
        b, data = _first_batch(rows, tokenizer, _cfg(), "prompt", batch_size=2)
        assert b.prompt_mask_BxP[1, 0] == 0 and b.prompt_mask_BxP[1, -1] == 1  # left padding
        assert _decode(tokenizer, b.prompt_ids_BxP[1], b.prompt_mask_BxP[1]) == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
        assert data.extra("answer", b.index_B) == ["1", "2"]

    def test_extract_prompt_follows_trl(self):
        assert extract_prompt("Q? yes", "Q? no") == ("Q?", " yes", " no")
        chosen, rejected = _chat(("user", "q"), ("assistant", "a")), _chat(("user", "q"), ("assistant", "b"))
        assert extract_prompt(chosen, rejected) == (chosen[:1], chosen[1:], rejected[1:])

    def test_template_mismatch_is_malformed(self, tokenizer):
        odd = copy.deepcopy(tokenizer)
        odd.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<gen>{% endif %}"
        with pytest.raises(MalformedRowError, match="row 0: field 'completion': the chat template"):
            _first_batch([{"prompt": _chat(("user", "q")), "completion": _chat(("assistant", "a"))}], odd, _cfg(), "sft")


class TestTruncation:
    def test_counts_and_kept_tokens(self, tokenizer):
        long_prompt = " ".join(f"w{i}" for i in range(60))
        rows = [
            {"prompt": long_prompt, "completion": " ok"},  # prompt cut
            {"prompt": "p", "completion": " " + " ".join(f"c{i}" for i in range(60))},  # completion cut at 16
            {"prompt": "p", "completion": " fine"},  # untouched
        ]
        cfg = _cfg(max_prompt_len=16, max_completion_len=16, max_seq_len=24)
        data = encode(datasets.Dataset.from_list(rows), tokenizer, cfg, task="sft", source="mem")
        full_prompt = tokenizer(long_prompt)["input_ids"]
        np.testing.assert_array_equal(data.prompt_ids[0], full_prompt[-16:])  # left truncation keeps the end
        full_completion = tokenizer(rows[1]["completion"], add_special_tokens=False)["input_ids"]
        np.testing.assert_array_equal(data.completion_ids[1][0], full_completion[:16])  # EOS cut off too
        assert (data.stats.prompt_truncated, data.stats.completion_truncated, data.stats.seq_truncated) == (1, 1, 0)
        # Cap at max_seq_len: 16 prompt tokens leave 8 for the completion.
        cfg = _cfg(max_prompt_len=16, max_completion_len=1000, max_seq_len=24)
        rows = [{"prompt": long_prompt, "completion": rows[1]["completion"]}]
        data = encode(datasets.Dataset.from_list(rows), tokenizer, cfg, task="sft", source="mem")
        assert len(data.prompt_ids[0]) + len(data.completion_ids[0][0]) == 24
        assert (data.stats.prompt_truncated, data.stats.completion_truncated, data.stats.seq_truncated) == (1, 0, 1)
        assert data.stats.as_dict()["data/seq_truncated"] == 1 and "1/1 rows kept" in data.stats.summary()

    def test_preference_counts_per_completion(self, tokenizer):
        rows = [{"prompt": "p", "chosen": " " + "x " * 40, "rejected": " " + "y " * 40}]
        data = encode(datasets.Dataset.from_list(rows), tokenizer, _cfg(max_completion_len=8), task="preference", source="mem")
        assert data.stats.completion_truncated == 2 and all(len(c) == 8 for c in data.completion_ids[0])


BAD_ROWS = [  # (row, field, reason, message fragment); row 0 of each file is good
    ({"prompt": None, "completion": " a"}, "prompt", "missing_field", "missing"),
    ({"prompt": 5, "completion": " a"}, "prompt", "wrong_type", "expected a string or a message list, got int"),
    ({"prompt": "p", "completion": "  "}, "completion", "empty_text", "the completion is empty"),
    ({"prompt": "p", "completion": _chat(("assistant", "a"))}, "completion", "wrong_type", "must both be strings or both"),
    ({"prompt": [{"role": "user"}], "completion": " a"}, "prompt", "wrong_type", "message 0 must be a dict"),
    ({"prompt": "w " * 80, "completion": " a"}, "prompt", "nothing_to_train", "the prompt fills max_seq_len=32"),
]


class TestMalformed:
    @pytest.mark.parametrize("row,field,reason,fragment", BAD_ROWS)
    def test_error_names_file_row_field(self, tmp_path, tokenizer, row, field, reason, fragment):
        path = write_rows([{"prompt": "ok", "completion": " fine"}, row], tmp_path, "jsonl")
        cfg = _cfg(max_prompt_len=32, max_seq_len=32)
        with pytest.raises(MalformedRowError) as err:
            encode(load_rows(path), tokenizer, cfg, task="sft", source=path)
        assert str(err.value).startswith(f"{path}: row 1: field '{field}': ")
        assert fragment in str(err.value)

    def test_skip_and_count_by_reason(self, tmp_path, tokenizer):
        rows = [{"prompt": "ok", "completion": " fine"}] + [r for r, *_ in BAD_ROWS] + [{"prompt": "ok2", "completion": " fine"}]
        path = write_rows(rows, tmp_path, "jsonl")
        cfg = _cfg(max_prompt_len=32, max_seq_len=32, skip_malformed=True)
        data = encode(load_rows(path), tokenizer, cfg, task="sft", source=path)
        assert len(data) == 2 and data.row_index.tolist() == [0, len(rows) - 1]
        assert data.stats.skipped == {"missing_field": 1, "wrong_type": 3, "empty_text": 1, "nothing_to_train": 1}
        assert data.stats.rows == len(rows) and data.stats.examples == 2

    def test_kto_label_and_messages_errors(self, tokenizer):
        rows = [{"prompt": "p", "completion": " c", "label": 3}]
        with pytest.raises(MalformedRowError, match=r"mem: row 0: field 'label': label must be a bool or 0/1"):
            encode(datasets.Dataset.from_list(rows), tokenizer, _cfg(), task="unpaired", source="mem")
        rows = [{"messages": _chat(("user", "q"), ("assistant", "a"))}, {"messages": _chat(("user", "only a question"))}]
        with pytest.raises(MalformedRowError, match=r"mem: row 1: field 'messages': .*does not end with an assistant turn"):
            encode(datasets.Dataset.from_list(rows), tokenizer, _cfg(), task="sft", source="mem")

    def test_wrong_format_for_task(self, tokenizer):
        rows = datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}])
        with pytest.raises(ValueError, match="format 'prompt_completion' cannot make preference batches"):
            encode(rows, tokenizer, _cfg(), task="preference", source="mem")
        with pytest.raises(ValueError, match=r"mem: format 'messages' needs column\(s\) \['messages'\]"):
            encode(rows, tokenizer, _cfg(format="messages"), task="sft", source="mem")


class TestConfig:
    @pytest.mark.parametrize(
        "kwargs,field",
        [
            (dict(format="csv"), "data.format"),
            (dict(max_seq_len=0), "data.max_seq_len"),
            (dict(max_prompt_len=600), "data.max_prompt_len"),
            (dict(buckets=(128, 64)), "data.buckets"),
            (dict(buckets=(64, 1024)), "data.buckets"),
            (dict(eval_fraction=1.5), "data.eval_fraction"),
            (dict(adapter="squad"), "data.adapter"),
        ],
    )
    def test_invalid_values_name_field(self, kwargs, field):
        with pytest.raises(ValueError, match=field):
            DataConfig(**kwargs)

    def test_buckets(self):
        assert DataConfig(max_seq_len=512).bucket_lengths == (64, 128, 256, 512)
        assert DataConfig(max_seq_len=300, max_prompt_len=100).bucket_lengths == (64, 128, 256, 300)
        assert DataConfig(max_seq_len=300, max_prompt_len=100).prompt_bucket_lengths == (64, 100)
        cfg = DataConfig(max_seq_len=256, buckets=[32, 96])  # a YAML list becomes a tuple
        assert cfg.buckets == (32, 96) and cfg.bucket_lengths == (32, 96, 256)
        assert DataConfig(max_seq_len=32, max_prompt_len=16).bucket_lengths == (32,)


class TestTemplateProblems:
    def test_no_chat_template_is_a_clear_error(self, tokenizer):
        plain = copy.deepcopy(tokenizer)
        plain.chat_template = None
        rows = datasets.Dataset.from_list([{"messages": _chat(("user", "q"), ("assistant", "a"))}])
        with pytest.raises(ValueError, match="mem: row 0: the row holds chat messages but the tokenizer has no chat_template"):
            encode(rows, plain, _cfg(skip_malformed=True), task="sft", source="mem")

    def test_template_raising_is_malformed_and_skippable(self, tokenizer):
        strict = copy.deepcopy(tokenizer)
        strict.chat_template = (
            "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
            "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['content'] }}{% endfor %}"
        )
        rows = [{"messages": _chat(("user", "q"), ("assistant", "a"))}, {"messages": _chat(("user", "q"), ("assistant", "a"), ("assistant", "b"))}]
        with pytest.raises(MalformedRowError, match="mem: row 1: field 'messages': the chat template failed: .*roles must alternate"):
            encode(datasets.Dataset.from_list(rows), strict, _cfg(), task="sft", source="mem")
        data = encode(datasets.Dataset.from_list(rows), strict, _cfg(skip_malformed=True), task="sft", source="mem")
        assert len(data) == 1 and data.stats.skipped == {"template_error": 1}
