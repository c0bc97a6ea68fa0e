"""Tests for rlhf_jax.verifiable: numeric normalisation, answer extraction, GSM8K reward on real rows."""

import numpy as np
import pytest

from rlhf_jax import verifiable as V
from rlhf_jax.data import load_rows, real
from rlhf_jax.rewards import WeightedRewards, call_reward_fn


@pytest.mark.parametrize("text,expected", [
    ("18", "18"), ("$18", "18"), ("18.0", "18"), ("18.00", "18"), ("1,000", "1000"), ("$1,234.50", "1234.5"),
    (" -7 ", "-7"), ("0.25", "0.25"), ("3.", "3"), ("abc", None), ("", None), ("$", None),
])
def test_normalize_number(text, expected):
    assert V.normalize_number(text) == expected


@pytest.mark.parametrize("response,expected", [
    ("She pays 3 * 6 = 18 dollars.\n#### 18", "18"),
    ("#### $1,000.00", "1000"),
    ("so the answer is 42. Then 7 more", "42"),
    ("first 3 then 5 and finally 12.0", "12"),
    ("no digits here", None),
    ("The answer: -4", "-4"),
])
def test_extract_answer(response, expected):
    assert V.extract_answer(response) == expected


def test_gsm8k_reward_tolerances():
    prompts = ["q"] * 6
    responses = ["#### 1,000", "The answer is $1000.", "1000.0", "#### 999", "", "#### 1000\n#### 7"]
    got = V.gsm8k_reward(prompts, responses, answer=["1000"] * 6)
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # the LAST #### counts


def test_gsm8k_reward_needs_answer_column():
    with pytest.raises(ValueError, match="answer"):
        V.gsm8k_reward(["q"], ["1"])
    with pytest.raises(ValueError, match="is not a number"):
        V.numeric_match("1", "one")


def test_gsm8k_reward_on_real_rows(shared_data_dir):
    raw = load_rows(str(shared_data_dir / "gsm8k-train.jsonl"))
    rows, skipped = real.adapt_gsm8k(raw.select(range(64)), chat=False)
    assert len(rows) + sum(skipped.values()) == 64
    sols, answers, prompts = rows["solution"], rows["answer"], rows["prompt"]
    # the reference solution is always right, through the reward-function machinery (extra column)
    fns = WeightedRewards.from_specs(["rlhf_jax.verifiable:gsm8k_reward"])
    total, _ = fns(prompts, sols, {"answer": answers, "solution": sols})
    np.testing.assert_array_equal(total, np.ones(len(rows), np.float32))
    # reformatted answers ($, thousands separators, trailing .0) still match; off-by-one does not
    pretty = [f"The answer is ${int(a):,}.0" if a.lstrip("-").isdigit() else f"#### {a}" for a in answers]
    assert call_reward_fn(V.gsm8k_reward, prompts, pretty, {"answer": answers}).tolist() == [1.0] * len(rows)
    wrong = [f"#### {float(a) + 1:g}" for a in answers]
    assert call_reward_fn(V.gsm8k_reward, prompts, wrong, {"answer": answers}).tolist() == [0.0] * len(rows)
    assert any("," in s.rpartition("####")[2] for s in raw.select(range(2000))["answer"])  # commas do occur


def test_exact_match_and_arith():
    assert V.exact_match(["a", "b"], [" 7 ", "8"], answer=["7", "9"]) == [1.0, 0.0]
    assert V.arith_answer("3+4=") == "7" and V.arith_answer("9*9=") == "81" and V.arith_answer("2-5=") == "-3"
    assert V.arith_reward(["3+4=", "3+4=", "9+9="], ["7", "77", " 18"]) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="not of the form"):
        V.arith_answer("hello")
    prompts = V.arith_prompts(max_operand=2)
    assert prompts == ["0+0=", "0+1=", "0+2=", "1+0=", "1+1=", "1+2=", "2+0=", "2+1=", "2+2="]
    rows = V.arith_sft_rows(200, seed=0, accuracy=0.5, max_operand=4)
    right = np.mean([r["completion"] == V.arith_answer(r["prompt"]) for r in rows])
    assert 0.35 < right < 0.65
    assert all(r["answer"] == V.arith_answer(r["prompt"]) for r in V.arith_prompt_rows(max_operand=3))
