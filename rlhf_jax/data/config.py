"""`DataConfig`: where the data is, what format it has, how it is cut and batched.

A frozen dataclass with plain type hints and defaults, so the YAML config loader can build it generically.
Invalid values raise `ValueError` naming the field (`data.max_seq_len`, ...).
"""

from __future__ import annotations

import dataclasses

FORMATS = ("auto", "prompt_completion", "messages", "preference", "unpaired", "prompt")
ADAPTERS = ("none", "hh_rlhf", "gsm8k")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """One dataset (training data, with an optional held-out evaluation split).

    Attributes:
      path: Local file or folder: `.jsonl`, `.json`, `.jsonl.gz`/`.json.gz`, `.parquet`, `.arrow`, or a
        `Dataset.save_to_disk` folder. `~` and `$VARS` are expanded (e.g. `$RLHF_JAX_REAL_DATA/gsm8k-train.jsonl`).
      split: Split to take when `path` holds several (a `DatasetDict` folder); None = the only one or "train".
      format: Row format: "prompt_completion" (SFT `prompt`/`completion`), "messages" (SFT chat),
        "preference" (`prompt`/`chosen`/`rejected`, or implicit-prompt `chosen`/`rejected`), "unpaired"
        (KTO `prompt`/`completion`/`label`), "prompt" (online RL: `prompt` + extra columns), or "auto" to
        detect it from the column names. Text fields are either strings or chat message lists
        (`[{"role": ..., "content": ...}]`); message lists go through the tokenizer's chat template.
      adapter: Convert raw public data first: "hh_rlhf" (Anthropic HH-RLHF dialogues -> conversational
        preference rows) or "gsm8k" (`question`/`answer` -> `prompt` + numeric `answer`); "none" = rows are
        already in a format above.
      prompt_field: Column holding the prompt.
      completion_field: Column holding the completion (SFT and KTO).
      messages_field: Column holding whole conversations ("messages" format).
      chosen_field: Column holding the preferred completion.
      rejected_field: Column holding the dispreferred completion.
      label_field: Column holding the KTO label (bool, or 0/1: 1 = desirable).
      max_prompt_len: Prompts longer than this many tokens are LEFT-truncated (the end of a prompt, next
        to the completion, is kept).
      max_completion_len: Completions longer than this are cut on the right.
      max_seq_len: Cap on prompt + completion; the completion is cut further to fit. A row left with no
        completion token is malformed ("nothing_to_train").
      buckets: Padded lengths a batch may take (ascending, each <= max_seq_len); a batch is padded to the
        smallest bucket that holds its longest row, which bounds the number of compiled shapes. Empty =
        powers of two from 64 (or max_seq_len if smaller) plus max_seq_len itself.
      pack: SFT only: pack several examples per row of max_seq_len (greedy first-fit) with `segment_ids`
        and per-example `positions`.
      completion_only_loss: SFT: loss only on completion tokens (for "messages", the trailing assistant
        turns); False trains on every token except each example's first. Preference and KTO batches
        always mark only completion tokens.
      add_eos: Append the tokenizer's EOS token to plain-string completions (chat-templated completions
        already end with the template's end-of-turn token and get nothing appended).
      skip_malformed: Skip malformed rows and count them by reason instead of raising.
      shuffle: Shuffle training rows each epoch (epoch e uses permutation seed `shuffle_seed + e`).
      shuffle_seed: Seed of the per-epoch permutation and of the `eval_fraction` split.
      drop_last: Drop the last incomplete batch of an epoch (True) or pad it with all-zero-mask rows
        (False; padded `PromptBatch` rows have `index_B = -1`).
      eval_path: Separate evaluation file (same format); None = no eval file.
      eval_fraction: Fraction of `path`'s rows held out for evaluation (0 = none). Exclusive with eval_path.
    """

    path: str = ""
    split: str | None = None
    format: str = "auto"
    adapter: str = "none"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    label_field: str = "label"
    chosen_prob_field: str = "chosen_prob"  # soft preference labels P(chosen ≻ rejected), read when present (rm)
    max_prompt_len: int = 256
    max_completion_len: int = 256
    max_seq_len: int = 512
    buckets: tuple[int, ...] = ()
    pack: bool = False
    completion_only_loss: bool = True
    add_eos: bool = True
    skip_malformed: bool = False
    shuffle: bool = True
    shuffle_seed: int = 0
    drop_last: bool = True
    eval_path: str | None = None
    eval_fraction: float = 0.0

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"data.format must be one of {FORMATS}, got {self.format!r}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"data.adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        for name in ("max_prompt_len", "max_completion_len", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"data.{name} must be a positive int, got {value!r}")
        if self.max_prompt_len > self.max_seq_len:
            raise ValueError(
                f"data.max_prompt_len ({self.max_prompt_len}) must be <= data.max_seq_len ({self.max_seq_len})"
            )
        buckets = tuple(self.buckets)
        if any(not isinstance(b, int) or b < 1 for b in buckets):
            raise ValueError(f"data.buckets must be positive ints, got {self.buckets!r}")
        if list(buckets) != sorted(set(buckets)):
            raise ValueError(f"data.buckets must be strictly ascending, got {self.buckets!r}")
        if buckets and buckets[-1] > self.max_seq_len:
            raise ValueError(f"data.buckets must be <= data.max_seq_len ({self.max_seq_len}), got {self.buckets!r}")
        object.__setattr__(self, "buckets", buckets)  # YAML gives a list; keep the frozen value hashable
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if self.eval_fraction > 0 and self.eval_path:
            raise ValueError("data.eval_fraction and data.eval_path are exclusive; set one")
        if not isinstance(self.shuffle_seed, int):
            raise ValueError(f"data.shuffle_seed must be an int, got {self.shuffle_seed!r}")

    @property
    def bucket_lengths(self) -> tuple[int, ...]:
        """The padded sequence lengths in use (ascending, ending at max_seq_len)."""
        return bucket_lengths(self.buckets, self.max_seq_len)

    @property
    def prompt_bucket_lengths(self) -> tuple[int, ...]:
        """Padded prompt lengths (for `PromptBatch`): the buckets cut at max_prompt_len."""
        return bucket_lengths(tuple(b for b in self.buckets if b < self.max_prompt_len), self.max_prompt_len)


def bucket_lengths(buckets: tuple[int, ...], max_len: int) -> tuple[int, ...]:
    """Given buckets (or () for the default powers of two from 64), the ascending lengths ending at max_len."""
    if not buckets:
        buckets, b = [], 64
        while b < max_len:
            buckets.append(b)
            b *= 2
    out = [b for b in buckets if b < max_len] + [max_len]
    return tuple(out)
