"""Host texts → left-padded token batches of ONE width on every host (for the judges and ``critique``).

Texts built on the host (a judge's template, a conversation with a critique request) are tokenised with
the tokenizer's special tokens, left-truncated to ``max_len`` (the text nearest the answer is kept), and
left-padded to a width shared by every host (the largest host's longest row, rounded up to a bucket of
``data.batching.PROMPT_BUCKETS`` so a growing conversation compiles few programs), because every host
must feed the same shapes to one jitted program.
"""

from __future__ import annotations

import numpy as np

from rlhf_jax.data import PromptBatch
from rlhf_jax.data.batching import PROMPT_BUCKETS
from rlhf_jax.runtime import distributed


def encode_texts(tokenizer, texts: list[str], *, max_len: int, special: bool = True) -> tuple[list[list[int]], int]:
    """``(ids per text, number of texts cut)``: token ids, each keeping its last ``max_len`` tokens."""
    enc = tokenizer(list(texts), add_special_tokens=special)["input_ids"] if texts else []
    cut = sum(len(e) > max_len for e in enc)
    return [list(e)[-max_len:] for e in enc], cut


def shared_width(enc: list[list[int]], *, max_len: int, bucketed: bool = True) -> int:
    """The width every host pads to: the longest row over all hosts (a bucket of it, at most ``max_len``)."""
    longest = int(max(distributed.allgather_rows(np.array([max((len(e) for e in enc), default=1)]))))
    if not bucketed:
        return longest
    return min(next((b for b in PROMPT_BUCKETS if b >= longest), longest), max_len)


def left_pad(enc: list[list[int]], *, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids_BxW, mask_BxW)`` int32, each row's tokens at the right end (an empty row gets no token)."""
    ids = np.full((len(enc), width), pad_id, np.int32)
    mask = np.zeros((len(enc), width), np.int32)
    for i, e in enumerate(enc):
        if e:
            ids[i, width - len(e):], mask[i, width - len(e):] = e, 1
    return ids, mask


def text_prompt_batch(tokenizer, texts: list[str], *, max_len: int, pad_id: int,
                      special: bool = True) -> tuple[PromptBatch, int]:
    """``(PromptBatch, number of texts cut)`` of this host's texts at the shared width (``index_B`` = row)."""
    enc, cut = encode_texts(tokenizer, texts, max_len=max_len, special=special)
    ids, mask = left_pad(enc, width=shared_width(enc, max_len=max_len), pad_id=pad_id)
    return PromptBatch(ids, mask, np.arange(len(enc), dtype=np.int32)), cut
