"""A checkpointable, per-host, epoch-shuffled iterator of typed batches.

Order: epoch e visits the items (examples, or packed rows when packing) in the permutation
`np.random.default_rng(shuffle_seed + e).permutation(n)` (identity when shuffle is off). Global batch i of
the epoch is `order[i*G : (i+1)*G]` with G = batch_size * process_count; host h takes its contiguous slice
`[h*batch_size, (h+1)*batch_size)` of it. Hence hosts get disjoint rows and the same number of batches,
and the stream of batches is a pure function of (epoch, index): `state()` is just those two ints.

Every host tokenises the whole file (deterministically, so all hosts agree on which rows were skipped
and how many batches an epoch has, without communicating) and then materialises only its own slices.

With drop_last=True an epoch has floor(n / G) batches; with False it has ceil(n / G) and the missing
rows of the last one are padding (all masks 0, `index_B = -1`, KTO label 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlhf_jax.data import batching
from rlhf_jax.data.batches import SoftPreferenceBatch
from rlhf_jax.data.config import DataConfig
from rlhf_jax.data.encode import EncodedDataset


class BatchIterator:
    """Yields `SFTBatch` / `PreferenceBatch` / `UnpairedBatch` / `PromptBatch` of numpy int32 arrays
    (`SoftPreferenceBatch` with `soft_labels` when the preference data has soft labels).

    Args:
      data: Encoded examples (`encode` output); its `kind` picks the batch type.
      cfg: Buckets, packing, loss masking, shuffle seed, drop_last.
      batch_size: Rows per batch ON THIS HOST (the global batch is batch_size * process_count).
      pad_id: Token id used for padding (masks make its value irrelevant).
      process_index: This host's index (`jax.process_index()`).
      process_count: Number of hosts (`jax.process_count()`).
      shuffle: Overrides `cfg.shuffle` (eval iterators pass False).
      drop_last: Overrides `cfg.drop_last`.
      num_epochs: Stop after this many epochs; None = cycle forever.
      soft_labels: Preference data with a `chosen_prob` column (`data.chosen_prob`) comes as
        `SoftPreferenceBatch` (the reward model's soft-label loss); other readers get plain pairs.
    """

    def __init__(
        self,
        data: EncodedDataset,
        cfg: DataConfig,
        *,
        batch_size: int,
        pad_id: int,
        process_index: int = 0,
        process_count: int = 1,
        shuffle: bool | None = None,
        drop_last: bool | None = None,
        num_epochs: int | None = None,
        soft_labels: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} must be in [0, process_count={process_count})")
        if cfg.pack and data.kind != "sft":
            raise ValueError(f"data.pack applies to SFT data only, not {data.kind}")
        self.data, self.cfg = data, cfg
        self.batch_size, self.pad_id = batch_size, pad_id
        self.process_index, self.process_count = process_index, process_count
        self.shuffle = cfg.shuffle if shuffle is None else shuffle
        self.drop_last = cfg.drop_last if drop_last is None else drop_last
        self.num_epochs = num_epochs
        self.soft_labels = soft_labels and data.chosen_prob is not None
        self.buckets = cfg.prompt_bucket_lengths if data.kind == "prompt" else cfg.bucket_lengths
        self.packed_rows: list[list[int]] | None = None
        if cfg.pack:
            lengths = [len(p) + len(c[0]) for p, c in zip(data.prompt_ids, data.completion_ids)]
            self.packed_rows = batching.pack_first_fit(lengths, cfg.max_seq_len)
        self.num_items = len(self.packed_rows) if self.packed_rows is not None else len(data)
        global_batch = batch_size * process_count
        if self.drop_last:
            self.batches_per_epoch = self.num_items // global_batch
        else:
            self.batches_per_epoch = -(-self.num_items // global_batch)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{data.stats.source}: {self.num_items} {'packed rows' if cfg.pack else 'examples'} make no full "
                f"global batch of {global_batch} (batch_size {batch_size} x {process_count} hosts); lower the batch "
                "size or set data.drop_last=false"
            )
        self._epoch, self._index = 0, 0
        self._order_epoch, self._order = -1, np.arange(0)

    # ---- position ------------------------------------------------------------------------------------
    def state(self) -> dict[str, int]:
        """Position to checkpoint: the epoch and the index of the NEXT batch within it."""
        return {"epoch": self._epoch, "index": self._index}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state()` was taken (also accepts numpy/jax scalars)."""
        for key in ("epoch", "index"):
            if key not in state:
                raise KeyError(f"data iterator state is missing {key!r}: got keys {sorted(state)}")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.batches_per_epoch:
            raise ValueError(f"data iterator state {state} out of range ({self.batches_per_epoch} batches per epoch)")
        self._epoch, self._index = epoch, index

    @property
    def epoch(self) -> int:
        return self._epoch

    # ---- iteration -----------------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self):
        if self._index >= self.batches_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        batch = self.batch(self._epoch, self._index)
        self._index += 1
        return batch

    def epoch_batches(self, epoch: int = 0):
        """All of this host's batches of `epoch`, in order, without moving the iterator's position
        (for evaluation passes)."""
        for index in range(self.batches_per_epoch):
            yield self.batch(epoch, index)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The item order of `epoch` (cached for the current epoch)."""
        if self._order_epoch != epoch:
            if self.shuffle:
                self._order = np.random.default_rng(self.cfg.shuffle_seed + epoch).permutation(self.num_items)
            else:
                self._order = np.arange(self.num_items)
            self._order_epoch = epoch
        return self._order

    def host_items(self, epoch: int, index: int) -> np.ndarray:
        """Item ids (examples or packed rows) of this host's part of batch `index` in `epoch`."""
        if not 0 <= index < self.batches_per_epoch:
            raise IndexError(f"batch index {index} out of range [0, {self.batches_per_epoch})")
        start = (index * self.process_count + self.process_index) * self.batch_size
        return self.epoch_order(epoch)[start : start + self.batch_size]

    def batch(self, epoch: int, index: int):
        """This host's batch `index` of `epoch` (a pure function of the two)."""
        items = [int(i) for i in self.host_items(epoch, index)]
        d, cfg, kw = self.data, self.cfg, dict(batch_size=self.batch_size, pad_id=self.pad_id)
        if d.kind == "prompt":
            return batching.prompt_batch([d.prompt_ids[i] for i in items], [int(d.row_index[i]) for i in items], buckets=self.buckets, **kw)
        if self.packed_rows is not None:
            rows = [[self._example(i, 0) for i in self.packed_rows[r]] for r in items]
            return batching.packed_sft_batch(rows, seq_len=cfg.max_seq_len, **kw)
        if d.kind == "sft":
            return batching.sft_batch([self._example(i, 0) for i in items], buckets=self.buckets, **kw)
        if d.kind == "unpaired":
            return batching.unpaired_batch([self._example(i, 0) for i in items], [int(d.labels[i]) for i in items], buckets=self.buckets, **kw)
        pairs = [(self._example(i, 0), self._example(i, 1)) for i in items]
        batch = batching.preference_batch(pairs, buckets=self.buckets, **kw)
        if not self.soft_labels:
            return batch
        prob = np.ones(self.batch_size, np.float32)
        prob[: len(items)] = d.chosen_prob[items]
        return SoftPreferenceBatch(batch, prob)

    def _example(self, i: int, k: int):
        return batching.example_tokens(
            self.data.prompt_ids[i], self.data.completion_ids[i][k], completion_only_loss=self.cfg.completion_only_loss or self.data.kind != "sft",
        )
