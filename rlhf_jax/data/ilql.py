"""Offline RL rows for ILQL: `prompt`/`completion` with a scalar `reward` (or per-token `rewards`) -> `ILQLBatch`.

As trlx's ``make_experience`` (``trlx/trainer/accelerate_ilql_trainer.py``): a scalar reward is placed on the
last completion token (the rest 0) after the rewards of the whole training set are standardised,
``(r − mean) / (std + eps)`` (``normalize_rewards``; torch's unbiased std); a per-token list is used as given
(one float per completion token, EOS included when `data.add_eos`; cut like the completion when truncated).

Shapes are static for every host: prompts LEFT-padded to ``data.max_prompt_len`` (P), completions
RIGHT-padded to ``data.max_completion_len`` (T), so that ``[prompt | completion]`` puts the state before
action t at position P − 1 + t for every row.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np

from rlhf_jax.data.config import DataConfig
from rlhf_jax.data.encode import EncodedDataset
from rlhf_jax.data.iterator import BatchIterator


class ILQLBatch(NamedTuple):
    """Prompt + completion with per-token rewards. Padding rows have all-zero masks."""

    prompt_ids_BxP: jax.Array
    prompt_mask_BxP: jax.Array
    response_ids_BxT: jax.Array
    response_mask_BxT: jax.Array
    rewards_BxT: jax.Array  # float32, 0 on padding


def _float(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def token_rewards(data: EncodedDataset, *, reward_field: str, rewards_field: str,
                  normalize: bool) -> list[np.ndarray]:
    """Per-token float32 rewards of every example of `data` (see the module docstring).

    Raises:
      ValueError: naming the file, row and field, for a missing, non-numeric or mis-sized reward.
    """
    cols = data.rows.column_names
    source = data.stats.source
    per_token = rewards_field in cols
    if not per_token and reward_field not in cols:
        raise ValueError(f"{source}: ILQL rows need a {reward_field!r} column (one float per row) or a "
                         f"{rewards_field!r} column (one float per completion token); columns are {cols}")
    field = rewards_field if per_token else reward_field
    values = data.rows.select([int(i) for i in data.row_index])[field] if len(data) else []
    out = []
    if per_token:
        for row, comp, vals in zip(data.row_index, data.completion_ids, values):
            where = f"{source}: row {int(row)}: field {field!r}"
            if not isinstance(vals, (list, tuple)):
                raise ValueError(f"{where}: expected a list of floats, got {vals!r}")
            n = len(comp[0])
            if len(vals) < n:
                raise ValueError(f"{where}: {len(vals)} rewards for {n} completion tokens")
            out.append(np.asarray([_float(v, where) for v in vals[:n]], np.float32))
        return out
    returns = np.asarray([_float(v, f"{source}: row {int(r)}: field {field!r}")
                          for r, v in zip(data.row_index, values)], np.float64)
    if normalize and len(returns) > 1:  # trlx: returns - mean, / (std + eps) unless std is NaN
        returns = returns - returns.mean()
        returns = returns / (returns.std(ddof=1) + np.finfo(np.float64).eps)
    for comp, ret in zip(data.completion_ids, returns):
        r = np.zeros(len(comp[0]), np.float32)
        r[-1] = ret
        out.append(r)
    return out


def ilql_batch(prompts: list[np.ndarray], completions: list[np.ndarray], rewards: list[np.ndarray], *,
               batch_size: int, prompt_len: int, completion_len: int, pad_id: int) -> ILQLBatch:
    """Left-pad prompts to `prompt_len`, right-pad completions and rewards to `completion_len`; rows past
    the given ones (a padded last batch) are all padding."""
    B, P, T = batch_size, prompt_len, completion_len
    p_ids, p_mask = np.full((B, P), pad_id, np.int32), np.zeros((B, P), np.int32)
    r_ids, r_mask = np.full((B, T), pad_id, np.int32), np.zeros((B, T), np.int32)
    rew = np.zeros((B, T), np.float32)
    for b, (p, c, r) in enumerate(zip(prompts, completions, rewards)):
        p, c, r = p[-P:], c[:T], r[:T]
        p_ids[b, P - len(p):], p_mask[b, P - len(p):] = p, 1
        r_ids[b, :len(c)], r_mask[b, :len(c)], rew[b, :len(c)] = c, 1, r
    return ILQLBatch(p_ids, p_mask, r_ids, r_mask, rew)


class ILQLIterator(BatchIterator):
    """A `BatchIterator` over SFT-encoded rows that yields `ILQLBatch`es (same order, shards, resume)."""

    def __init__(self, data: EncodedDataset, cfg: DataConfig, rewards: list[np.ndarray], **kwargs):
        super().__init__(data, cfg, **kwargs)
        empty = [int(data.row_index[i]) for i, p in enumerate(data.prompt_ids) if len(p) == 0]
        if empty:
            raise ValueError(f"{data.stats.source}: row {empty[0]}: field {cfg.prompt_field!r}: ILQL needs a prompt "
                             "of at least one token (its last token's state chooses the first action)")
        self.rewards = rewards

    def batch(self, epoch: int, index: int) -> ILQLBatch:
        items = [int(i) for i in self.host_items(epoch, index)]
        d = self.data
        return ilql_batch([d.prompt_ids[i] for i in items], [d.completion_ids[i][0] for i in items],
                          [self.rewards[i] for i in items], batch_size=self.batch_size,
                          prompt_len=self.cfg.max_prompt_len, completion_len=self.cfg.max_completion_len,
                          pad_id=self.pad_id)


def ilql_iterator(data: EncodedDataset, cfg: DataConfig, *, reward_field: str = "reward",
                  rewards_field: str = "rewards", normalize: bool = True, **kwargs) -> ILQLIterator:
    """`ILQLIterator` over `data` (encoded with task "sft") with its rewards read from the rows."""
    rewards = token_rewards(data, reward_field=reward_field, rewards_field=rewards_field, normalize=normalize)
    return ILQLIterator(data, cfg, rewards, **kwargs)

