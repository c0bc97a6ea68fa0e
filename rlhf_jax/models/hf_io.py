"""Name and layout mapping between our params and Hugging Face safetensors, per family.

Each `TensorMap` ties one HF tensor to one or more of our leaves (paths in the unscanned layout, blocks
named `layers_{i}`) with the two reshapes between them; `read_block` reads any rectangular slice of one
of our leaves from the HF tensor, touching only the HF elements that slice needs (sharded loading). Layout facts (transformers 5.x):

* GPT-2 (`models/gpt2/modeling_gpt2.py`) uses `Conv1D`, whose weight is stored (in, out), and fuses q/k/v
  into one `c_attn` of shape (D, 3D) with bias (3D,). Tied LM head: no `lm_head.weight` is saved.
* Llama / Mistral / Qwen2 / Qwen3 (`modeling_llama.py`, ...) use `nn.Linear`, weight stored (out, in):
  `q_proj.weight` is (H·hd, D). Qwen2 adds q/k/v biases (`modeling_qwen2.py`), Qwen3 adds
  `self_attn.q_norm.weight` / `k_norm.weight` of shape (hd,) (`modeling_qwen3.py`).
* `*ForSequenceClassification`: `score.weight` is (num_labels=1, D), no bias.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where one of our (unscanned) leaves sits inside its HF tensor `w`:

        ours = transpose(w[..., block], perm).reshape(shape)

    `block` = [start, stop) along the last HF axis (GPT-2's fused q/k/v), else the whole tensor. The
    reshape only *splits* axes (`(H·hd,) → (H, hd)`), so every axis of `shape` belongs to exactly one
    axis of the transposed tensor; `read_block` uses that to read a slice of ours without the rest.
    """

    shape: tuple[int, ...]
    perm: tuple[int, ...]
    block: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor `hf_name` of shape `hf_shape` ↔ our leaves `paths`, laid out by `layouts`."""

    hf_name: str
    hf_shape: tuple[int, ...]
    paths: tuple[Path, ...]
    layouts: tuple[Layout, ...]  # one per path: HF → ours, read slice by slice (`read_block`)
    to_hf: Callable  # tuple of our host (numpy) arrays -> HF numpy array


def _same(name, shape, path):
    return TensorMap(name, shape, (path,), (Layout(shape, tuple(range(len(shape)))),), lambda ws: ws[0])


def _transposed(name, shape, path):
    return TensorMap(name, shape, (path,), (Layout(shape[::-1], (1, 0)),), lambda ws: ws[0].T)


def _reshaped(name, shape, path, our_shape):
    return TensorMap(name, shape, (path,), (Layout(our_shape, tuple(range(len(shape)))),),
                     lambda ws: ws[0].reshape(shape))


def _linear_in(name, shape, path, our_shape):
    """nn.Linear (out, in) → ours (in, *out_split)."""
    return TensorMap(name, shape, (path,), (Layout(our_shape, (1, 0)),),
                     lambda ws: ws[0].reshape(shape[1], shape[0]).T)


def _linear_out(name, shape, path, our_shape):
    """nn.Linear (out, in) → ours (*in_split, out), for o_proj."""
    return TensorMap(name, shape, (path,), (Layout(our_shape, (1, 0)),),
                     lambda ws: ws[0].reshape(shape[1], shape[0]).T)


def _fused_qkv(name, shape, paths, our_shape):
    """GPT-2 `c_attn` (D, 3D) or bias (3D,) → q, k, v: third j of the last axis, reshaped to `our_shape`."""
    third = shape[-1] // 3
    ident = tuple(range(len(shape)))
    layouts = tuple(Layout(our_shape, ident, (j * third, (j + 1) * third)) for j in range(3))

    def to_hf(ws):
        return np.concatenate([np.asarray(w).reshape(*shape[:-1], third) for w in ws], axis=-1)

    return TensorMap(name, shape, tuple(paths), layouts, to_hf)


def tensor_maps(config: ModelConfig, *, head: str, prefix: str | None = None) -> list[TensorMap]:
    """Every HF tensor a `head` model of this config reads or writes, in file order.

    Args:
      prefix: base-model prefix ("transformer." for GPT-2, "model." otherwise by default; "" for bare
        `GPT2Model`/`LlamaModel` checkpoints).
    """
    c = config
    D, H, K, hd, F, V = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size, c.vocab_size
    maps: list[TensorMap] = []
    if c.is_gpt2:
        p = "transformer." if prefix is None else prefix
        maps += [_same(p + "wte.weight", (V, D), ("embed",)),
                 _same(p + "wpe.weight", (c.max_position_embeddings, D), ("pos_embed",))]
        for i in range(c.num_layers):
            b, L = f"{p}h.{i}.", f"layers_{i}"
            maps += [
                _same(b + "ln_1.weight", (D,), (L, "attn_norm", "scale")),
                _same(b + "ln_1.bias", (D,), (L, "attn_norm", "bias")),
                _fused_qkv(b + "attn.c_attn.weight", (D, 3 * D), [(L, "attn", n) for n in "qkv"], (D, H, hd)),
                _fused_qkv(b + "attn.c_attn.bias", (3 * D,), [(L, "attn", n + "_bias") for n in "qkv"], (H, hd)),
                _reshaped(b + "attn.c_proj.weight", (D, D), (L, "attn", "o"), (H, hd, D)),
                _same(b + "attn.c_proj.bias", (D,), (L, "attn", "o_bias")),
                _same(b + "ln_2.weight", (D,), (L, "mlp_norm", "scale")),
                _same(b + "ln_2.bias", (D,), (L, "mlp_norm", "bias")),
                _same(b + "mlp.c_fc.weight", (D, F), (L, "mlp", "fc")),
                _same(b + "mlp.c_fc.bias", (F,), (L, "mlp", "fc_bias")),
                _same(b + "mlp.c_proj.weight", (F, D), (L, "mlp", "down")),
                _same(b + "mlp.c_proj.bias", (D,), (L, "mlp", "down_bias")),
            ]
        maps += [_same(p + "ln_f.weight", (D,), ("final_norm", "scale")),
                 _same(p + "ln_f.bias", (D,), ("final_norm", "bias"))]
    else:
        p = "model." if prefix is None else prefix
        maps.append(_same(p + "embed_tokens.weight", (V, D), ("embed",)))
        for i in range(c.num_layers):
            b, L = f"{p}layers.{i}.", f"layers_{i}"
            a = b + "self_attn."
            maps += [
                _same(b + "input_layernorm.weight", (D,), (L, "attn_norm", "scale")),
                _linear_in(a + "q_proj.weight", (H * hd, D), (L, "attn", "q"), (D, H, hd)),
                _linear_in(a + "k_proj.weight", (K * hd, D), (L, "attn", "k"), (D, K, hd)),
                _linear_in(a + "v_proj.weight", (K * hd, D), (L, "attn", "v"), (D, K, hd)),
                _linear_out(a + "o_proj.weight", (D, H * hd), (L, "attn", "o"), (H, hd, D)),
            ]
            if c.qkv_bias:
                maps += [_reshaped(a + "q_proj.bias", (H * hd,), (L, "attn", "q_bias"), (H, hd)),
                         _reshaped(a + "k_proj.bias", (K * hd,), (L, "attn", "k_bias"), (K, hd)),
                         _reshaped(a + "v_proj.bias", (K * hd,), (L, "attn", "v_bias"), (K, hd))]
            if c.o_bias:
                maps.append(_same(a + "o_proj.bias", (D,), (L, "attn", "o_bias")))
            if c.qk_norm:
                maps += [_same(a + "q_norm.weight", (hd,), (L, "attn", "q_norm", "scale")),
                         _same(a + "k_norm.weight", (hd,), (L, "attn", "k_norm", "scale"))]
            maps += [
                _same(b + "post_attention_layernorm.weight", (D,), (L, "mlp_norm", "scale")),
                _transposed(b + "mlp.gate_proj.weight", (F, D), (L, "mlp", "gate")),
                _transposed(b + "mlp.up_proj.weight", (F, D), (L, "mlp", "up")),
                _transposed(b + "mlp.down_proj.weight", (D, F), (L, "mlp", "down")),
            ]
            if c.mlp_bias:
                maps += [_same(b + "mlp.gate_proj.bias", (F,), (L, "mlp", "gate_bias")),
                         _same(b + "mlp.up_proj.bias", (F,), (L, "mlp", "up_bias")),
                         _same(b + "mlp.down_proj.bias", (D,), (L, "mlp", "down_bias"))]
        maps.append(_same(p + "norm.weight", (D,), ("final_norm", "scale")))
    if head == "scalar":
        maps.append(_transposed("score.weight", (1, D), ("score",)))
    elif not c.tie_word_embeddings:
        maps.append(_transposed("lm_head.weight", (V, D), ("lm_head",)))
    return maps


# ----- reading a slice of one of our leaves -----
def _groups(layout: Layout, mid_shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Our axes grouped by the transposed-HF axis they split: `[(0,), (1, 2)]` for (D, H·hd) → (D, H, hd)."""
    groups, axis = [], 0
    for size in mid_shape:
        group, prod = [axis], layout.shape[axis]
        axis += 1
        while prod < size:
            group.append(axis)
            prod *= layout.shape[axis]
            axis += 1
        if prod != size:
            raise ValueError(f"layout {layout} does not split HF axes {tuple(mid_shape)}")
        groups.append(tuple(group))
    if axis != len(layout.shape):
        raise ValueError(f"layout {layout} has axes left over after HF axes {tuple(mid_shape)}")
    return groups


