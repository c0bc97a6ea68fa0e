"""Local datasets -> typed batches: loading, TRL formats, chat templates, truncation, buckets, packing,
per-host shards, and adapters for real public data (HH-RLHF, GSM8K).

Typical use in a trainer::

    splits = build_data(cfg.data, tokenizer, task="sft", batch_size=8,
                        process_index=jax.process_index(), process_count=jax.process_count())
    print(splits.stats.summary())
    for batch in splits.train: ...            # SFTBatch of numpy int32, forever (epochs cycle)
    ckpt["data"] = splits.train.state()        # {"epoch": e, "index": i}; later splits.train.restore(...)
"""

from __future__ import annotations

import dataclasses

from rlhf_jax.data.batches import PreferenceBatch, PromptBatch, SFTBatch, SoftPreferenceBatch, UnpairedBatch
from rlhf_jax.data.config import DataConfig
from rlhf_jax.data.encode import DataStats, EncodedDataset, encode
from rlhf_jax.data.formats import MalformedRowError
from rlhf_jax.data.iterator import BatchIterator
from rlhf_jax.data.loading import DataFileError, load_rows
from rlhf_jax.data import real

__all__ = [
    "BatchIterator", "DataConfig", "DataFileError", "DataSplits", "DataStats", "EncodedDataset",
    "MalformedRowError", "PreferenceBatch", "PromptBatch", "SFTBatch", "SoftPreferenceBatch", "UnpairedBatch",
    "build_data", "encode", "load_encoded", "load_rows", "pad_id_of",
]


@dataclasses.dataclass
class DataSplits:
    """Training iterator (shuffled, cycling), optional eval iterator (in order, one epoch, last batch
    padded), and their load statistics."""

    train: BatchIterator
    eval: BatchIterator | None
    stats: DataStats
    eval_stats: DataStats | None


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is masked, so its value never matters)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def _load_adapted(cfg: DataConfig, tokenizer, path: str):
    rows = load_rows(path, split=cfg.split)
    stats = DataStats(source=path)
    if cfg.adapter == "hh_rlhf":
        rows, skipped = real.adapt_hh_rlhf(rows, source=path)
    elif cfg.adapter == "gsm8k":
        rows, skipped = real.adapt_gsm8k(rows, chat=getattr(tokenizer, "chat_template", None) is not None, source=path)
    else:
        skipped = {}
    stats.rows = sum(skipped.values())
    stats.skipped = {f"{cfg.adapter}/{k}": v for k, v in skipped.items()}
    return rows, stats


def load_encoded(cfg: DataConfig, tokenizer, *, task: str, path: str | None = None) -> EncodedDataset:
    """Load `path` (default `cfg.path`), apply `cfg.adapter`, then render/tokenise/truncate for `task`."""
    path = path or cfg.path
    rows, stats = _load_adapted(cfg, tokenizer, path)
    return encode(rows, tokenizer, cfg, task=task, source=path, stats=stats)


def build_data(
    cfg: DataConfig,
    tokenizer,
    *,
    task: str,
    batch_size: int,
    eval_batch_size: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    soft_labels: bool = False,
) -> DataSplits:
    """Iterators of typed batches for one trainer.

    Args:
      cfg: The data config.
      tokenizer: Hugging Face tokenizer (with a chat template for conversational rows).
      task: "sft" -> SFTBatch, "preference" -> PreferenceBatch (reward model, DPO family),
        "unpaired" -> UnpairedBatch (KTO), "prompt" -> PromptBatch (PPO, GRPO family, online DPO).
      batch_size: Rows per batch on this host; the global batch is batch_size * process_count.
      eval_batch_size: Per-host eval batch size (default batch_size).
      process_index, process_count: This host and the number of hosts (`jax.process_index()`/`_count()`).
      soft_labels: preference files with a `data.chosen_prob_field` column give `SoftPreferenceBatch`.

    Returns:
      DataSplits; `eval` is None unless `cfg.eval_path` or `cfg.eval_fraction` is set.
    """
    rows, stats = _load_adapted(cfg, tokenizer, cfg.path)
    eval_rows = eval_stats = None
    if cfg.eval_fraction > 0:
        split = rows.train_test_split(test_size=cfg.eval_fraction, seed=cfg.shuffle_seed, shuffle=True)
        rows, eval_rows = split["train"], split["test"]
        eval_stats = DataStats(source=f"{cfg.path} (eval {cfg.eval_fraction:g})")
    elif cfg.eval_path:
        eval_rows, eval_stats = _load_adapted(cfg, tokenizer, cfg.eval_path)
    data = encode(rows, tokenizer, cfg, task=task, source=cfg.path, stats=stats)
    pad_id = pad_id_of(tokenizer)
    host = dict(pad_id=pad_id, process_index=process_index, process_count=process_count, soft_labels=soft_labels)
    train = BatchIterator(data, cfg, batch_size=batch_size, **host)
    evaluation = None
    if eval_rows is not None:
        eval_data = encode(eval_rows, tokenizer, cfg, task=task, source=eval_stats.source, stats=eval_stats)
        evaluation = BatchIterator(
            eval_data, cfg, batch_size=eval_batch_size or batch_size, shuffle=False, drop_last=False, num_epochs=1, **host
        )
    return DataSplits(train=train, eval=evaluation, stats=data.stats, eval_stats=evaluation.data.stats if evaluation else None)
