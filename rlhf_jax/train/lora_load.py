"""LoRA at the run's edges: adapters attached to a loaded base (born sharded), PEFT folders in and out, the
merged export.

PEFT layout (`peft` 0.x `LoraModel`, `get_peft_model_state_dict`): for a targeted module ``M`` of the HF model,
``base_model.model.<M>.lora_A.weight`` is ``[r, in]`` (= our ``A``ᵀ) and ``lora_B.weight`` is ``[out, r]`` (= our
``B``ᵀ), scale ``lora_alpha / r``. GPT-2's fused ``c_attn`` holds q, k, v: a PEFT ``c_attn`` adapter of rank r
(shared A) loads as A_q = A_k = A_v = A; ours exports as rank 3r with A = [A_q A_k A_v] and B block-diagonal
(``rank_pattern`` / ``alpha_pattern`` keep the scale alpha / r), which is the same function exactly.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Optional

import jax
import numpy as np

from rlhf_jax import sharding as shd
from rlhf_jax.models import lora
from rlhf_jax.models.hf_io import is_scanned
from rlhf_jax.runtime import distributed

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_LLAMA = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_GPT2 = {"o": "attn.c_proj", "fc": "mlp.c_fc", "down": "mlp.c_proj"}  # q, k, v: attn.c_attn (fused)
_BLOCK = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp", "fc": "mlp"}


def attach_adapters(model, params, cfg: lora.LoRAConfig, *, mesh, rules, param_dtype) -> tuple[Any, dict]:
    """The LoRA model and ``params`` with fresh (or `cfg.adapter_path`'s) adapters added, placed like the
    weights they adapt; a scalar head (trainable) is cast to ``param_dtype``."""
    from rlhf_jax.models import Transformer, init_params

    config = model.config.replace(lora=cfg.spec(), param_dtype=param_dtype)
    lmodel = Transformer(config, head=model.head)
    shardings = shd.param_shardings(lmodel, mesh, rules=rules)
    abstract = jax.eval_shape(lambda: init_params(lmodel, jax.random.key(0)))
    scanned = config.scan_layers
    adapters = jax.jit(lambda k: lora.init_adapters(abstract, k, scanned=scanned),
                       out_shardings=lora.adapter_part(shardings))(jax.random.key(cfg.seed))
    if cfg.adapter_path:
        adapters = load_peft_adapters(cfg.adapter_path, lmodel, adapters)
    params = lora.join(adapters, params)
    if "score" in params:
        params = dict(params, score=params["score"].astype(param_dtype))
    return lmodel, params


# ------------------------------------------------------------------------------------------- PEFT names
def _module_names(config, layer: int, proj: str) -> str:
    if config.is_gpt2:
        return f"transformer.h.{layer}." + (_GPT2[proj] if proj in _GPT2 else "attn.c_attn")
    return f"model.layers.{layer}." + _LLAMA[proj]


def _leaf(params: dict, layer: int, proj: str, suffix: str, scanned: bool):
    if scanned:
        return params["layers"][_BLOCK[proj]][proj + suffix], layer
    return params[f"layers_{layer}"][_BLOCK[proj]][proj + suffix], None


def _host(x, layer: Optional[int]) -> np.ndarray:
    from rlhf_jax.models.save import _host_copy

    return np.asarray(_host_copy(x, layer), np.float32)


def peft_tensors(model, params) -> tuple[dict[str, np.ndarray], dict]:
    """Our adapters as PEFT tensors (host float32, every process takes part in the gathers) and the
    adapter_config fields they need (r, lora_alpha, target_modules, rank/alpha patterns)."""
    config, spec = model.config, model.config.lora
    scanned = is_scanned(params)
    r = spec.rank
    out, targets = {}, []
    for i in range(config.num_layers):
        fused = []
        for proj in spec.projections:
            if proj in ("gate", "up") and config.is_gpt2 or proj == "fc" and not config.is_gpt2 or proj == "lm_head":
                continue
            a = _host(*_leaf(params, i, proj, lora.SUFFIX_A, scanned))
            b = _host(*_leaf(params, i, proj, lora.SUFFIX_B, scanned))
            a2, b2 = a.reshape(-1, r), b.reshape(r, -1)
            if config.is_gpt2 and proj in "qkv":
                fused.append((proj, a2, b2))
                continue
            name = _module_names(config, i, proj)
            targets.append(name)
            out[f"base_model.model.{name}.lora_A.weight"] = a2.T.copy()
            out[f"base_model.model.{name}.lora_B.weight"] = b2.T.copy()
        if fused:  # GPT-2 c_attn: rank 3r, A = [A_q A_k A_v], B block-diagonal over (q, k, v) outputs
            D = config.hidden_size
            A = np.zeros((D, 3 * r), np.float32)
            B = np.zeros((3 * r, 3 * D), np.float32)
            for proj, a2, b2 in fused:
                j = "qkv".index(proj)
                A[:, j * r:(j + 1) * r] = a2
                B[j * r:(j + 1) * r, j * D:(j + 1) * D] = b2
            name = _module_names(config, i, "q")
            targets.append(name)
            out[f"base_model.model.{name}.lora_A.weight"] = A.T.copy()
            out[f"base_model.model.{name}.lora_B.weight"] = B.T.copy()
    if "lm_head" + lora.SUFFIX_A in params:  # the untied output layer (target lm_head): top level, not per layer
        targets.append("lm_head")
        out["base_model.model.lm_head.lora_A.weight"] = _host(params["lm_head" + lora.SUFFIX_A], None).T.copy()
        out["base_model.model.lm_head.lora_B.weight"] = _host(params["lm_head" + lora.SUFFIX_B], None).T.copy()
    fields = {"r": r, "lora_alpha": spec.alpha, "target_modules": targets, "rank_pattern": {}, "alpha_pattern": {},
              "fan_in_fan_out": config.is_gpt2}  # GPT-2's Conv1D stores W as [in, out]
    if config.is_gpt2 and any(p in spec.projections for p in "qkv"):
        fields["rank_pattern"] = {"c_attn": 3 * r}
        fields["alpha_pattern"] = {"c_attn": 3 * spec.alpha}
    return out, fields


def save_peft(directory: pathlib.Path | str, model, params, *, base_path: str, tokenizer=None) -> pathlib.Path:
    """Write a PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`, the tokenizer) that
    `peft.PeftModel.from_pretrained(base, folder)` loads; every process calls it, process 0 writes."""
    from safetensors.numpy import save_file

    if model.head != "lm":
        raise ValueError("model.lora.export_format=peft exports causal-LM adapters; a scalar-head model (reward "
                         "model / critic) is exported merged (model.lora.export_format=merged)")
    tensors, fields = peft_tensors(model, params)
    directory = pathlib.Path(directory)
    if distributed.is_main_process():
        directory.mkdir(parents=True, exist_ok=True)
        cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_path),
               "lora_dropout": model.config.lora.dropout, "bias": "none", "inference_mode": True,
               "init_lora_weights": True, "modules_to_save": None, **fields}
        (directory / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"save_peft {directory}")
    return directory


def load_peft_adapters(folder: str | pathlib.Path, model, adapters: dict) -> dict:
    """`adapters` (our tree, placed) with the values of a PEFT adapter folder, placed the same way.

    Raises ValueError naming the file and key when the folder's rank/alpha differ from `model.lora` or it
    adapts a module `model.lora.targets` does not cover."""
    from safetensors.numpy import load_file

    folder = pathlib.Path(folder)
    cfg_path, w_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise ValueError(f"model.lora.adapter_path={folder}: needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    pcfg = json.loads(cfg_path.read_text())
    spec, config = model.config.lora, model.config
    if (int(pcfg.get("r", -1)) != spec.rank or float(pcfg.get("lora_alpha", -1)) != spec.alpha
            or pcfg.get("rank_pattern")):
        raise ValueError(f"{cfg_path}: r={pcfg.get('r')}, lora_alpha={pcfg.get('lora_alpha')}, rank_pattern="
                         f"{pcfg.get('rank_pattern')} differ from model.lora (rank={spec.rank}, alpha={spec.alpha})")
    tensors = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
               for k, v in load_file(str(w_path)).items()}
    scanned = config.scan_layers
    values: dict[tuple, list] = {}
    used = set()
    for i in range(config.num_layers):
        for proj in spec.projections:
            if proj in ("gate", "up") and config.is_gpt2 or proj == "fc" and not config.is_gpt2 or proj == "lm_head":
                continue
            name = f"base_model.model.{_module_names(config, i, proj)}"
            ka, kb = name + ".lora_A.weight", name + ".lora_B.weight"
            if ka not in tensors:
                continue
            used |= {ka, kb}
            A, B = tensors[ka].astype(np.float32).T, tensors[kb].astype(np.float32).T  # [in, r], [r, out]
            if config.is_gpt2 and proj in "qkv":
                D = config.hidden_size
                j = "qkv".index(proj)
                B = B[:, j * D:(j + 1) * D]
            for suffix, arr in ((lora.SUFFIX_A, A), (lora.SUFFIX_B, B)):
                values.setdefault((_BLOCK[proj], proj + suffix), [None] * config.num_layers)[i] = arr
    top = {}  # the untied output layer (target lm_head)
    ka, kb = "base_model.model.lm_head.lora_A.weight", "base_model.model.lm_head.lora_B.weight"
    if "lm_head" in spec.projections and ka in tensors:
        used |= {ka, kb}
        top = {"lm_head" + lora.SUFFIX_A: tensors[ka].astype(np.float32).T,
               "lm_head" + lora.SUFFIX_B: tensors[kb].astype(np.float32).T}
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{w_path}: tensor {extra[0]!r} adapts a module model.lora.targets does not cover "
                         f"({len(extra)} such tensors; a base weight such as lm_head.weight is what PEFT's "
                         f"save_embedding_layers=True adds: save with save_embedding_layers=False)")

    def place(path, x):
        keys = [p.key for p in path]
        if len(keys) == 1:
            arr = top.get(keys[0])
            return x if arr is None else jax.make_array_from_callback(
                x.shape, x.sharding, lambda idx: arr.reshape(x.shape).astype(x.dtype)[idx])
        block, leaf = keys[-2], keys[-1]
        layers = values.get((block, leaf))
        if layers is None:
            return x
        if scanned:
            arr = np.stack([l.reshape(x.shape[1:]) if l is not None else np.asarray(_host(x, i))
                            for i, l in enumerate(layers)])
        else:
            i = int(keys[0].removeprefix("layers_"))
            if layers[i] is None:
                return x
            arr = layers[i]
        arr = arr.reshape(x.shape).astype(x.dtype)
        return jax.make_array_from_callback(x.shape, x.sharding, lambda idx: arr[idx])

    return jax.tree_util.tree_map_with_path(place, adapters)


# ---------------------------------------------------------------------------------------------- export
def export_lora(loaded, params, directory: pathlib.Path | str) -> str:
    """The LoRA model's export: merged HF model (default) or PEFT adapter folder (`export_format=peft`);
    returns what it wrote, in words."""
    from rlhf_jax import models

    directory = pathlib.Path(directory)
    cfg = loaded.load_config.lora if loaded.load_config is not None else lora.LoRAConfig()
    if cfg.export_format == "peft":
        save_peft(directory, loaded.model, params, base_path=loaded.load_config.path, tokenizer=loaded.tokenizer)
        return "PEFT adapter folder"
    base_model = type(loaded.model)(loaded.model.config.replace(lora=None), head=loaded.model.head)
    spec = loaded.model.config.lora
    out_dtype = loaded.model.config.param_dtype
    merged = lora.merged_lazily(params, spec, out_dtype)  # each adapted weight merged as it is written
    models.save_pretrained(directory, base_model, merged, tokenizer=loaded.tokenizer)
    return "Hugging Face model (LoRA merged)"