def normalize_index(index: Sequence, shape: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """A tuple of unit-step slices (as `jax.make_array_from_callback` passes) → ((start, stop), ...) per axis."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    out = []
    for sl, n in zip(index, shape):
        if not isinstance(sl, slice):
            raise ValueError(f"index {index}: expected slices, got {sl!r}")
        start, stop, step = sl.indices(n)
        if step != 1:
            raise ValueError(f"index {index}: only unit-step slices are supported")
        out.append((start, max(start, stop)))
    return tuple(out)


def read_block(read: Callable[[tuple[slice, ...]], np.ndarray], hf_shape: Sequence[int], layout: Layout,
               index: Sequence) -> np.ndarray:
    """`ours[index]` for `ours = transpose(w[..., block], perm).reshape(layout.shape)`, reading only part of `w`.

    For each group of our axes that splits one transposed-HF axis, the first axis's range [s, e) becomes
    the contiguous HF range [s·n, e·n) (n = product of the group's inner sizes); the inner axes are read
    whole and cut afterwards. With our sharding rules the inner axes (`head_dim`) are never split, so the
    bytes read are exactly the bytes of the slice.

    Args:
      read: `slices -> np.ndarray`, e.g. a safetensors `get_slice(name).__getitem__`.
      hf_shape: shape of the HF tensor `w`.
      layout: where our leaf sits in `w`.
      index: slices into our leaf (`layout.shape`); missing trailing axes mean whole axes.
    """
    ranges = normalize_index(index, layout.shape)
    block_hf = list(hf_shape)
    if layout.block is not None:
        block_hf[-1] = layout.block[1] - layout.block[0]
    mid_shape = [block_hf[a] for a in layout.perm]
    groups = _groups(layout, mid_shape)
    hf_slices: list = [None] * len(hf_shape)
    covering, cut = [], []
    for j, group in enumerate(groups):
        first, inner = group[0], group[1:]
        n = math.prod(layout.shape[a] for a in inner)
        s, e = ranges[first]
        lo, hi = s * n, e * n
        axis = layout.perm[j]
        if layout.block is not None and axis == len(hf_shape) - 1:
            lo, hi = lo + layout.block[0], hi + layout.block[0]
        hf_slices[axis] = slice(lo, hi)
        covering += [e - s] + [layout.shape[a] for a in inner]
        cut += [slice(None)] + [slice(*ranges[a]) for a in inner]
    w = np.asarray(read(tuple(hf_slices)))
    return np.transpose(w, layout.perm).reshape(covering)[tuple(cut)]


# ----- scanned <-> unscanned layouts -----
def is_scanned(params) -> bool:
    return "layers" in params


def stack_layers(params, num_layers: int):
    """Unscanned (`layers_0`, ..., `layers_{L-1}`) → scanned (`layers` with a leading L axis)."""
    blocks = [params[f"layers_{i}"] for i in range(num_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return out


def unstack_layers(params, num_layers: int):
    """Scanned (`layers` with a leading L axis) → unscanned (`layers_{i}`)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
    return out


# ----- streaming safetensors writer -----
_SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                       "int32": "I32", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(path, entries: Sequence[tuple[str, tuple[int, ...], np.dtype]], tensors, *,
                      metadata: dict[str, str]) -> int:
    """Writes one safetensors file, one tensor at a time (peak memory: one tensor, not the file).

    Format (github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header length N, N bytes
    of JSON `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` (padded with
    spaces to a multiple of 8), then the tensors' raw little-endian bytes back to back in header order.
    The header is built from `entries` before any data exists; `tensors` (an iterable, e.g. a generator
    that gathers each tensor from the devices) must then yield exactly those arrays, in that order.

    Returns:
      bytes of tensor data written.
    """
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for name, shape, dtype in entries:
        dtype = np.dtype(dtype)
        if dtype.name not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype.name], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    it = iter(tensors)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape, dtype in entries:
            arr = next(it, None)
            if arr is None or tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
                got = None if arr is None else (tuple(arr.shape), arr.dtype)
                raise ValueError(f"{path}: tensor {name!r}: expected {(tuple(shape), np.dtype(dtype))}, got {got}")
            f.write(np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder("<")).reshape(-1).view(np.uint8))
    return offset
