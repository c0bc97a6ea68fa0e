"""`load_pretrained` / `save_pretrained`: Hugging Face model directories ↔ (Transformer, params), no torch.

Reads `config.json` and `model.safetensors` or sharded `model-0000i-of-0000n.safetensors` with
`model.safetensors.index.json`, through `safetensors.safe_open(framework="flax")` (which, unlike
`safetensors.numpy`, reads bf16). Writes the same layout with `metadata={"format": "pt"}` so PyTorch
`transformers.AutoModelFor{CausalLM,SequenceClassification}.from_pretrained` loads it.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
from safetensors import safe_open
from safetensors.flax import save_file

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.errors import ModelLoadError
from rlhf_jax.models.hf_io import is_scanned, stack_layers, tensor_maps, unstack_layers
from rlhf_jax.models.transformer import Transformer, init_params

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some checkpoints carry that are not parameters (recomputed by the model).
_IGNORED = re.compile(r".*(\.rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


def _open_tensors(path: pathlib.Path) -> dict[str, pathlib.Path]:
    """Maps every tensor name to the safetensors file holding it; validates that each file opens."""
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{path / INDEX_FILE}: not a safetensors index (need a 'weight_map'): {e}") from e
        files = {name: path / fname for name, fname in weight_map.items()}
    elif (path / SINGLE_FILE).is_file():
        files = None
    else:
        found = sorted(p.name for p in path.iterdir())
        raise ModelLoadError(f"{path}: expected {SINGLE_FILE} or {INDEX_FILE}; found {found}")
    name_to_file = {}
    for f in sorted(set(files.values()) if files else {path / SINGLE_FILE}):
        if not f.is_file():
            raise ModelLoadError(f"{f}: safetensors file listed in {INDEX_FILE} is missing")
        try:
            with safe_open(str(f), framework="flax") as fh:
                names = list(fh.keys())
        except Exception as e:  # safetensors raises its own SafetensorError / OSError
            raise ModelLoadError(f"{f}: cannot read safetensors file (truncated or corrupt?): {e}") from e
        for name in names:
            name_to_file[name] = f
    if files:
        for name, f in files.items():
            if name_to_file.get(name) != f:
                raise ModelLoadError(f"{f}: tensor {name!r} listed in {INDEX_FILE} is not in that file")
    return name_to_file


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_pretrained(path, *, dtype=jnp.float32, param_dtype=None, head: str = "lm", remat: str = "none",
                    scan_layers: bool = False) -> tuple[Transformer, dict]:
    """Loads a local HF model directory.

    Args:
      path: directory with `config.json` and safetensors weights.
      dtype: compute dtype. param_dtype: storage dtype of params (None: same as `dtype`).
      head: "lm", or "scalar" (reward model / critic). A `*ForSequenceClassification` checkpoint provides
        `score.weight`; on a CausalLM checkpoint the score head starts at ZERO (every score is 0 until
        trained) and `lm_head` is dropped.
      remat, scan_layers: see `ModelConfig`.

    Returns:
      (model, params) with params as plain arrays in `param_dtype`.

    Raises:
      ModelLoadError: missing dir/file, truncated file, unsupported config, missing tensor, wrong shape,
        unexpected tensor — naming the file and tensor, expected vs found.
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: model directory does not exist")
    config = ModelConfig.from_hf(path, dtype=dtype, param_dtype=dtype if param_dtype is None else param_dtype,
                                 remat=remat, scan_layers=scan_layers)
    name_to_file = _open_tensors(path)
    prefix = None
    base = "wte.weight" if config.is_gpt2 else "embed_tokens.weight"
    if base in name_to_file:  # bare GPT2Model / LlamaModel checkpoint
        prefix = ""
    has_score = "score.weight" in name_to_file
    maps = tensor_maps(config, head=head, prefix=prefix)
    if head == "scalar" and not has_score:
        maps = [m for m in maps if m.hf_name != "score.weight"]

    params: dict = {}
    handles: dict = {}
    try:
        for m in maps:
            f = name_to_file.get(m.hf_name)
            if f is None:
                raise ModelLoadError(f"{path}: tensor {m.hf_name!r} (shape {m.hf_shape}) is missing from the "
                                     f"checkpoint ({config.model_type}, head={head})")
            if f not in handles:
                handles[f] = safe_open(str(f), framework="flax").__enter__()
            found = tuple(handles[f].get_slice(m.hf_name).get_shape())
            if found != m.hf_shape:
                raise ModelLoadError(f"{f}: tensor {m.hf_name!r} has shape {found}, expected {m.hf_shape} "
                                     f"from config.json")
            try:
                tensor = handles[f].get_tensor(m.hf_name)
            except Exception as e:
                raise ModelLoadError(f"{f}: cannot read tensor {m.hf_name!r}: {e}") from e
            for p, arr in zip(m.paths, m.to_ours(tensor)):
                _set(params, p, jnp.asarray(arr, config.param_dtype))
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)

    used = {m.hf_name for m in maps}
    droppable = {"lm_head.weight"} if (head == "scalar" or config.tie_word_embeddings) else set()
    droppable |= {"score.weight"} if head == "lm" else set()
    extra = sorted(n for n in name_to_file if n not in used and n not in droppable and not _IGNORED.match(n))
    if extra:
        raise ModelLoadError(f"{path}: unexpected tensors for {config.model_type} (head={head}): {extra[:5]}"
                             f"{' ...' if len(extra) > 5 else ''}")
    if head == "scalar" and not has_score:
        params["score"] = jnp.zeros((config.hidden_size, 1), config.param_dtype)
    if scan_layers:
        params = stack_layers(params, config.num_layers)

    model = Transformer(config, head=head)
    expected = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
    got_struct, want_struct = jax.tree.structure(params), jax.tree.structure(expected)
    if got_struct != want_struct:
        raise ModelLoadError(f"{path}: loaded param tree {got_struct} != model's {want_struct}")
    for (kp, got), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(expected)):
        if got.shape != want.shape:
            raise ModelLoadError(f"{path}: param {jax.tree_util.keystr(kp)} has shape {got.shape}, "
                                 f"expected {want.shape}")
    return model, params


