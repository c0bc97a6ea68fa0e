"""Name and layout mapping between our params and Hugging Face safetensors, per family.

Each `TensorMap` ties one HF tensor to one or more of our leaves (paths in the unscanned layout, blocks
named `layers_{i}`) with the two reshapes between them. Layout facts (transformers 5.x):

* GPT-2 (`models/gpt2/modeling_gpt2.py`) uses `Conv1D`, whose weight is stored (in, out), and fuses q/k/v
  into one `c_attn` of shape (D, 3D) with bias (3D,). Tied LM head: no `lm_head.weight` is saved.
* Llama / Mistral / Qwen2 / Qwen3 (`modeling_llama.py`, ...) use `nn.Linear`, weight stored (out, in):
  `q_proj.weight` is (H·hd, D). Qwen2 adds q/k/v biases (`modeling_qwen2.py`), Qwen3 adds
  `self_attn.q_norm.weight` / `k_norm.weight` of shape (hd,) (`modeling_qwen3.py`).
* `*ForSequenceClassification`: `score.weight` is (num_labels=1, D), no bias.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One HF tensor `hf_name` of shape `hf_shape` ↔ our leaves `paths`."""

    hf_name: str
    hf_shape: tuple[int, ...]
    paths: tuple[Path, ...]
    to_ours: Callable  # hf array -> tuple of our arrays (one per path)
    to_hf: Callable  # tuple of our arrays -> hf array


def _same(name, shape, path):
    return TensorMap(name, shape, (path,), lambda w: (w,), lambda ws: ws[0])


def _transposed(name, shape, path):
    return TensorMap(name, shape, (path,), lambda w: (w.T,), lambda ws: ws[0].T)


def _reshaped(name, shape, path, our_shape):
    return TensorMap(name, shape, (path,), lambda w: (w.reshape(our_shape),), lambda ws: ws[0].reshape(shape))


def _linear_in(name, shape, path, our_shape):
    """nn.Linear (out, in) → ours (in, *out_split)."""
    return TensorMap(name, shape, (path,), lambda w: (w.T.reshape(our_shape),),
                     lambda ws: ws[0].reshape(shape[1], shape[0]).T)


def _linear_out(name, shape, path, our_shape):
    """nn.Linear (out, in) → ours (*in_split, out), for o_proj."""
    return TensorMap(name, shape, (path,), lambda w: (w.T.reshape(our_shape),),
                     lambda ws: ws[0].reshape(shape[1], shape[0]).T)


def _fused_qkv(name, shape, paths, our_shape):
    """GPT-2 `c_attn` (D, 3D) or bias (3D,) → q, k, v each reshaped to `our_shape`."""
    def to_ours(w):
        return tuple(part.reshape(our_shape) for part in jnp.split(w, 3, axis=-1))

    def to_hf(ws):
        return jnp.concatenate([w.reshape(*shape[:-1], shape[-1] // 3) for w in ws], axis=-1)

    return TensorMap(name, shape, tuple(paths), to_ours, to_hf)


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
