"""The offline demo task ("describe X with good words") and its gold scoring function.

A prompt asks to describe a topic; a response is a short list of adjectives drawn from a POSITIVE, a
NEGATIVE and a NEUTRAL word set. The gold score of a response with words w_1..w_n is

    gold = (#{i: w_i in POSITIVE} - #{i: w_i in NEGATIVE}) / max(n, 1)        in [-1, 1]

(words are the lower-cased runs of letters; any word outside the three sets counts as neutral, an empty
response scores 0). The SFT corpus mixes positive, negative and neutral words in equal proportions, so the
SFT policy's mean gold score is about 0 and an RL stage has room to raise it towards 1 just by shifting
word probabilities -- a change a tiny model learns in a few hundred CPU steps. Preference pairs are two
sampled responses to the same prompt, the one with the higher gold score "chosen" (ties are not emitted).

This mirrors the synthetic sentiment tasks used to sanity-check RLHF pipelines (e.g. the "positive IMDB
continuation" task of TRL's examples and of Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences"), shrunk so that every sequence fits in 64 tokens.

`gold_score(prompts, responses, **columns)` has the batched signature of a Python reward function that
the online-RL trainers call (extra dataset columns arrive as keyword lists and are ignored here).
"""

from __future__ import annotations

import json
import pathlib
import random
import re
from typing import Iterable, Sequence

POSITIVE = ("good", "great", "nice", "happy", "bright", "warm", "kind", "calm")
NEGATIVE = ("bad", "sad", "dull", "cold", "poor", "ugly", "rude", "awful")
NEUTRAL = ("red", "blue", "tall", "small", "round", "long", "new", "old")
TOPICS = (
    "the weather", "the movie", "the food", "the city", "the book", "the song", "the garden", "the room",
    "the car", "the teacher", "the game", "the river", "the house", "the party", "the trip", "the dog",
)
_WORD_RE = re.compile(r"[a-z]+")
_POS, _NEG = frozenset(POSITIVE), frozenset(NEGATIVE)


def make_prompt(topic: str) -> str:
    """The prompt text for one topic."""
    return f"Describe {topic}:"


def response_score(response: str) -> float:
    """Gold score of one response: (#positive - #negative) / #words, 0 for an empty response."""
    words = _WORD_RE.findall(response.lower())
    if not words:
        return 0.0
    pos = sum(w in _POS for w in words)
    neg = sum(w in _NEG for w in words)
    return (pos - neg) / len(words)


def gold_score(prompts: Sequence[str], responses: Sequence[str], **columns: Sequence) -> list[float]:
    """Batched gold reward: `response_score` of each response (the prompt does not change the score).

    Args:
      prompts: one prompt string per response (only its length is checked).
      responses: decoded response strings.
      **columns: extra dataset columns (ignored by this task; part of the reward-function signature).

    Returns:
      One float in [-1, 1] per response.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"gold_score: {len(prompts)} prompts but {len(responses)} responses")
    return [response_score(r) for r in responses]


def sample_response(rng: random.Random, *, min_words: int = 3, max_words: int = 6) -> str:
    """A mixed-quality response: each word from POSITIVE/NEGATIVE/NEUTRAL with equal probability."""
    n = rng.randint(min_words, max_words)
    words = [rng.choice(rng.choice((POSITIVE, NEGATIVE, NEUTRAL))) for _ in range(n)]
    return " " + " ".join(words) + "."


def sft_rows(n: int, *, seed: int) -> list[dict]:
    """`n` TRL prompt/completion rows with mixed-quality completions."""
    rng = random.Random(seed)
    return [{"prompt": make_prompt(rng.choice(TOPICS)), "completion": sample_response(rng)} for _ in range(n)]


def preference_rows(n: int, *, seed: int) -> list[dict]:
    """`n` TRL prompt/chosen/rejected rows labelled by the gold score (ties resampled, never emitted)."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        prompt = make_prompt(rng.choice(TOPICS))
        a, b = sample_response(rng), sample_response(rng)
        sa, sb = response_score(a), response_score(b)
        if sa == sb:
            continue
        chosen, rejected = (a, b) if sa > sb else (b, a)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def prompt_rows(n: int, *, seed: int) -> list[dict]:
    """`n` TRL prompt-only rows for online RL."""
    rng = random.Random(seed)
    return [{"prompt": make_prompt(rng.choice(TOPICS))} for _ in range(n)]


def write_jsonl(path: pathlib.Path | str, rows: Iterable[dict]) -> pathlib.Path:
    """Write rows as JSON lines (creating parent folders); returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_task_data(out_dir: pathlib.Path | str, *, n_sft: int, n_pref: int, n_eval: int, n_prompts: int,
                    seed: int = 0) -> dict[str, pathlib.Path]:
    """Write the demo corpora as JSONL under `out_dir`; returns {name: path}.

    Names: `sft_train`, `sft_eval`, `pref_train`, `pref_eval`, `prompts_train`, `prompts_eval`. Each split
    uses its own seed, so held-out rows are independent draws.
    """
    out = pathlib.Path(out_dir)
    return {
        "sft_train": write_jsonl(out / "sft_train.jsonl", sft_rows(n_sft, seed=seed)),
        "sft_eval": write_jsonl(out / "sft_eval.jsonl", sft_rows(n_eval, seed=seed + 1)),
        "pref_train": write_jsonl(out / "pref_train.jsonl", preference_rows(n_pref, seed=seed + 2)),
        "pref_eval": write_jsonl(out / "pref_eval.jsonl", preference_rows(n_eval, seed=seed + 3)),
        "prompts_train": write_jsonl(out / "prompts_train.jsonl", prompt_rows(n_prompts, seed=seed + 4)),
        "prompts_eval": write_jsonl(out / "prompts_eval.jsonl", prompt_rows(n_eval, seed=seed + 5)),
    }