def _parse_size(size) -> int | None:
    if size is None or isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)I?B?\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r}: expected bytes (int) or a string like '500MB'")
    return int(float(m.group(1)) * {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}[m.group(2)])


def hf_state_dict(model: Transformer, params) -> dict[str, jax.Array]:
    """Our params → HF tensor name → array (HF layout, param dtype), in file order."""
    config = model.config
    if is_scanned(params):
        params = unstack_layers(params, config.num_layers)
    out = {}
    for m in tensor_maps(config, head=model.head):
        leaves = []
        for p in m.paths:
            node = params
            for key in p:
                node = node[key]
            leaves.append(jnp.asarray(node))
        out[m.hf_name] = jnp.asarray(m.to_hf(tuple(leaves)))
    return out


def save_pretrained(path, model: Transformer, params, *, tokenizer=None, max_shard_size=None) -> pathlib.Path:
    """Writes a HF model directory (config.json, safetensors, optional tokenizer) atomically.

    For `head="scalar"` the config is a `*ForSequenceClassification` with `num_labels=1`; its
    `pad_token_id` comes from the model config or the tokenizer so HF pools the last non-pad token.

    Args:
      max_shard_size: bytes (int) or "500MB"-style; above it, weights are split into
        `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`.
    """
    path = pathlib.Path(path)
    state = hf_state_dict(model, params)
    hf_config = model.config.to_hf(head=model.head)
    if hf_config.get("pad_token_id") is None and tokenizer is not None:
        hf_config["pad_token_id"] = tokenizer.pad_token_id
    limit = _parse_size(max_shard_size)
    shards: list[dict] = [{}]
    size = 0
    for name, arr in state.items():
        nbytes = arr.size * arr.dtype.itemsize
        if limit is not None and shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += nbytes

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                for name, arr in shard.items():
                    weight_map[name] = fname
                    total += arr.size * arr.dtype.itemsize
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                     indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
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
    return path
