"""Frozen reference log-probs for the preference recipes (``dpo``, ``online_dpo``).

The batches (``algos.preference_rows.PairBatch``/``KTOBatch``) carry the reference log-probs next to the
tokens, so one jitted train step serves both reference sources: a frozen reference model run by
:func:`make_ref_attacher` (its params are a `jit` argument, never in the optimizer), or per-row values
precomputed once over the dataset (:func:`precompute_ref_logps`, cached on disk under a dataset + model
fingerprint) so the reference model need not stay in memory while training. :class:`RefStream` wraps a
``BatchIterator``, adds KTO's mismatched "KL" rows and the precomputed values of each row, and keeps the
iterator's ``state()``/``restore()`` (exact resume).

KTO's KL rows follow TRL ``KTOTrainer``: row i is scored with prompt i and the completion of another row.
``kl_pairs="dataset"`` (default) fixes that row per dataset row, (i + 1) mod N, so reference values can be
precomputed; ``kl_pairs="batch"`` is TRL's rule (``add_kl_completion_ids``: completions rotated by one
within the batch, (x_1, y_B), (x_2, y_1), ..., (x_B, y_{B-1})) over the GLOBAL batch, so the KL completions
are the batch's own completions (live reference only). A KL completion is cut on the right to fit
``data.max_seq_len``.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models import lora
from rlhf_jax.runtime import distributed
from rlhf_jax import sharding as shd
from rlhf_jax.algos.preference_rows import KTOBatch, PairBatch, completion_logps, stacked_rows
from rlhf_jax.data import BatchIterator, UnpairedBatch
from rlhf_jax.data.batching import pick_bucket
from rlhf_jax.data.encode import EncodedDataset

REF_CACHE_VERSION = 1


def reference_logps(model, ref_params, batch: PairBatch | KTOBatch, *, num_chunks: int = 1,
                    completion_width: Optional[int] = None, ld_alpha: Optional[float] = None,
                    prompt_width: Optional[int | str] = None) -> jax.Array:
    """``[B, 2]`` reference log-prob sums (chosen, rejected) or (row, KL row); no gradient.

    ``num_chunks`` > 1 scores the batch in that many strided chunks with `lax.map` (as the train step's
    micro-batches), bounding the logits held at once. ``completion_width``, ``prompt_width`` (each pair's prompt,
    or each KTO row's with its KL row, encoded once): see `completion_logps`.
    ``ld_alpha``: LD-DPO's sums (pairs only), as TRL ``_compute_ref_logps``; the strided chunks keep each
    chosen row with its rejected row (chunk m holds chosen rows m, m+M, ... then the same rejected rows).
    """
    ids, mask, loss = stacked_rows(batch)
    b = ids.shape[0] // 2

    def score(chunk):
        # LoRA: the policy's own params with the adapters off are the reference (identity otherwise)
        return completion_logps(model, lora.adapters_off(ref_params), *chunk, completion_width=completion_width,
                                ld_alpha=ld_alpha, prompt_width=prompt_width)[0]

    if num_chunks == 1:
        out_2B = score((ids, mask, loss))
    else:
        from rlhf_jax.train.step import split_micro_batches

        chunks = split_micro_batches((ids, mask, loss), num_chunks)
        out_2B = jnp.swapaxes(jax.lax.map(score, chunks), 0, 1).reshape(-1)
    out_2B = jax.lax.stop_gradient(out_2B.astype(jnp.float32))
    return jnp.stack([out_2B[:b], out_2B[b:]], axis=1)


def with_ref(batch: PairBatch | KTOBatch, ref_Bx2: jax.Array) -> PairBatch | KTOBatch:
    """`batch` with its reference fields replaced by the two columns of `ref_Bx2`."""
    if isinstance(batch, PairBatch):
        return batch._replace(ref_chosen_logps_B=ref_Bx2[:, 0], ref_rejected_logps_B=ref_Bx2[:, 1])
    return batch._replace(ref_logps_B=ref_Bx2[:, 0], ref_kl_logps_B=ref_Bx2[:, 1])


def make_ref_attacher(model, *, mesh, params_shardings, num_chunks: int = 1, completion_width: Optional[int] = None,
                      ld_alpha: Optional[float] = None, compiler_options: Optional[dict] = None,
                      prompt_width: Optional[int | str] = None):
    """Jitted ``(ref_params, batch) -> batch`` filling the reference fields from a frozen model.

    The reference params are an argument (not a closed-over constant), so the policy's compiled step is
    reused and the reference never enters an optimizer. ``compiler_options``: `runtime.xla.compiler_options`.
    """
    def attach(ref_params, batch):
        return with_ref(batch, reference_logps(model, ref_params, batch, num_chunks=num_chunks,
                                               completion_width=completion_width, ld_alpha=ld_alpha,
                                               prompt_width=prompt_width))

    bsh = shd.batch_sharding(mesh)
    return shd.jit_sharded(attach, mesh, in_shardings=(params_shardings, bsh), out_shardings=bsh,
                           compiler_options=compiler_options)


# ------------------------------------------------------------------------------------ KTO's KL rows
def kl_completion(data: EncodedDataset, i: int, partner: int, max_seq_len: int) -> np.ndarray:
    """Completion of row ``partner`` cut to fit ``max_seq_len`` after prompt ``i``."""
    room = max(max_seq_len - len(data.prompt_ids[i]), 0)
    return np.asarray(data.completion_ids[partner][0][:room], np.int32)


def kl_completions(data: EncodedDataset, max_seq_len: int) -> list[np.ndarray]:
    """Completion of row (i + 1) mod N for each row i, cut to fit ``max_seq_len`` after prompt i."""
    n = len(data)
    return [kl_completion(data, i, (i + 1) % n, max_seq_len) for i in range(n)]


def batch_kl_partners(global_items: np.ndarray) -> np.ndarray:
    """TRL's in-batch KL pairing: global row g takes the completion of row g − 1 (row 0 that of the last)."""
    return np.roll(np.asarray(global_items), 1)


def _kl_rows(data: EncodedDataset, kl: list[np.ndarray], items: list[int], *, batch_size: int, width: int,
             pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.full((batch_size, width), pad_id, np.int32)
    mask = np.zeros((batch_size, width), np.int32)
    loss = np.zeros((batch_size, width), np.int32)
    for b, i in enumerate(items):
        p, c = data.prompt_ids[i], kl[i]
        row = np.concatenate([p, c]).astype(np.int32)
        ids[b, : len(row)], mask[b, : len(row)] = row, 1
        loss[b, len(p): len(row)] = 1
        loss[b, 0] = 0
    return ids, mask, loss


def _pad_width(x: np.ndarray, width: int, fill: int) -> np.ndarray:
    if x.shape[1] == width:
        return x
    out = np.full((x.shape[0], width), fill, x.dtype)
    out[:, : x.shape[1]] = x
    return out


# ------------------------------------------------------------------------------------------- stream
class RefStream:
    """A `BatchIterator` whose batches become `PairBatch`/`KTOBatch` (KL rows, precomputed reference values).

    Args:
      inner: the data iterator (its position is this stream's position).
      ref_Nx2: per dataset row, precomputed reference sums (chosen, rejected) / (row, KL row); None = zeros
        (filled later by a reference model, or unused by reference-free losses).
    """

    def __init__(self, inner: BatchIterator, ref_Nx2: Optional[np.ndarray] = None, *, kl_pairs: str = "dataset"):
        self.inner = inner
        self.ref_Nx2 = ref_Nx2
        self.kl_pairs = kl_pairs
        if kl_pairs not in ("dataset", "batch"):
            raise ValueError(f"RefStream: kl_pairs must be 'dataset' or 'batch', got {kl_pairs!r}")
        if kl_pairs == "batch" and ref_Nx2 is not None:
            raise ValueError("RefStream: kl_pairs='batch' pairs rows by batch, so KL reference values cannot be "
                             "precomputed per row (set precompute_ref_logps: false)")
        self.kind = inner.data.kind
        if self.kind not in ("preference", "unpaired"):
            raise ValueError(f"{inner.data.stats.source}: preference trainers need preference or unpaired data, "
                             f"got {self.kind}")
        self.kl = kl_completions(inner.data, inner.cfg.max_seq_len) if self.kind == "unpaired" else None
        if ref_Nx2 is not None and ref_Nx2.shape != (len(inner.data), 2):
            raise ValueError(f"precomputed reference log-probs have shape {ref_Nx2.shape}, expected "
                             f"({len(inner.data)}, 2) for {inner.data.stats.source}")

    @property
    def batches_per_epoch(self) -> int:
        return self.inner.batches_per_epoch

    def state(self) -> dict[str, int]:
        return self.inner.state()

    def restore(self, state: dict[str, Any]) -> None:
        self.inner.restore(state)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        pos = self.inner.state()
        items = [int(i) for i in self.inner.host_items(pos["epoch"], pos["index"] - 1)]
        kl = None
        if self.kind == "unpaired" and self.kl_pairs == "batch":
            kl = self._batch_kl(pos["epoch"], pos["index"] - 1, items)
        return self.extend(batch, items, kl=kl)

    def _batch_kl(self, epoch: int, index: int, items: list[int]) -> dict[int, np.ndarray]:
        """KL completions of this host's rows under TRL's rotation over the global batch."""
        it = self.inner
        g = it.batch_size * it.process_count
        order = it.epoch_order(epoch)[index * g: (index + 1) * g]
        partners = dict(zip((int(i) for i in order), (int(p) for p in batch_kl_partners(order))))
        return {i: kl_completion(it.data, i, partners[i], it.cfg.max_seq_len) for i in items}

    def extend(self, batch, items: list[int], *, kl: Optional[dict[int, np.ndarray]] = None):
        """Turn the inner batch of dataset rows `items` into a `PairBatch`/`KTOBatch` (``kl``: each row's KL
        completion, default the per-dataset-row pairing)."""
        bs = self.inner.batch_size
        ref = np.zeros((bs, 2), np.float32)
        if self.ref_Nx2 is not None:
            ref[: len(items)] = self.ref_Nx2[items]
        if self.kind == "preference":
            return PairBatch(batch, ref[:, 0], ref[:, 1])
        d = self.inner.data
        kl = self.kl if kl is None else kl
        kl_len = max((len(d.prompt_ids[i]) + len(kl[i]) for i in items), default=1)
        width = max(batch.input_ids_BxS.shape[1], pick_bucket(kl_len, self.inner.buckets))
        kl_ids, kl_mask, kl_loss = _kl_rows(d, kl, items, batch_size=bs, width=width, pad_id=self.inner.pad_id)
        rows = UnpairedBatch(_pad_width(batch.input_ids_BxS, width, self.inner.pad_id),
                             _pad_width(batch.attention_mask_BxS, width, 0), _pad_width(batch.loss_mask_BxS, width, 0),
                             batch.label_B)
        return KTOBatch(rows, kl_ids, kl_mask, kl_loss, ref[:, 0], ref[:, 1])


# ----------------------------------------------------------------------------------- precomputation
def dataset_fingerprint(data: EncodedDataset, max_seq_len: int) -> str:
    """sha256 of every row's tokens (and KTO labels / KL length cap): what the reference scores."""
    h = hashlib.sha256(f"{data.kind}|{len(data)}|{max_seq_len}|".encode())
    for p, cs in zip(data.prompt_ids, data.completion_ids):
        h.update(np.asarray(p, np.int32).tobytes() + b"|")
        for c in cs:
            h.update(np.asarray(c, np.int32).tobytes() + b"|")
    if data.labels is not None:
        h.update(np.asarray(data.labels, np.int32).tobytes())
    return h.hexdigest()


def model_fingerprint(path: str | pathlib.Path, *, dtype: str) -> str:
    """sha256 of a HF folder's config.json and weight files (full contents) and the compute dtype."""
    path = pathlib.Path(path)
    h = hashlib.sha256(f"{dtype}|".encode())
    files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.safetensors.index.json"))
    for f in [path / "config.json", *files]:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def precompute_ref_logps(stream_data: BatchIterator, ref_fn, ref_params, *, mesh, cache_dir: pathlib.Path,
                         key: str) -> np.ndarray:
    """Per dataset row ``[N, 2]`` reference sums, read from ``cache_dir/<key>.npy`` or computed and cached.

    Args:
      stream_data: an in-order, one-epoch, no-drop iterator over the dataset (`BatchIterator`).
      ref_fn: jitted ``(ref_params, batch) -> [B_global, 2]`` (replicated output).
      ref_params: the reference params.
      mesh: device mesh (batches placed with `sharding.shard_batch`).
      cache_dir: cache folder; key: file stem (dataset + model fingerprint).
    """
    path = pathlib.Path(cache_dir) / f"{key}.npy"
    n = len(stream_data.data)
    if path.exists():
        out = np.load(path)
        if out.shape == (n, 2):
            return out
    stream = RefStream(stream_data)
    stream.restore({"epoch": 0, "index": 0})
    out = np.zeros((n, 2), np.float32)
    global_bs = stream_data.batch_size * stream_data.process_count
    for index in range(stream_data.batches_per_epoch):
        batch = next(stream)
        ref = np.asarray(jax.device_get(ref_fn(ref_params, shd.shard_batch(batch, mesh))))
        lo = index * global_bs
        take = min(global_bs, n - lo)
        out[lo: lo + take] = ref[:take]
    if distributed.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.rename(path)
        (path.with_suffix(".json")).write_text(json.dumps({"rows": n, "version": REF_CACHE_VERSION}) + "\n")
    return out


def ref_cache_key(data: EncodedDataset, max_seq_len: int, model_path: str, dtype: str, *,
                  ld_alpha: Optional[float] = None) -> str:
    """Cache file stem for the reference values of `data` under the model at `model_path` (and LD-DPO's α)."""
    ld = "" if ld_alpha is None else f"|ld_alpha={ld_alpha!r}"
    h = hashlib.sha256(f"v{REF_CACHE_VERSION}|{dataset_fingerprint(data, max_seq_len)}|"
                       f"{model_fingerprint(model_path, dtype=dtype)}{ld}".encode())
    return h.hexdigest()[:32]
