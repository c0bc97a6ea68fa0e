"""Real public data (../shared/data): HH-RLHF pairs and GSM8K answers through the same loaders."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from rlhf_jax.data import DataConfig, build_data, encode, load_rows
from rlhf_jax.data.real import adapt_gsm8k, adapt_hh_rlhf, dialogue_turns, gsm8k_answer, hh_rlhf_row, real_data_path

HH = "hh-rlhf-harmless-base-test.jsonl.gz"


@pytest.fixture(scope="module")
def hh(shared_data_dir):
    path = str(shared_data_dir / HH)
    return path, adapt_hh_rlhf(load_rows(path), source=path)


class TestHHRLHF:
    def test_counts(self, hh):
        _, (rows, skipped) = hh
        assert rows.num_rows == 2308  # 2,312 pairs in the file
        assert skipped == {"empty_response": 4}  # every pair shares a prompt ending at "\n\nAssistant:"

    def test_exact_first_pair(self, hh):
        _, (rows, _) = hh
        row = rows[0]
        assert [t["role"] for t in row["prompt"]] == ["user", "assistant", "user", "assistant", "user"]
        assert row["prompt"][0]["content"] == "what are some pranks with a pen i can do?"
        assert row["prompt"][2]["content"] == "yep"
        assert row["prompt"][4]["content"] == "okay some of these do not have anything to do with pens"
        assert row["chosen"] == [
            {"role": "assistant", "content": "No, sorry!  All of these involve a pen, the point is that you can get funny results by doing pranks with pens."}
        ]
        assert row["rejected"][0]["content"].startswith("There are lots of funny things you can do with pens, here’s one example")

    def test_multi_turn_response_and_skips(self, shared_data_dir):
        with gzip.open(shared_data_dir / HH, "rt", encoding="utf-8") as f:
            raw = [json.loads(line) for line in f]
        row, reason = hh_rlhf_row(raw[1952]["chosen"], raw[1952]["rejected"])  # chosen continues in a 2nd Assistant turn
        assert reason is None and [t["role"] for t in row["chosen"]] == ["assistant", "assistant"]
        assert row["chosen"][0]["content"] == "Alrighty, I’ll do my best, here’s the key:"
        assert hh_rlhf_row(raw[86]["chosen"], raw[86]["rejected"]) == (None, "empty_response")
        assert hh_rlhf_row("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: c\n\nAssistant: d") == (None, "no_common_prompt")
        assert hh_rlhf_row("\n\nHuman: a\n\nAssistant: b\n\nHuman: x", "\n\nHuman: a\n\nAssistant: c") == (None, "human_turn_in_response")
        assert dialogue_turns("\n\nHuman: hi \n\nAssistant: yo") == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]

    def test_preference_loader_masks(self, hh, tokenizer):
        path, (rows, _) = hh
        cfg = DataConfig(path=path, max_seq_len=2048, max_prompt_len=1536, max_completion_len=512)
        data = encode(rows.select(range(40)), tokenizer, cfg, task="preference", source=path)
        assert data.stats.format == "preference" and len(data) == 40
        chosen = tokenizer.decode(data.completion_ids[0][0].tolist())
        assert chosen == rows[0]["chosen"][0]["content"] + "<|im_end|>\n"
        prompt = tokenizer.decode(data.prompt_ids[0].tolist())
        assert prompt.startswith("<|im_start|>user\nwhat are some pranks") and prompt.endswith("<|im_start|>assistant\n")

    @pytest.mark.slow  # tokenises all 2,312 real dialogues (~10 s on 2 busy cores)
    def test_build_data_end_to_end(self, shared_data_dir, tokenizer, monkeypatch):
        monkeypatch.setenv("RLHF_JAX_REAL_DATA", str(shared_data_dir))
        cfg = DataConfig(path=f"$RLHF_JAX_REAL_DATA/{HH}", adapter="hh_rlhf", max_seq_len=256, max_prompt_len=192, max_completion_len=64)
        splits = build_data(cfg, tokenizer, task="preference", batch_size=8)
        s = splits.stats
        assert (s.rows, s.examples, s.skipped) == (2312, 2308, {"hh_rlhf/empty_response": 4})
        assert s.prompt_truncated > 0 and s.completion_truncated > 0  # long real dialogues get cut, and counted
        batch = next(splits.train)
        assert batch.chosen_ids_BxS.shape[1] in cfg.bucket_lengths
        assert (batch.chosen_loss_mask_BxS.sum(1) > 0).all() and (batch.rejected_loss_mask_BxS.sum(1) > 0).all()
        assert real_data_path(HH) == shared_data_dir / HH


class TestGSM8K:
    @pytest.mark.parametrize("name,n", [("gsm8k-train.jsonl", 7473), ("gsm8k-test.jsonl", 1319)])
    def test_all_answers_parse(self, shared_data_dir, name, n):
        rows, skipped = adapt_gsm8k(load_rows(str(shared_data_dir / name)))
        assert rows.num_rows == n and skipped == {}
        assert all(a.lstrip("-").isdigit() for a in rows["answer"])

    def test_exact_examples(self, shared_data_dir):
        rows, _ = adapt_gsm8k(load_rows(str(shared_data_dir / "gsm8k-train.jsonl")))
        assert rows[0]["prompt"] == [
            {"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?"}
        ]
        assert rows[0]["answer"] == "72" and rows[0]["solution"].endswith("#### 72")
        assert rows[345]["answer"] == "1080" and rows[5715]["answer"] == "-7"  # "1,080"; a negative answer
        assert gsm8k_answer("x\n#### 1,234,567") == "1234567" and gsm8k_answer("no marker") is None
        plain, _ = adapt_gsm8k(load_rows(str(shared_data_dir / "gsm8k-test.jsonl")), chat=False)
        assert plain[0]["prompt"].startswith("Janet’s ducks lay 16 eggs per day.")

    def test_prompt_batches_carry_answers(self, shared_data_dir, tokenizer):
        cfg = DataConfig(path=str(shared_data_dir / "gsm8k-test.jsonl"), adapter="gsm8k", max_prompt_len=256, max_seq_len=512, eval_fraction=0.1)
        splits = build_data(cfg, tokenizer, task="prompt", batch_size=16)
        assert splits.stats.examples + splits.eval_stats.examples == 1319
        batch = next(splits.train)
        answers = splits.train.data.extra("answer", batch.index_B)
        rows = splits.train.data.rows
        for b, (i, answer) in enumerate(zip(batch.index_B.tolist(), answers)):
            assert answer == rows[i]["answer"]
            text = tokenizer.decode(batch.prompt_ids_BxP[b][batch.prompt_mask_BxP[b] > 0].tolist())
            question = rows[i]["prompt"][0]["content"]
            if len(tokenizer(question)["input_ids"]) < 200:  # untruncated prompts decode exactly
                assert text == f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        eval_batches = list(splits.eval)
        assert sum(int((b.index_B >= 0).sum()) for b in eval_batches) == splits.eval_stats.examples
        assert np.all(eval_batches[-1].index_B[: 1] >= 0)
