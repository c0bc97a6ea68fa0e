"""TRL's dataset formats -> prompt text and completion text(s), through the tokenizer's chat template.

Formats (column names configurable in `DataConfig`):
  prompt_completion  `prompt`, `completion`: strings, or message lists (conversational).
  messages           `messages`: a conversation; the completion is the trailing assistant turn(s).
  preference         `prompt`, `chosen`, `rejected`; or implicit-prompt `chosen`, `rejected` only (the
                     prompt is their longest common prefix, as TRL's `extract_prompt`).
  unpaired           `prompt`, `completion`, `label` (KTO).
  prompt             `prompt` (+ any extra columns, kept for reward functions).

Conversational rows are rendered as text with `apply_chat_template(tokenize=False)`: the prompt with
`add_generation_prompt=True`, the completion as the rest of the rendered whole conversation, which must
start with the rendered prompt (else the row is malformed, reason "template_mismatch").
"""

from __future__ import annotations

from typing import Any, NamedTuple

from rlhf_jax.data.config import DataConfig

# Which row formats each batch kind accepts.
TASK_FORMATS = {
    "sft": ("prompt_completion", "messages"),
    "preference": ("preference",),
    "unpaired": ("unpaired",),
    "prompt": ("prompt", "prompt_completion", "unpaired", "preference", "messages"),
}


class RowError(Exception):
    """A malformed row: `field` is the column, `reason` a short key used to count skipped rows."""

    def __init__(self, field: str, reason: str, message: str):
        super().__init__(message)
        self.field, self.reason, self.message = field, reason, message


class MalformedRowError(ValueError):
    """Raised (unless `skip_malformed`) naming the file, row index and field."""


class Rendered(NamedTuple):
    """One row as text. `completions` has one entry (SFT, KTO), two (chosen, rejected) or none (prompt)."""

    prompt: str
    completions: tuple[str, ...]
    is_chat: bool


def detect_format(columns: list[str], cfg: DataConfig, *, source: str) -> str:
    """The row format, from `cfg.format` or (for "auto") from which configured columns exist."""
    has = set(columns)
    fmt = cfg.format
    if fmt == "auto":
        if cfg.messages_field in has:
            fmt = "messages"
        elif cfg.chosen_field in has and cfg.rejected_field in has:
            fmt = "preference"
        elif {cfg.prompt_field, cfg.completion_field, cfg.label_field} <= has:
            fmt = "unpaired"
        elif {cfg.prompt_field, cfg.completion_field} <= has:
            fmt = "prompt_completion"
        elif cfg.prompt_field in has:
            fmt = "prompt"
        else:
            raise ValueError(f"{source}: cannot detect the data format from columns {sorted(has)}; set data.format")
    needed = {
        "prompt_completion": (cfg.prompt_field, cfg.completion_field),
        "messages": (cfg.messages_field,),
        "preference": (cfg.chosen_field, cfg.rejected_field),
        "unpaired": (cfg.prompt_field, cfg.completion_field, cfg.label_field),
        "prompt": (cfg.prompt_field,),
    }[fmt]
    missing = [c for c in needed if c not in has]
    if missing:
        raise ValueError(f"{source}: format {fmt!r} needs column(s) {missing}; the file has {sorted(has)}")
    return fmt


def render(row: dict[str, Any], fmt: str, task: str, cfg: DataConfig, tokenizer) -> Rendered:
    """Turn one row into prompt/completion texts for `task` ("sft" | "preference" | "unpaired" | "prompt").

    Raises:
      RowError: missing field, wrong type, empty text, no assistant turn, or a chat template whose
        rendering of the whole conversation does not start with the rendered prompt.
    """
    if fmt == "messages":
        messages = _messages(row, cfg.messages_field)
        cut = len(messages)
        while cut > 0 and messages[cut - 1]["role"] == "assistant":
            cut -= 1
        if task == "prompt":
            prompt_msgs = messages[:cut] if cut < len(messages) else messages
            return Rendered(_chat(tokenizer, prompt_msgs, generation=True, field=cfg.messages_field), (), True)
        if cut == len(messages):
            raise RowError(cfg.messages_field, "no_assistant_turn", "the conversation does not end with an assistant turn")
        prompt_text, (completion,) = _chat_split(tokenizer, messages[:cut], [messages[cut:]], cfg.messages_field)
        return Rendered(prompt_text, (completion,), True)

    if fmt == "preference" and cfg.prompt_field not in row:
        chosen, rejected = _text_or_messages(row, cfg.chosen_field), _text_or_messages(row, cfg.rejected_field)
        if isinstance(chosen, str) != isinstance(rejected, str):
            raise RowError(cfg.rejected_field, "wrong_type", "chosen and rejected must both be strings or both message lists")
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if task == "prompt":
            if isinstance(prompt, str):
                return Rendered(prompt, (), False)
            return Rendered(_chat(tokenizer, prompt, generation=True, field=cfg.chosen_field), (), True)
    else:
        prompt = _text_or_messages(row, cfg.prompt_field)
        if task == "prompt":
            if isinstance(prompt, str):
                return Rendered(prompt, (), False)
            return Rendered(_chat(tokenizer, prompt, generation=True, field=cfg.prompt_field), (), True)
        names = (cfg.chosen_field, cfg.rejected_field) if task == "preference" else (cfg.completion_field,)
        completions = [_text_or_messages(row, name) for name in names]
        for name, completion in zip(names, completions):
            if isinstance(completion, str) != isinstance(prompt, str):
                raise RowError(name, "wrong_type", f"{name!r} and {cfg.prompt_field!r} must both be strings or both message lists")
        if len(completions) == 2:
            chosen, rejected = completions
        else:
            (chosen,), rejected = completions, None
    fields = (cfg.chosen_field, cfg.rejected_field) if task == "preference" else (cfg.completion_field,)
    completions = (chosen, rejected) if task == "preference" else (chosen,)
    for name, completion in zip(fields, completions):
        if len(completion) == 0 or (isinstance(completion, str) and not completion.strip()):
            raise RowError(name, "empty_text", "the completion is empty")
    if isinstance(chosen, str):
        return Rendered(prompt, completions, False)
    prompt_text, texts = _chat_split(tokenizer, prompt, list(completions), fields[0])
    return Rendered(prompt_text, tuple(texts), True)


