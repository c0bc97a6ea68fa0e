"""Tokenisation and truncation of rendered rows, with counts of what was cut or skipped.

Token layout of one example: `prompt_ids + completion_ids`.
  * Plain-string rows: the prompt is tokenised with the tokenizer's special tokens (e.g. a BOS), the
    completion without, and `eos_token_id` is appended to the completion when `add_eos` (TRL does the same).
  * Chat rows: both texts come from the chat template (which already holds BOS / end-of-turn tokens), so
    both are tokenised without special tokens and nothing is appended.
Prompt and completion are tokenised separately, as at generation time (the model sees the prompt's
tokens, then produces the completion's), so no BPE merge straddles the boundary.

Truncation (TRL's "keep_end" for prompts): the prompt keeps its LAST `max_prompt_len` tokens; a completion
keeps its first `max_completion_len` tokens and then is cut to `max_seq_len - len(prompt)`. A row with no
completion token left is malformed (reason "nothing_to_train").
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import datasets
import numpy as np

from rlhf_jax.data.config import DataConfig
from rlhf_jax.data.formats import (
    TASK_FORMATS, MalformedRowError, NoChatTemplateError, RowError, detect_format, label_of, prob_of, render,
)

_TOKENIZE_CHUNK = 1024


@dataclasses.dataclass
class DataStats:
    """What loading did to one file.

    `prompt_truncated` counts rows; `completion_truncated` (cut at max_completion_len) and `seq_truncated`
    (cut further to fit max_seq_len) count completions, two per preference row. `skipped` counts
    malformed rows (and rows an adapter could not convert) by reason.
    """

    source: str
    format: str = ""
    rows: int = 0
    examples: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0
    seq_truncated: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, int]:
        """Flat ints for a metrics logger: `data/rows`, `data/skipped/<reason>`, ..."""
        out = {f"data/{k}": getattr(self, k) for k in ("rows", "examples", "prompt_truncated", "completion_truncated", "seq_truncated")}
        out.update({f"data/skipped/{reason}": n for reason, n in sorted(self.skipped.items())})
        return out

    def summary(self) -> str:
        """One line for the console."""
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())) or "none"
        return (
            f"{self.source} [{self.format}]: {self.examples}/{self.rows} rows kept; truncated: prompts "
            f"{self.prompt_truncated}, completions {self.completion_truncated} (+{self.seq_truncated} to fit "
            f"max_seq_len); skipped: {skipped}"
        )


@dataclasses.dataclass
class EncodedDataset:
    """Token ids of every kept row, ready to batch.

    Attributes:
      kind: "sft" | "preference" | "unpaired" | "prompt".
      prompt_ids: Per example, int32 prompt tokens (already truncated).
      completion_ids: Per example, a tuple of int32 completions: (completion,) for sft/unpaired,
        (chosen, rejected) for preference, () for prompt.
      labels: int32 [N] KTO labels (1 desirable), or None.
      row_index: int64 [N], the row of `rows` each example came from (PromptBatch.index_B holds these).
      chosen_prob: float32 [N] soft preference labels (`cfg.chosen_prob_field`) of preference rows whose
        file has that column, else None.
      rows: The source rows (after any adapter), for extra columns such as `answer`.
      stats: Counts of rows read, kept, truncated and skipped.
    """

    kind: str
    prompt_ids: list[np.ndarray]
    completion_ids: list[tuple[np.ndarray, ...]]
    labels: np.ndarray | None
    row_index: np.ndarray
    rows: datasets.Dataset
    stats: DataStats
    chosen_prob: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def extra(self, column: str, index_B) -> list[Any]:
        """Values of `column` for the rows in a batch's `index_B` (None for padding rows, index -1)."""
        if column not in self.rows.column_names:
            raise KeyError(f"{self.stats.source}: no column {column!r}; columns are {self.rows.column_names}")
        index = [int(i) for i in np.asarray(index_B)]
        real = [i for i in index if i >= 0]
        values = dict(zip(real, self.rows.select(real)[column])) if real else {}
        return [values[i] if i >= 0 else None for i in index]


