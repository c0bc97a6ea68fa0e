"""Adapters from real public datasets, in their original formats, to the formats of `formats.py`.

The data itself is never copied into the repository: paths come from config, or from the folder named by
the `RLHF_JAX_REAL_DATA` environment variable (`real_data_path`).

* Anthropic HH-RLHF (Bai et al. 2022, https://github.com/anthropics/hh-rlhf): rows `{"chosen", "rejected"}`,
  each a whole dialogue "\\n\\nHuman: ...\\n\\nAssistant: ...". The prompt is the longest common prefix of
  the two that ends at "\\n\\nAssistant:"; turns become chat messages (Human -> user, Assistant ->
  assistant), giving conversational preference rows `prompt` / `chosen` / `rejected`.
* GSM8K (Cobbe et al. 2021, https://github.com/openai/grade-school-math): `question` -> `prompt`; the number
  after "#### " in `answer` (commas removed) -> `answer`; the worked solution is kept as `solution`.
"""

from __future__ import annotations

import os
import pathlib
import re

import datasets

ENV_VAR = "RLHF_JAX_REAL_DATA"
_ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}
_NUMBER = re.compile(r"-?\d+(\.\d+)?")


def real_data_path(name: str) -> pathlib.Path:
    """`$RLHF_JAX_REAL_DATA/name`, with an error naming the variable when it is unset or the file is missing."""
    folder = os.environ.get(ENV_VAR)
    if not folder:
        raise FileNotFoundError(f"set {ENV_VAR} to the folder holding the real data files (looking for {name})")
    path = pathlib.Path(folder) / name
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found (from {ENV_VAR}={folder})")
    return path


def dialogue_turns(text: str) -> list[dict[str, str]] | None:
    """"\\n\\nHuman: a\\n\\nAssistant: b" -> [{"role": "user", "content": "a"}, {"role": "assistant", ...}].

    Contents are stripped of surrounding whitespace. Returns None when text precedes the first turn marker.
    """
    parts = _TURN.split(text)
    if parts[0].strip():
        return None
    return [{"role": _ROLES[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]


def hh_rlhf_row(chosen: str, rejected: str) -> tuple[dict | None, str | None]:
    """One HH-RLHF pair -> ({"prompt", "chosen", "rejected"} message lists, None) or (None, skip reason).

    Skip reasons: "no_common_prompt" (no common prefix ending at "\\n\\nAssistant:"), "unparsable" (text
    before the first turn), "human_turn_in_response" (a response continues the dialogue as the human),
    "empty_response".
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(_ASSISTANT)
    if cut < 0:
        return None, "no_common_prompt"
    cut += len(_ASSISTANT)
    prompt = dialogue_turns(chosen[:cut])
    responses = [dialogue_turns("\n\nAssistant:" + side[cut:]) for side in (chosen, rejected)]
    if prompt is None or any(r is None for r in responses):
        return None, "unparsable"
    prompt = prompt[:-1]  # the trailing empty "Assistant:" marker
    if not prompt:
        return None, "unparsable"
    for turns in responses:
        if any(t["role"] != "assistant" for t in turns):
            return None, "human_turn_in_response"
        if not any(t["content"] for t in turns):
            return None, "empty_response"
    return {"prompt": prompt, "chosen": responses[0], "rejected": responses[1]}, None


def adapt_hh_rlhf(raw: datasets.Dataset, *, source: str = "hh-rlhf") -> tuple[datasets.Dataset, dict[str, int]]:
    """Convert a whole HH-RLHF file; returns the conversational preference rows and skip counts by reason."""
    for col in ("chosen", "rejected"):
        if col not in raw.column_names:
            raise ValueError(f"{source}: HH-RLHF rows need a {col!r} column; the file has {raw.column_names}")
    rows, skipped = [], {}
    for chosen, rejected in zip(raw["chosen"], raw["rejected"]):
        row, reason = hh_rlhf_row(chosen or "", rejected or "")
        if row is None:
            skipped[reason] = skipped.get(reason, 0) + 1
        else:
            rows.append(row)
    return datasets.Dataset.from_list(rows), skipped


def gsm8k_answer(solution: str) -> str | None:
    """The final answer after "#### " with thousands separators removed ("1,000" -> "1000"), or None."""
    _, sep, tail = solution.rpartition("#### ")
    if not sep:
        return None
    answer = tail.strip().replace(",", "")
    return answer if _NUMBER.fullmatch(answer) else None


def adapt_gsm8k(raw: datasets.Dataset, *, chat: bool = True, source: str = "gsm8k") -> tuple[datasets.Dataset, dict[str, int]]:
    """GSM8K rows -> `prompt` (a user message list when `chat`, else the question string), `answer`, `solution`.

    Rows without a parsable final answer are skipped and counted as "no_final_answer".
    """
    for col in ("question", "answer"):
        if col not in raw.column_names:
            raise ValueError(f"{source}: GSM8K rows need a {col!r} column; the file has {raw.column_names}")
    rows, skipped = [], {}
    for question, solution in zip(raw["question"], raw["answer"]):
        answer = gsm8k_answer(solution or "")
        if answer is None:
            skipped["no_final_answer"] = skipped.get("no_final_answer", 0) + 1
            continue
        prompt = [{"role": "user", "content": question}] if chat else question
        rows.append({"prompt": prompt, "answer": answer, "solution": solution})
    return datasets.Dataset.from_list(rows), skipped
