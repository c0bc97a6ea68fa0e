"""Verifiable rewards: exact match, numeric answers (GSM8K) and a single-digit arithmetic task.

Every reward here has the batched reward-function signature of ``rlhf_jax.rewards``::

    fn(prompts: list[str], responses: list[str], **columns) -> list[float]

and is named in configs as ``"rlhf_jax.verifiable:gsm8k_reward"`` etc. Extra dataset columns (GSM8K's
``answer``, written by ``rlhf_jax.data.real.adapt_gsm8k``) arrive as keyword lists.

Numeric answers are compared after normalisation (:func:`normalize_number`): thousands separators,
a currency ``$``, surrounding spaces and a trailing ``.0``/``.00`` are ignored, so ``"$1,000.00"``,
``"1000"`` and ``"1000.0"`` are the same answer (the tolerances of the GSM8K graders of Cobbe et al.
2021 and of TRL/OpenRLHF's math rewards). The predicted answer is the number after the last ``"####"``
when the response has one (GSM8K's solution format), else after the last "answer is", else the last
number in the response.

The arithmetic task ("3+4=" → "7") is the smallest verifiable task a tiny model can partly learn by SFT
in seconds, so that RL visibly raises its exact-match accuracy (tests/trainers/test_grpo.py).
"""

from __future__ import annotations

import random
import re
from decimal import Decimal, InvalidOperation
from typing import Optional, Sequence

_NUM = re.compile(r"-?\$?\s*\d[\d,]*(?:\.\d+)?|-?\$?\s*\.\d+")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*", re.IGNORECASE)
_ARITH = re.compile(r"^\s*(\d+)\s*([+\-*])\s*(\d+)\s*=\s*$")


def normalize_number(text: str) -> Optional[str]:
    """Canonical string of a number (``"$1,234.50"`` → ``"1234.5"``, ``"7.0"`` → ``"7"``); None if not one."""
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "")
    s = s.rstrip(".")
    if not s:
        return None
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_answer(response: str) -> Optional[str]:
    """The predicted numeric answer of a response (see module docstring), normalised; None if no number."""
    _, sep, tail = response.rpartition("####")
    if not sep:
        matches = list(_ANSWER_IS.finditer(response))
        tail = response[matches[-1].end():] if matches else response
        numbers = _NUM.findall(tail) if matches else _NUM.findall(response)
        if matches and numbers:
            return normalize_number(numbers[0])
        return normalize_number(numbers[-1]) if numbers else None
    numbers = _NUM.findall(tail)
    return normalize_number(numbers[0]) if numbers else None


def numeric_match(response: str, answer: str) -> bool:
    """Whether the response's extracted answer equals the gold ``answer`` after normalisation."""
    gold = normalize_number(str(answer))
    if gold is None:
        raise ValueError(f"numeric_match: gold answer {answer!r} is not a number")
    return extract_answer(response) == gold


def _answers(name: str, prompts: Sequence[str], columns: dict) -> list:
    if "answer" not in columns:
        raise ValueError(f"{name}: needs an 'answer' dataset column (got columns {sorted(columns)})")
    answers = list(columns["answer"])
    if len(answers) != len(prompts):
        raise ValueError(f"{name}: {len(answers)} answers for {len(prompts)} prompts")
    return answers


def gsm8k_reward(prompts: Sequence[str], responses: Sequence[str], **columns) -> list[float]:
    """1.0 when the response's numeric answer equals the row's ``answer`` column, else 0.0 (GSM8K)."""
    answers = _answers("gsm8k_reward", prompts, columns)
    return [float(numeric_match(r, a)) for r, a in zip(responses, answers)]


def exact_match(prompts: Sequence[str], responses: Sequence[str], **columns) -> list[float]:
    """1.0 when the stripped response equals the stripped ``answer`` column, else 0.0."""
    answers = _answers("exact_match", prompts, columns)
    return [float(r.strip() == str(a).strip()) for r, a in zip(responses, answers)]


# ------------------------------------------------------------------------------------ arithmetic task
def arith_answer(prompt: str) -> str:
    """The exact answer of an arithmetic prompt ``"a+b="`` (also ``-`` and ``*``)."""
    m = _ARITH.match(prompt)
    if m is None:
        raise ValueError(f"arith_answer: prompt {prompt!r} is not of the form 'a+b='")
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    return str(a + b if op == "+" else a - b if op == "-" else a * b)


def arith_reward(prompts: Sequence[str], responses: Sequence[str], **columns) -> list[float]:
    """Exact match of the stripped response with the prompt's arithmetic answer (1.0 / 0.0)."""
    if len(prompts) != len(responses):
        raise ValueError(f"arith_reward: {len(prompts)} prompts but {len(responses)} responses")
    return [float(r.strip() == arith_answer(p)) for p, r in zip(prompts, responses)]


def arith_prompts(*, max_operand: int = 9, op: str = "+") -> list[str]:
    """Every prompt ``"a+b="`` with 0 ≤ a, b ≤ max_operand, in a fixed order."""
    return [f"{a}{op}{b}=" for a in range(max_operand + 1) for b in range(max_operand + 1)]


def arith_sft_rows(n: int, *, seed: int, accuracy: float = 1.0, max_operand: int = 9) -> list[dict]:
    """``n`` prompt/completion rows; a fraction ``1 − accuracy`` of completions are wrong on purpose."""
    rng = random.Random(seed)
    prompts = arith_prompts(max_operand=max_operand)
    rows = []
    for _ in range(n):
        p = rng.choice(prompts)
        ans = arith_answer(p)
        if rng.random() >= accuracy:
            ans = str((int(ans) + rng.randint(1, 2 * max_operand)) % (2 * max_operand + 1))  # never the right one
        rows.append({"prompt": p, "completion": ans})
    return rows


def arith_prompt_rows(*, max_operand: int = 9) -> list[dict]:
    """Prompt rows (with their ``answer`` column) for online RL on the arithmetic task."""
    return [{"prompt": p, "answer": arith_answer(p)} for p in arith_prompts(max_operand=max_operand)]
