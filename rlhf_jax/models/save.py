"""`save_pretrained`: (Transformer, params) → a Hugging Face model directory, no torch.

Writes `config.json` and `model.safetensors` or sharded `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json` (the layout `load_pretrained` reads), streaming one gathered tensor at a time,
with `metadata={"format": "pt"}` so PyTorch `transformers.AutoModelFor{CausalLM,SequenceClassification}.
from_pretrained` loads it. The folder is written next to its place and renamed into it.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import tempfile
from typing import Iterator

import jax
import numpy as np
from jax import lax

from rlhf_jax.models.hf_io import TensorMap, is_scanned, tensor_maps, write_safetensors
from rlhf_jax.models.pretrained import INDEX_FILE, SINGLE_FILE
from rlhf_jax.models.transformer import Transformer


def _parse_size(size) -> int | None:
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)I?B?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes (int) or a string like '500MB'")
    return int(float(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[m.group(2)])


@jax.jit
def _take_layer(x, i):
    return lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


def _host_copy(x, layer: int | None) -> np.ndarray:
    """Full host (numpy) copy of `x` (or of `x[layer]`): one tensor at a time, so memory stays bounded.

    A param spread over several processes is all-gathered (`multihost_utils.process_allgather`, a
    collective: every process must make the same calls in the same order); a local one is fetched.
    """
    if hasattr(x, "layer_array"):  # computed one layer at a time (e.g. `lora.MergedWeight`, the merged export)
        return _host_copy(x.layer_array(layer), None)
    if not isinstance(x, jax.Array):
        x = np.asarray(x)
        return x if layer is None else x[layer]
    if layer is not None:  # one jitted program per (shape, sharding), the layer index traced
        x = _take_layer(x, np.int32(layer))
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _hf_tensors(model: Transformer, params, maps: list[TensorMap]) -> Iterator[np.ndarray]:
    """Each HF tensor of `maps` in order, as a host array in HF layout, built from our (sharded) params."""
    scanned = is_scanned(params)
    for m in maps:
        leaves = []
        for p in m.paths:
            layer = int(p[0].removeprefix("layers_")) if scanned and p[0].startswith("layers_") else None
            node = params["layers"] if layer is not None else params
            for key in (p[1:] if layer is not None else p):
                node = node[key]
            leaves.append(_host_copy(node, layer))
        yield np.asarray(m.to_hf(tuple(leaves)))


def hf_state_dict(model: Transformer, params) -> dict[str, np.ndarray]:
    """Our params (scanned or not, sharded or not) → HF tensor name → host array (HF layout, param dtype),
    in file order. Holds the whole model in host memory; `save_pretrained` streams instead."""
    maps = tensor_maps(model.config, head=model.head)
    return {m.hf_name: arr for m, arr in zip(maps, _hf_tensors(model, params, maps))}


def _entries(model: Transformer, params, maps: list[TensorMap]) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    """(HF name, HF shape, dtype) of every tensor, from our params' dtypes, without touching data."""
    scanned = is_scanned(params)
    out = []
    for m in maps:
        p = m.paths[0]
        node = params["layers"] if scanned and p[0].startswith("layers_") else params
        for key in (p[1:] if node is not params else p):
            node = node[key]
        out.append((m.hf_name, m.hf_shape, np.dtype(node.dtype)))
    return out


def save_pretrained(path, model: Transformer, params, *, tokenizer=None, max_shard_size=None) -> pathlib.Path:
    """Writes a HF model directory (config.json, safetensors, optional tokenizer) atomically.

    `params` may be sharded over devices and processes. Tensors are gathered one at a time and streamed
    into the safetensors file(s) (`hf_io.write_safetensors`), so host memory peaks at one tensor. On a
    multi-host pod call it on EVERY process (the gathers are collectives); only process 0 writes (into
    a temp dir renamed into place), and all processes return after it has finished.

    For `head="scalar"` the config is a `*ForSequenceClassification` with `num_labels=1`; its
    `pad_token_id` comes from the model config or the tokenizer so HF pools the last non-pad token.

    Args:
      max_shard_size: bytes (int) or "500MB"-style; above it, weights are split into
        `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`.
    """
    path = pathlib.Path(path)
    maps = tensor_maps(model.config, head=model.head)
    entries = _entries(model, params, maps)
    hf_config = model.config.to_hf(head=model.head)
    if hf_config.get("pad_token_id") is None and tokenizer is not None:
        hf_config["pad_token_id"] = tokenizer.pad_token_id
    limit = _parse_size(max_shard_size)
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = math.prod(entry[1]) * entry[2].itemsize
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes

    tensors = _hf_tensors(model, params, maps)
    if jax.process_index() == 0:
        _write_dir(path, shards, tensors, hf_config, tokenizer)
    else:
        for _ in tensors:  # take part in every gather; process 0 writes
            pass
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"save_pretrained {path}")
    return path


def _world_readable(root: pathlib.Path) -> None:
    """Folders 0755 and files 0644 under (and including) `root`: an export is shared, e.g. with a serving job."""
    os.chmod(root, 0o755)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)


def _write_dir(path: pathlib.Path, shards: list[list], tensors: Iterator[np.ndarray], hf_config: dict,
               tokenizer) -> None:
    """Writes config, weights (shard by shard, consuming `tensors` in order) and tokenizer to a temp dir
    next to `path`, then renames it into place (an existing `path` is replaced)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    meta = {"format": "pt"}
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if len(shards) == 1:
            write_safetensors(tmp / SINGLE_FILE, shards[0], tensors, metadata=meta)
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                total += write_safetensors(tmp / fname, shard, tensors, metadata=meta)
                weight_map.update({name: fname for name, _, _ in shard})
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _world_readable(tmp)  # mkdtemp makes the folder 0700
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
