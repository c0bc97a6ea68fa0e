"""`ModelConfig`: one frozen description of a decoder-only transformer, read from a Hugging Face `config.json`.

Families and the HF modeling files whose behaviour we reproduce (transformers 5.x,
`src/transformers/models/<family>/modeling_<family>.py`):

| model_type | norm | positions | MLP | attention quirks |
|---|---|---|---|---|
| gpt2    | LayerNorm (bias) | learned `wpe` | fc → gelu_new → proj | fused Conv1D `c_attn` (in, out) with bias |
| llama   | RMSNorm | RoPE (+ llama3 / linear scaling) | SwiGLU | optional `attention_bias`, `mlp_bias` |
| mistral | RMSNorm | RoPE | SwiGLU | `sliding_window` (implemented as a mask) |
| qwen2   | RMSNorm | RoPE | SwiGLU | q/k/v bias, no o bias |
| qwen3   | RMSNorm | RoPE | SwiGLU | per-head RMSNorm on q and k (`q_norm`, `k_norm`) |

Runtime options (`dtype`, `param_dtype`, `remat`, `scan_layers`, `weight_layout`) are fields too, so one
hashable object configures the linen module.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from rlhf_jax.models.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3")
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
ACTIVATIONS = ("silu", "gelu_new", "gelu_pytorch_tanh", "gelu")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable", "nothing_saveable",
                  "everything_saveable")
ROPE_TYPES = ("default", "linear", "llama3")
WEIGHT_LAYOUTS = ("in_out", "out_in")

_ARCH = {"gpt2": "GPT2", "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture (from HF `config.json`) plus runtime options.

    Attributes:
      model_type: HF family name, one of `SUPPORTED_MODEL_TYPES`.
      vocab_size: V, rows of the token embedding.
      hidden_size: D, width of the residual stream.
      num_layers: L, number of decoder blocks.
      num_heads: H, query heads.
      num_kv_heads: K, key/value heads (GQA when K < H; H % K == 0).
      head_dim: hd, width of one head (Qwen3 may have H * hd != D).
      intermediate_size: F, MLP hidden width.
      max_position_embeddings: longest position the model was trained for (size of GPT-2's `wpe`).
      norm_eps: epsilon of every LayerNorm/RMSNorm.
      activation: MLP nonlinearity (`ACTIVATIONS`).
      rope_theta: RoPE base (unused by GPT-2).
      rope_scaling: RoPE scaling as sorted (key, value) pairs, e.g. (("factor", 8.0), ("rope_type", "llama3"), ...),
        or None.
      qkv_bias: q/k/v projections have a bias (GPT-2, Qwen2, Llama with `attention_bias`).
      o_bias: output projection has a bias (GPT-2, Llama/Qwen3 with `attention_bias`).
      mlp_bias: MLP projections have biases (GPT-2, Llama with `mlp_bias`).
      qk_norm: per-head RMSNorm on q and k before RoPE (Qwen3).
      sliding_window: keys further than this many slots back are masked (Mistral), or None.
      tie_word_embeddings: LM head reuses the token embedding.
      initializer_range: std of the normal init of weights.
      bos_token_id / eos_token_id / pad_token_id: copied to and from config.json (eos may be a tuple).
      dtype: compute dtype (activations, logits), e.g. bfloat16.
      param_dtype: storage dtype of parameters.
      remat: "none", "full" (save nothing) or a `jax.checkpoint_policies` name such as "dots_saveable".
      scan_layers: run blocks with `nn.scan` (params then carry a leading "layers" axis of size L).
      lora: a `rlhf_jax.models.lora.LoRASpec` (low-rank adapters next to the targeted projections), or None.
      weight_layout: how projection weights are stored: "in_out" (``[in…, out…]``, the layout of every
        checkpoint, optimizer state and export) or "out_in" (``[out…, in…]``, PyTorch's ``nn.Linear`` layout;
        `rlhf_jax.models.weight_layout`: a decode-only copy that XLA:CPU's small-batch products stream faster).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float
    activation: str
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple | None = None
    pad_token_id: int | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"
    scan_layers: bool = False
    lora: Any = None
    weight_layout: str = "in_out"

    def __post_init__(self):
        # Normalise dtypes to hashable numpy dtypes (accepts "bfloat16", jnp.bfloat16, np.dtype).
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not supported; expected one of {ACTIVATIONS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not supported; expected one of {REMAT_POLICIES}")
        if self.weight_layout not in WEIGHT_LAYOUTS:
            raise ValueError(f"weight_layout={self.weight_layout!r}; expected one of {WEIGHT_LAYOUTS}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {self.rope_type!r} is not supported; expected one of {ROPE_TYPES}")

    # ----- derived values -----
    @property
    def is_gpt2(self) -> bool:
        return self.model_type == "gpt2"

    @property
    def rope_type(self) -> str:
        return str(self.rope_scaling_dict.get("rope_type", self.rope_scaling_dict.get("type", "default")))

    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling or ())

    @property
    def remat_policy(self):
        """The `jax.checkpoint` policy for `remat` (None saves nothing = full recomputation)."""
        if self.remat in ("none", "full"):
            return None
        return getattr(jax.checkpoint_policies, self.remat)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ----- Hugging Face conversion -----
    @classmethod
    def from_hf(cls, config: dict | str | pathlib.Path, **runtime) -> "ModelConfig":
        """Reads a HF config dict, a `config.json` path or a model directory.

        Args:
          config: the dict, or a path to `config.json` or to the directory holding it.
          **runtime: `dtype`, `param_dtype`, `remat`, `scan_layers`.

        Raises:
          ModelLoadError: missing file, unsupported model_type or feature (naming the key).
        """
        source = "<dict>"
        if not isinstance(config, dict):
            path = pathlib.Path(config)
            path = path / "config.json" if path.is_dir() else path
            source = str(path)
            if not path.is_file():
                raise ModelLoadError(f"{path}: config.json not found")
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ModelLoadError(f"{path}: not valid JSON ({e})") from e
        return cls(**_fields_from_hf(config, source), **runtime)

    def to_hf(self, *, head: str = "lm") -> dict:
        """The HF `config.json` dict (transformers 4.x and 5.x read it) for a CausalLM or, with
        `head="scalar"`, a `*ForSequenceClassification` with `num_labels=1`."""
        suffix = {"lm": "LMHeadModel" if self.is_gpt2 else "ForCausalLM", "scalar": "ForSequenceClassification"}[head]
        out: dict[str, Any] = {"model_type": self.model_type, "architectures": [_ARCH[self.model_type] + suffix],
                               "vocab_size": self.vocab_size, "initializer_range": self.initializer_range,
                               "tie_word_embeddings": self.tie_word_embeddings,
                               "bos_token_id": self.bos_token_id, "pad_token_id": self.pad_token_id,
                               "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                               else self.eos_token_id,
                               "torch_dtype": str(self.param_dtype.name)}
        if self.is_gpt2:
            out.update(n_embd=self.hidden_size, n_layer=self.num_layers, n_head=self.num_heads,
                       n_positions=self.max_position_embeddings, n_inner=self.intermediate_size,
                       layer_norm_epsilon=self.norm_eps, activation_function=self.activation,
                       attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, summary_first_dropout=0.0)
        else:
            out.update(hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
                       num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                       head_dim=self.head_dim, intermediate_size=self.intermediate_size,
                       max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.norm_eps,
                       hidden_act=self.activation, rope_theta=self.rope_theta,
                       rope_scaling=self.rope_scaling_dict or None, attention_dropout=0.0)
            if self.model_type in ("llama", "qwen3"):
                out["attention_bias"] = self.qkv_bias
            if self.model_type == "llama":
                out["mlp_bias"] = self.mlp_bias
            if self.model_type in ("mistral", "qwen2", "qwen3"):
                out["sliding_window"] = self.sliding_window
            if self.model_type in ("qwen2", "qwen3"):
                out["use_sliding_window"] = False
        if head == "scalar":
            out.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        return out


def _fields_from_hf(c: dict, source: str) -> dict:
    """Maps HF config keys to `ModelConfig` fields, rejecting features we do not implement."""
    model_type = c.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"{source}: model_type={model_type!r} is not supported; "
                             f"expected one of {SUPPORTED_MODEL_TYPES}")

    def need(key):
        if c.get(key) is None:
            raise ModelLoadError(f"{source}: config key {key!r} is missing (model_type={model_type})")
        return c[key]

    def reject(key, ok):
        if key in c and c[key] is not None and not ok(c[key]):
            raise ModelLoadError(f"{source}: config {key}={c[key]!r} is not supported")

    eos = c.get("eos_token_id")
    common = dict(model_type=model_type, vocab_size=int(need("vocab_size")),
                  initializer_range=float(c.get("initializer_range", 0.02)),
                  bos_token_id=c.get("bos_token_id"), pad_token_id=c.get("pad_token_id"),
                  eos_token_id=tuple(eos) if isinstance(eos, list) else eos)
    if model_type == "gpt2":
        # modeling_gpt2.py: GPT2Attention with scale_attn_weights=True, no inverse-layer-idx scaling.
        reject("scale_attn_by_inverse_layer_idx", lambda v: v is False)
        reject("reorder_and_upcast_attn", lambda v: v is False)
        reject("scale_attn_weights", lambda v: v is True)
        reject("add_cross_attention", lambda v: v is False)
        d, h = int(need("n_embd")), int(need("n_head"))
        return dict(common, hidden_size=d, num_layers=int(need("n_layer")), num_heads=h, num_kv_heads=h,
                    head_dim=d // h, intermediate_size=int(c.get("n_inner") or 4 * d),
                    max_position_embeddings=int(need("n_positions")),
                    norm_eps=float(c.get("layer_norm_epsilon", 1e-5)),
                    activation=c.get("activation_function", "gelu_new"), qkv_bias=True, o_bias=True,
                    mlp_bias=True, tie_word_embeddings=bool(c.get("tie_word_embeddings", True)))
    reject("partial_rotary_factor", lambda v: v == 1.0)
    reject("use_sliding_window", lambda v: v is False)
    rope = dict(c.get("rope_parameters") or {})
    rope.update(c.get("rope_scaling") or {})
    theta = float(c.get("rope_theta", rope.pop("rope_theta", 10000.0)))
    rope.pop("rope_theta", None)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(f"{source}: rope_scaling type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
    for k in ("attention_factor", "mscale"):
        reject_val = rope.get(k)
        if reject_val not in (None, 1.0):
            raise ModelLoadError(f"{source}: rope_scaling {k}={reject_val!r} is not supported")
    d, h = int(need("hidden_size")), int(need("num_attention_heads"))
    attention_bias = bool(c.get("attention_bias", False))
    sliding = c.get("sliding_window") if model_type == "mistral" else None
    return dict(common, hidden_size=d, num_layers=int(need("num_hidden_layers")), num_heads=h,
                num_kv_heads=int(c.get("num_key_value_heads") or h),
                head_dim=int(c.get("head_dim") or d // h), intermediate_size=int(need("intermediate_size")),
                max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
                norm_eps=float(c.get("rms_norm_eps", 1e-6)), activation=c.get("hidden_act", "silu"),
                rope_theta=theta, rope_scaling=tuple(sorted(rope.items())) if rope_type != "default" else None,
                qkv_bias=attention_bias or model_type == "qwen2", o_bias=attention_bias,
                mlp_bias=bool(c.get("mlp_bias", False)) and model_type == "llama",
                qk_norm=model_type == "qwen3", sliding_window=None if sliding is None else int(sliding),
                tie_word_embeddings=bool(c.get("tie_word_embeddings", False)))