def extract_prompt(chosen, rejected):
    """Split implicit-prompt pairs at their longest common prefix (strings or message lists).

    Follows TRL's `extract_prompt`: for strings, a space just before the first differing character goes
    to the completions. Returns (prompt, chosen_rest, rejected_rest).
    """
    idx = 0
    limit = min(len(chosen), len(rejected))
    while idx < limit and chosen[idx] == rejected[idx]:
        idx += 1
    if isinstance(chosen, str) and 0 < idx < limit and chosen[idx - 1] == " ":
        idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


def label_of(row: dict[str, Any], field: str) -> int:
    """KTO label as 0/1 from a bool or an int 0/1."""
    if field not in row or row[field] is None:
        raise RowError(field, "missing_field", "missing")
    value = row[field]
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return int(value)
    raise RowError(field, "wrong_type", f"label must be a bool or 0/1, got {value!r}")


def prob_of(row: dict[str, Any], field: str) -> float:
    """A soft preference label: a number in [0, 1] (the probability that `chosen` is preferred)."""
    value = row.get(field)
    if value is None:
        raise RowError(field, "missing_field", "missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise RowError(field, "wrong_type", f"must be a probability in [0, 1], got {value!r}")
    return float(value)


def _text_or_messages(row: dict[str, Any], field: str):
    if field not in row or row[field] is None:
        raise RowError(field, "missing_field", "missing")
    value = row[field]
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(row, field)
    raise RowError(field, "wrong_type", f"expected a string or a message list, got {type(value).__name__}")


def _messages(row: dict[str, Any], field: str) -> list[dict[str, Any]]:
    value = row.get(field)
    if value is None:
        raise RowError(field, "missing_field", "missing")
    if not isinstance(value, list):
        raise RowError(field, "wrong_type", f"expected a message list, got {type(value).__name__}")
    if not value:
        raise RowError(field, "empty_text", "the message list is empty")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise RowError(field, "wrong_type", f"message {i} must be a dict with string 'role' and 'content'")
    return value


class NoChatTemplateError(ValueError):
    """Conversational rows but a tokenizer without a chat template (never skipped: every such row would be)."""


def _chat(tokenizer, messages, *, generation: bool, field: str) -> str:
    if not messages:
        return ""
    if getattr(tokenizer, "chat_template", None) is None:
        raise NoChatTemplateError("the row holds chat messages but the tokenizer has no chat_template")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except Exception as e:  # noqa: BLE001 -- e.g. a template that raises on non-alternating roles
        raise RowError(field, "template_error", f"the chat template failed: {type(e).__name__}: {e}") from None


def _chat_split(tokenizer, prompt_msgs, completions_msgs, field) -> tuple[str, list[str]]:
    """Render prompt (with the generation prompt) and each prompt+completion; return prompt text + suffixes."""
    prompt_text = _chat(tokenizer, prompt_msgs, generation=True, field=field) if prompt_msgs else ""
    texts = []
    for completion_msgs in completions_msgs:
        full = _chat(tokenizer, list(prompt_msgs) + list(completion_msgs), generation=False, field=field)
        if not full.startswith(prompt_text):
            raise RowError(
                field, "template_mismatch",
                "the chat template's rendering of the whole conversation does not start with its rendering of the prompt",
            )
        texts.append(full[len(prompt_text):])
    return prompt_text, texts