def encode(rows: datasets.Dataset, tokenizer, cfg: DataConfig, *, task: str, source: str, stats: DataStats | None = None) -> EncodedDataset:
    """Render, tokenise and truncate every row for one batch kind.

    Args:
      rows: The loaded rows.
      tokenizer: A Hugging Face tokenizer (`eos_token_id` set; a chat template for conversational rows).
      cfg: Format, field names, length limits, `skip_malformed`.
      task: "sft" | "preference" | "unpaired" | "prompt" (which batch type the rows will become).
      source: Name used in messages (the file path).
      stats: Counts to continue (e.g. an adapter's skips); a fresh `DataStats` if None.

    Raises:
      MalformedRowError: naming `source`, the row index and the field (unless `cfg.skip_malformed`).
      ValueError: the format does not fit `task`, or columns are missing.
    """
    if task not in TASK_FORMATS:
        raise ValueError(f"task must be one of {list(TASK_FORMATS)}, got {task!r}")
    fmt = detect_format(rows.column_names, cfg, source=source)
    if fmt not in TASK_FORMATS[task]:
        raise ValueError(f"{source}: format {fmt!r} cannot make {task} batches; expected one of {TASK_FORMATS[task]}")
    stats = stats or DataStats(source=source)
    stats.format = fmt
    skipped = collections.Counter(stats.skipped)
    eos = tokenizer.eos_token_id
    if eos is None and cfg.add_eos and task != "prompt":
        raise ValueError(f"{source}: data.add_eos is set but the tokenizer has no eos_token")

    def fail(i: int, err: RowError, field: str | None = None):
        if not cfg.skip_malformed:
            raise MalformedRowError(f"{source}: row {i}: field {field or err.field!r}: {err.message}") from None
        skipped[err.reason] += 1

    rendered, labels, probs, kept = [], [], [], []
    soft = task == "preference" and cfg.chosen_prob_field in rows.column_names
    for i, row in enumerate(_iter_rows(rows)):
        stats.rows += 1
        try:
            r = render(row, fmt, task, cfg, tokenizer)
            if task == "prompt" and not r.prompt.strip():
                raise RowError(cfg.prompt_field, "empty_text", "the prompt is empty")
            if task == "unpaired":
                labels.append(label_of(row, cfg.label_field))
            if soft:
                probs.append(prob_of(row, cfg.chosen_prob_field))
        except RowError as err:
            fail(i, err)
            continue
        except NoChatTemplateError as err:
            raise ValueError(f"{source}: row {i}: {err}") from None
        rendered.append(r)
        kept.append(i)
    prompt_field = cfg.messages_field if fmt == "messages" else cfg.prompt_field
    prompts = _tokenize(tokenizer, [r.prompt for r in rendered], special=[not r.is_chat for r in rendered])
    n_comp = len(rendered[0].completions) if rendered else 0
    comps = [
        _tokenize(tokenizer, [r.completions[k] for r in rendered], special=[False] * len(rendered)) for k in range(n_comp)
    ]
    out_prompts, out_comps, out_rows, out_labels, out_probs = [], [], [], [], []
    for j, (i, r) in enumerate(zip(kept, rendered)):
        extra = [eos] if cfg.add_eos and not r.is_chat else []
        cut = _truncate(prompts[j], [comps[k][j] + extra for k in range(n_comp)], cfg, task=task)
        if cut is None:
            fail(i, RowError(prompt_field, "nothing_to_train", f"the prompt fills max_seq_len={cfg.max_seq_len}"))
            continue
        p, cs, (p_cut, c_cut, s_cut) = cut
        stats.prompt_truncated += p_cut
        stats.completion_truncated += c_cut
        stats.seq_truncated += s_cut
        out_prompts.append(p)
        out_comps.append(cs)
        out_rows.append(i)
        if task == "unpaired":
            out_labels.append(labels[j])
        if soft:
            out_probs.append(probs[j])
    stats.examples += len(out_prompts)
    stats.skipped = dict(skipped)
    return EncodedDataset(
        kind=task,
        prompt_ids=out_prompts,
        completion_ids=out_comps,
        labels=np.asarray(out_labels, np.int32) if task == "unpaired" else None,
        row_index=np.asarray(out_rows, np.int64),
        rows=rows,
        stats=stats,
        chosen_prob=np.asarray(out_probs, np.float32) if soft else None,
    )


def _truncate(prompt: list[int], completions: list[list[int]], cfg: DataConfig, *, task: str):
    """Left-truncate the prompt, cap completions; returns (prompt, completions, (#p, #c, #s cuts)) or None
    when no completion token fits (see the module docstring for the policy)."""
    p_cut = int(len(prompt) > cfg.max_prompt_len)
    if p_cut:
        prompt = prompt[-cfg.max_prompt_len:]
    room = cfg.max_seq_len - len(prompt)
    if task != "prompt" and room <= 0:
        return None
    out, c_cut, s_cut = [], 0, 0
    for c in completions:
        if len(c) > cfg.max_completion_len:
            c, c_cut = c[: cfg.max_completion_len], c_cut + 1
        if len(c) > room:
            c, s_cut = c[:room], s_cut + 1
        out.append(np.asarray(c, np.int32))
    return np.asarray(prompt, np.int32), tuple(out), (p_cut, c_cut, s_cut)


def _iter_rows(rows: datasets.Dataset):
    """Rows as dicts, read a column-batch at a time (much faster than `iter(dataset)`)."""
    for batch in rows.iter(batch_size=_TOKENIZE_CHUNK):
        columns = list(batch)
        yield from (dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns)))


def _tokenize(tokenizer, texts: list[str], *, special: list[bool]) -> list[list[int]]:
    """Batch-tokenise, grouping texts by whether special tokens are added."""
    out: list[list[int] | None] = [None] * len(texts)
    for flag in (True, False):
        idx = [i for i, s in enumerate(special) if s == flag]
        for start in range(0, len(idx), _TOKENIZE_CHUNK):
            chunk = idx[start : start + _TOKENIZE_CHUNK]
            ids = tokenizer([texts[i] for i in chunk], add_special_tokens=flag)["input_ids"]
            for i, seq in zip(chunk, ids):
                out[i] = list(seq)
    return out  # type: ignore[return-value]
