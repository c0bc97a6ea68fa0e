"""Buckets, packing, per-epoch shuffle, checkpointable position, host sharding, last-batch policy."""

from __future__ import annotations

import datasets
import numpy as np
import pytest

from rlhf_jax.data import DataConfig, DataStats, EncodedDataset
from rlhf_jax.data.batching import example_tokens, pack_first_fit, pick_bucket
from rlhf_jax.data.iterator import BatchIterator


def _dataset(n: int, kind: str = "sft", seed: int = 0, max_len: int = 40) -> EncodedDataset:
    """n synthetic examples with distinct token ids: example i's tokens are 1000*(i+1) + position."""
    rng = np.random.default_rng(seed)
    prompts, comps = [], []
    for i in range(n):
        p_len, c_len = int(rng.integers(1, max_len // 2)), int(rng.integers(1, max_len // 2))
        toks = 1000 * (i + 1) + np.arange(p_len + c_len, dtype=np.int32)
        prompts.append(toks[:p_len])
        comps.append((toks[p_len:],) if kind != "preference" else (toks[p_len:], toks[p_len:][:1]))
    labels = (np.arange(n) % 2).astype(np.int32) if kind == "unpaired" else None
    rows = datasets.Dataset.from_dict({"answer": [str(i) for i in range(n)]})
    return EncodedDataset(kind, prompts, comps, labels, np.arange(n), rows, DataStats(source="synthetic"))


def _cfg(**kw):
    return DataConfig(**{**dict(path="unused", max_seq_len=64, max_prompt_len=32, buckets=(16, 32)), **kw})


def _example_of(ids_row):
    """Which synthetic example a row's first real token came from."""
    return int(ids_row[0]) // 1000 - 1


def _firsts(batch):
    return [_example_of(row[m > 0]) for row, m in zip(batch.input_ids_BxS, batch.attention_mask_BxS) if m.any()]


class TestBuckets:
    def test_pick_bucket(self):
        assert [pick_bucket(n, (16, 32, 64)) for n in (1, 16, 17, 64)] == [16, 16, 32, 64]
        with pytest.raises(ValueError, match="does not fit the largest bucket 64"):
            pick_bucket(65, (16, 32, 64))

    @pytest.mark.parametrize("kind", ["sft", "preference", "unpaired", "prompt"])
    def test_shapes_bounded_and_padding_masked(self, kind):
        cfg = _cfg()
        it = BatchIterator(_dataset(50, kind), cfg, batch_size=4, pad_id=0, num_epochs=3)
        allowed = set(cfg.prompt_bucket_lengths if kind == "prompt" else cfg.bucket_lengths)
        shapes = set()
        for batch in it:
            for x in batch:
                assert x.dtype == np.int32 and x.shape[0] == 4
                if x.ndim == 2:
                    shapes.add(x.shape[1])
            if kind == "sft":  # padding has zero masks and zero loss
                m = batch.attention_mask_BxS
                assert ((batch.loss_mask_BxS > 0) <= (m > 0)).all() and (batch.input_ids_BxS[m == 0] == 0).all()
        assert shapes <= allowed and len(shapes) >= 2


class TestPacking:
    def test_first_fit_golden(self):
        assert pack_first_fit([5, 4, 3, 2, 6], 8) == [[0, 2], [1, 3], [4]]
        with pytest.raises(ValueError, match="item 1 has 9 tokens"):
            pack_first_fit([1, 9], 8)

    def test_first_fit_matches_naive_oracle(self):
        rng = np.random.default_rng(0)
        lengths = rng.integers(1, 60, size=300).tolist()
        rows, free = [], []
        for i, n in enumerate(lengths):
            r = next((r for r, f in enumerate(free) if f >= n), None)
            if r is None:
                rows.append([]), free.append(64)
                r = len(rows) - 1
            rows[r].append(i)
            free[r] -= n
        assert pack_first_fit(lengths, 64) == rows

    @pytest.mark.parametrize("completion_only_loss", [True, False])
    def test_packed_targets_equal_unpacked(self, completion_only_loss):
        data = _dataset(30)
        cfg = _cfg(completion_only_loss=completion_only_loss, shuffle=False)
        packed = BatchIterator(data, _cfg(pack=True, completion_only_loss=completion_only_loss, shuffle=False), batch_size=2, pad_id=0, num_epochs=1, drop_last=False)
        seen = []
        for batch in packed:
            assert batch.input_ids_BxS.shape == (2, 64)
            for ids, loss, seg, pos, mask in zip(*(batch[i] for i in (0, 2, 4, 3, 1))):
                np.testing.assert_array_equal(mask, seg > 0)
                for k in range(1, seg.max() + 1):
                    where = np.flatnonzero(seg == k)
                    assert (np.diff(where) == 1).all()  # contiguous
                    i = _example_of(ids[where])
                    want_ids, want_loss = example_tokens(data.prompt_ids[i], data.completion_ids[i][0], completion_only_loss=completion_only_loss)
                    # Same tokens, same targets (ids[1:] weighted by loss[1:]), positions restart at 0.
                    np.testing.assert_array_equal(ids[where], want_ids)
                    np.testing.assert_array_equal(loss[where], want_loss)
                    np.testing.assert_array_equal(pos[where], np.arange(len(where)))
                    assert loss[where[0]] == 0  # nothing predicts an example's first token from the previous one
                    seen.append(i)
        assert sorted(seen) == list(range(30))
        # The unpacked batches carry the same per-example (ids, loss).
        unpacked = BatchIterator(data, cfg, batch_size=30, pad_id=0, num_epochs=1)
        b = next(unpacked)
        for r in range(30):
            n = int(b.attention_mask_BxS[r].sum())
            want_ids, want_loss = example_tokens(data.prompt_ids[r], data.completion_ids[r][0], completion_only_loss=completion_only_loss)
            np.testing.assert_array_equal(b.input_ids_BxS[r, :n], want_ids)
            np.testing.assert_array_equal(b.loss_mask_BxS[r, :n], want_loss)
            np.testing.assert_array_equal(b.segment_ids_BxS[r], b.attention_mask_BxS[r])

    def test_pack_rejects_non_sft(self):
        with pytest.raises(ValueError, match="data.pack applies to SFT data only"):
            BatchIterator(_dataset(4, "preference"), _cfg(pack=True), batch_size=2, pad_id=0)


class TestOrder:
    def test_epoch_e_uses_seed_plus_e_and_covers_all(self):
        it = BatchIterator(_dataset(24), _cfg(shuffle_seed=7), batch_size=4, pad_id=0)
        assert it.batches_per_epoch == 6
        epochs = [[x for _ in range(6) for x in _firsts(next(it))] for _ in range(3)]
        for e, order in enumerate(epochs):
            assert order == np.random.default_rng(7 + e).permutation(24).tolist()
        assert epochs[0] != epochs[1]
        again = BatchIterator(_dataset(24), _cfg(shuffle_seed=7), batch_size=4, pad_id=0)
        assert [x for _ in range(6) for x in _firsts(next(again))] == epochs[0]

    def test_state_restore_continues_exactly(self):
        cfg = _cfg(shuffle_seed=3)
        it = BatchIterator(_dataset(22), cfg, batch_size=4, pad_id=0)  # 5 batches/epoch, 2 rows dropped
        for _ in range(7):
            next(it)
        state = it.state()
        assert state == {"epoch": 1, "index": 2}
        expected = [next(it) for _ in range(6)]  # crosses into epoch 2
        resumed = BatchIterator(_dataset(22), cfg, batch_size=4, pad_id=0)
        resumed.restore({k: np.int32(v) for k, v in state.items()})
        for want in expected:
            got = next(resumed)
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)
        assert resumed.state() == it.state() == {"epoch": 2, "index": 3}
        with pytest.raises(KeyError, match="missing 'index'"):
            resumed.restore({"epoch": 0})
        with pytest.raises(ValueError, match="out of range"):
            resumed.restore({"epoch": 0, "index": 99})

    def test_num_epochs_stops_and_rewinds(self):
        it = BatchIterator(_dataset(8), _cfg(), batch_size=4, pad_id=0, num_epochs=2)
        first = [_firsts(b) for b in it]
        assert len(first) == 4 and list(it) == []
        it.restore({"epoch": 0, "index": 0})
        assert [_firsts(b) for b in it] == first
        assert [_firsts(b) for b in it.epoch_batches(1)] == first[2:] and it.state() == {"epoch": 2, "index": 0}


class TestHosts:
    @pytest.mark.parametrize("drop_last", [True, False])
    def test_disjoint_complete_equal_counts(self, drop_last):
        n, hosts, b = 47, 3, 4
        its = [BatchIterator(_dataset(n, "prompt"), _cfg(drop_last=drop_last), batch_size=b, pad_id=0, process_index=h, process_count=hosts) for h in range(hosts)]
        counts = {it.batches_per_epoch for it in its}
        assert counts == {n // (b * hosts) if drop_last else -(-n // (b * hosts))}
        per_host = []
        for it in its:
            rows = []
            for _ in range(it.batches_per_epoch):
                batch = next(it)
                real = batch.index_B[batch.index_B >= 0]
                assert (batch.prompt_mask_BxP[batch.index_B < 0] == 0).all()  # padding rows are fully masked
                rows += real.tolist()
            per_host.append(set(rows))
            assert len(rows) == len(set(rows))
        union = set().union(*per_host)
        assert sum(map(len, per_host)) == len(union)  # disjoint
        order = np.random.default_rng(0).permutation(n)
        if drop_last:
            assert union == set(order[: 3 * b * hosts].tolist())
        else:
            assert union == set(range(n))

    def test_too_few_rows_is_an_error(self):
        with pytest.raises(ValueError, match="make no full global batch of 16"):
            BatchIterator(_dataset(10), _cfg(), batch_size=8, pad_id=0, process_count=2)
        with pytest.raises(ValueError, match="process_index 2 must be in"):
            BatchIterator(_dataset(10), _cfg(), batch_size=1, pad_id=0, process_index=2, process_count=2)

    def test_last_batch_padding_unpaired(self):
        it = BatchIterator(_dataset(5, "unpaired"), _cfg(drop_last=False, shuffle=False), batch_size=4, pad_id=0, num_epochs=1)
        _, last = list(it)
        np.testing.assert_array_equal(last.label_B, [0, 0, 0, 0])  # example 4 has label 0, then padding
        np.testing.assert_array_equal(last.attention_mask_BxS.sum(1) > 0, [True, False, False, False])
