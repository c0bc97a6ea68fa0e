"""The decoder: one Flax linen module for GPT-2, Llama 1/2/3, Mistral, Qwen2/2.5 and Qwen3.

Read top to bottom: norms → attention (GQA, RoPE, KV cache) → MLP → block → `Transformer` (embeddings,
mask, blocks, head) → helpers `init_params`, `logical_specs`. The KV cache lives in `cache.py`.

Shapes: B batch, S new tokens, T key slots (= S without cache, = Smax with cache), D hidden, H query heads,
K kv heads, G = H / K query heads per kv head, hd head width, F MLP width, V vocab, L layers.
Params name only logical axes ("vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "norm",
"layers"); activations only "batch", "length", "act_*". `rlhf_jax.sharding` maps them to a mesh.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from rlhf_jax.models import lora as lora_lib
from rlhf_jax.models.cache import KVCache, split_cache
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.project import project, project_out_in
from rlhf_jax.models.rope import apply_rope, inverse_frequencies, rope_tables

HEADS = ("lm", "scalar")


def _param(module: nn.Module, name: str, init, shape: tuple, axes: tuple):
    """A parameter in `param_dtype`, boxed with its logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, module.config.param_dtype)


def _weight(module: nn.Module, name: str, shape: tuple, axes: tuple, n_in: int):
    """A projection weight of logical shape ``shape`` = ``[in…, out…]`` (the first ``n_in`` axes contract with
    the input), stored ``[out…, in…]`` when ``config.weight_layout == "out_in"``."""
    if module.config.weight_layout == "out_in":
        shape, axes = (*shape[n_in:], *shape[:n_in]), (*axes[n_in:], *axes[:n_in])
    return _param(module, name, _weight_init(module.config), shape, axes)


def _weight_init(config: ModelConfig):
    return nn.initializers.normal(stddev=config.initializer_range)


class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps), statistics in float32 (HF `LlamaRMSNorm`; Zhang & Sennrich 2019)."""

    config: ModelConfig
    dim: int

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", nn.initializers.ones, (self.dim,), ("norm",))
        x32 = x.astype(jnp.float32)
        y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.config.norm_eps)
        return scale.astype(self.config.dtype) * y.astype(self.config.dtype)


class LayerNorm(nn.Module):
    """y = w · (x − mean) / sqrt(var + eps) + b (GPT-2 `ln_1`, `ln_2`, `ln_f`; Ba et al. 2016)."""

    config: ModelConfig
    dim: int

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", nn.initializers.ones, (self.dim,), ("norm",))
        bias = _param(self, "bias", nn.initializers.zeros, (self.dim,), ("norm",))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * lax.rsqrt(var + self.config.norm_eps)
        return (y * scale + bias).astype(self.config.dtype)


def Norm(config: ModelConfig, name: str) -> nn.Module:
    return (LayerNorm if config.is_gpt2 else RMSNorm)(config, config.hidden_size, name=name)


def lora_a_init(key, shape, dtype=jnp.float32):
    """A of a LoRA branch: uniform(±1/sqrt(fan_in)) over the `in` axes (PEFT's `kaiming_uniform_(a=√5)`)."""
    bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def dense(module: nn.Module, name: str, x, w, n_in: int, axes: tuple):
    """``project(x, w)``, plus the LoRA branch ``(alpha/r) · (drop(x) A) B`` when ``config.lora`` targets ``name``
    (params ``<name>_lora_a`` [in…, r] and ``<name>_lora_b`` [r, out…] with ``w``'s logical axes on each side;
    `rlhf_jax.models.lora`). ``drop`` is LoRA dropout (`lora.dropout_input`), only when the rate is > 0 and the
    forward was given a ``lora.DROPOUT_RNG`` key (training steps); else ``drop(x) = x``. Without LoRA it is
    exactly ``project(x, w, n_in, dtype)``. ``w`` is stored as ``config.weight_layout`` says (`_weight`); ``axes``
    are its logical axes in the ``[in…, out…]`` order either way."""
    c = module.config
    if c.weight_layout == "out_in":  # w is [out…, in…]
        y = project_out_in(x, w, n_in, c.dtype)
        in_shape, out_shape = w.shape[w.ndim - n_in:], w.shape[: w.ndim - n_in]
    else:
        y = project(x, w, n_in, c.dtype)
        in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    if c.lora is None or name not in c.lora.projections:
        return y
    r = c.lora.rank
    a = _param(module, name + "_lora_a", lora_a_init, (*in_shape, r), (*axes[:n_in], None))
    b = _param(module, name + "_lora_b", nn.initializers.zeros, (r, *out_shape), (None, *axes[n_in:]))
    if c.lora.dropout > 0 and module.has_rng(lora_lib.DROPOUT_RNG):
        x = lora_lib.dropout_input(x, rate=c.lora.dropout, key=module.make_rng(lora_lib.DROPOUT_RNG))
    return y + project(project(x, a.astype(c.dtype), n_in), b.astype(c.dtype)) * jnp.asarray(c.lora.scale, c.dtype)


def activation(name: str, x):
    """silu (Llama family), gelu_new / gelu_pytorch_tanh = tanh-approximate GELU (GPT-2, HF `NewGELUActivation`),
    gelu = exact erf GELU."""
    if name == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=name != "gelu")


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads (Ainslie et al. 2023, GQA), RoPE and an optional KV cache.

    Query head h uses kv head h // G, the order of HF `repeat_kv`; we never repeat K/V in memory, the grouped
    einsum reads each kv head once. Scores are scaled by hd^-1/2 and soft-maxed in float32 (HF
    `eager_attention_forward`). Qwen3 applies a per-head RMSNorm to q and k before RoPE
    (`modeling_qwen3.py`: `self.q_norm(self.q_proj(x).view(hidden_shape))`).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxSxD, cos_sin, allowed_Bx1x1xSxT, cache_kv, layer, index):
        c = self.config
        D, H, K, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        q_axes, kv_axes, o_axes = ("embed", "q_heads", "head_dim"), ("embed", "kv_heads", "head_dim"), \
            ("q_heads", "head_dim", "embed")
        wq = _weight(self, "q", (D, H, hd), q_axes, 1)
        wk = _weight(self, "k", (D, K, hd), kv_axes, 1)
        wv = _weight(self, "v", (D, K, hd), kv_axes, 1)
        wo = _weight(self, "o", (H, hd, D), o_axes, 2)
        dt = c.dtype
        q = dense(self, "q", x_BxSxD, wq, 1, q_axes)
        k = dense(self, "k", x_BxSxD, wk, 1, kv_axes)
        v = dense(self, "v", x_BxSxD, wv, 1, kv_axes)
        if c.qkv_bias:
            zeros = nn.initializers.zeros
            q = q + _param(self, "q_bias", zeros, (H, hd), ("q_heads", "head_dim")).astype(dt)
            k = k + _param(self, "k_bias", zeros, (K, hd), ("kv_heads", "head_dim")).astype(dt)
            v = v + _param(self, "v_bias", zeros, (K, hd), ("kv_heads", "head_dim")).astype(dt)
        if c.qk_norm:
            q = RMSNorm(c, hd, name="q_norm")(q)
            k = RMSNorm(c, hd, name="k_norm")(k)
        if cos_sin is not None:
            q, k = apply_rope(q, *cos_sin), apply_rope(k, *cos_sin)
        k_BxKxSxhd, v_BxKxSxhd = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # the cache's layout
        if cache_kv is not None:  # write the S new tokens at slots [index, index + S), then read the layer
            cache_k, cache_v = cache_kv
            if layer is None:  # this layer's own [B, K, Smax, hd] buffers (`split_cache`)
                start = (0, 0, index, 0)
                cache_k = lax.dynamic_update_slice(cache_k, k_BxKxSxhd.astype(cache_k.dtype), start)
                cache_v = lax.dynamic_update_slice(cache_v, v_BxKxSxhd.astype(cache_v.dtype), start)
                k_BxKxSxhd, v_BxKxSxhd = cache_k.astype(dt), cache_v.astype(dt)  # S = Smax here
            else:  # the stacked [L, B, K, Smax, hd] cache
                start = (layer, 0, 0, index, 0)
                cache_k = lax.dynamic_update_slice(cache_k, k_BxKxSxhd[None].astype(cache_k.dtype), start)
                cache_v = lax.dynamic_update_slice(cache_v, v_BxKxSxhd[None].astype(cache_v.dtype), start)
                k_BxKxSxhd = lax.dynamic_index_in_dim(cache_k, layer, 0, keepdims=False).astype(dt)  # S = Smax
                v_BxKxSxhd = lax.dynamic_index_in_dim(cache_v, layer, 0, keepdims=False).astype(dt)
            cache_kv = (cache_k, cache_v)
        B, S = x_BxSxD.shape[:2]
        q_BxSxKxGxhd = q.reshape(B, S, K, H // K, hd)
        k, v = k_BxKxSxhd, v_BxKxSxhd  # key slots t
        scores = jnp.einsum("bskgh,bkth->bkgst", q_BxSxKxGxhd, k, preferred_element_type=jnp.float32)
        scores = scores * (hd ** -0.5)
        # A finite minimum (not −inf) keeps fully masked (padding) query rows finite: they average all keys.
        scores = jnp.where(allowed_Bx1x1xSxT, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bkgst,bkth->bskgh", probs, v).reshape(B, S, H, hd)
        out = nn.with_logical_constraint(out, ("batch", "length", "act_heads", None))
        y = dense(self, "o", out, wo, 2, o_axes)
        if c.o_bias:
            y = y + _param(self, "o_bias", nn.initializers.zeros, (D,), ("norm",)).astype(dt)
        return y, cache_kv


class MLP(nn.Module):
    """SwiGLU down(act(gate x) · up x) for the Llama family (Shazeer 2020); fc → gelu_new → proj for GPT-2."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxSxD):
        c, dt = self.config, self.config.dtype
        D, F = c.hidden_size, c.intermediate_size

        def linear(name, x, shape, axes, bias_axes):
            y = dense(self, name, x, _weight(self, name, shape, axes, 1), 1, axes)
            if c.mlp_bias:
                y = y + _param(self, name + "_bias", nn.initializers.zeros, shape[-1:], bias_axes).astype(dt)
            return y

        if c.is_gpt2:
            h = activation(c.activation, linear("fc", x_BxSxD, (D, F), ("embed", "mlp"), ("mlp",)))
        else:
            gate = linear("gate", x_BxSxD, (D, F), ("embed", "mlp"), ("mlp",))
            h = activation(c.activation, gate) * linear("up", x_BxSxD, (D, F), ("embed", "mlp"), ("mlp",))
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        return linear("down", h, (F, D), ("mlp", "embed"), ("norm",))


class Block(nn.Module):
    """Pre-norm residual block: x += attn(norm(x)); x += mlp(norm(x)). Signature fits `nn.scan`:
    carry = (x, cache_kv, layer), broadcast context = (cos_sin, allowed, index)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, carry, context):
        x, cache_kv, layer = carry
        cos_sin, allowed, index = context
        a, cache_kv = Attention(self.config, name="attn")(Norm(self.config, "attn_norm")(x), cos_sin, allowed,
                                                          cache_kv, layer, index)
        x = x + a
        x = x + MLP(self.config, name="mlp")(Norm(self.config, "mlp_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return (x, cache_kv, None if layer is None else layer + 1), None


def default_positions(attention_mask_BxS):
    """position = max(cumsum(mask) − 1, 0): a left-padded row sees the same positions as the row alone."""
    return jnp.maximum(jnp.cumsum(attention_mask_BxS.astype(jnp.int32), axis=-1) - 1, 0)


def attention_allowed(config: ModelConfig, attention_mask_BxT, q_slot_S, segment_ids_BxS=None):
    """allowed[b, q, t] = key slot t ≤ query slot q ∧ mask[b, t] ∧ same segment ∧ within the sliding window.

    Mistral's window (HF `sliding_window_causal`): keep keys with q − t < sliding_window.
    Returns bool `[B, 1, 1, S, T]` (broadcast over kv heads and groups).
    """
    k_slot_T = jnp.arange(attention_mask_BxT.shape[-1])
    causal_SxT = k_slot_T[None, :] <= q_slot_S[:, None]
    if config.sliding_window is not None:
        causal_SxT &= (q_slot_S[:, None] - k_slot_T[None, :]) < config.sliding_window
    allowed = causal_SxT[None] & attention_mask_BxT.astype(bool)[:, None, :]
    if segment_ids_BxS is not None:
        allowed &= segment_ids_BxS[:, :, None] == segment_ids_BxS[:, None, :]
    return allowed[:, None, None]


class Transformer(nn.Module):
    """Decoder-only transformer with an LM head (`head="lm"`, logits [B,S,V] in the compute dtype) or a scalar
    head (`head="scalar"`, float32 scores [B,S]; the param `score.kernel` [D,1] is HF's `score.weight` [1,D]).

    Call without cache: `apply(p, ids_BxS, mask_BxS)` → logits. `head_span=(start, stop)` (static ints) runs
    the final norm and head on positions [start, stop) only, e.g. the response positions of a rollout: the
    `[B, S, V]` logits of the prompt are never computed. `head_positions_BxW` (int `[B, W]`) does the same for
    a different window per row (e.g. each row's completion): the result is `[B, W, ...]` at those positions.
    `return_hidden=True` returns `(out, hidden_BxSxD)` in place of `out`: the final-norm hidden states the head
    read (HF `output_hidden_states[-1]`), e.g. for extra heads on the trunk (ILQL's Q and V).
    With `cache`/`cache_index`/`positions_BxS`:
    the S tokens go to slots [cache_index, cache_index + S), `attention_mask` is `[B, Smax]` over the whole
    cache, and the result is `(logits, new_cache)`.
    """

    config: ModelConfig
    head: str = "lm"

    @nn.compact
    def __call__(self, input_ids_BxS, attention_mask_BxS, *, positions_BxS=None, segment_ids_BxS=None,
                 cache: KVCache | None = None, cache_index=None, head_span: tuple[int, int] | None = None,
                 head_positions_BxW=None, return_hidden: bool = False):
        c = self.config
        if self.head not in HEADS:
            raise ValueError(f"head={self.head!r}; expected one of {HEADS}")
        if input_ids_BxS.ndim != 2:
            raise ValueError(f"input_ids must be [B, S], got shape {input_ids_BxS.shape}")
        B, S = input_ids_BxS.shape
        if cache is None:
            if attention_mask_BxS.shape != (B, S):
                raise ValueError(f"attention_mask shape {attention_mask_BxS.shape} != input_ids shape {(B, S)}")
            # positions the model derives lie in [0, S): RoPE can gather them from a table of S rows
            rope_bound = S if positions_BxS is None else None
            positions_BxS = default_positions(attention_mask_BxS) if positions_BxS is None else positions_BxS
            allowed = attention_allowed(c, attention_mask_BxS, jnp.arange(S), segment_ids_BxS)
            cache_kv, index = None, None
        else:
            if positions_BxS is None or cache_index is None:
                raise ValueError("decoding with a cache needs positions_BxS and cache_index")
            if segment_ids_BxS is not None:
                raise ValueError("segment_ids (packing) are not supported with a KV cache")
            if attention_mask_BxS.shape != (B, cache.max_len):
                raise ValueError(f"with a cache, attention_mask must be [B, Smax]={(B, cache.max_len)}, "
                                 f"got {attention_mask_BxS.shape}")
            index, rope_bound = jnp.asarray(cache_index, jnp.int32), None
            allowed = attention_allowed(c, attention_mask_BxS, index + jnp.arange(S))
            split = cache.per_layer
            if split and c.scan_layers:  # the scan carries the stacked form
                cache = KVCache(k=jnp.stack(cache.k), v=jnp.stack(cache.v))
            cache_kv = (cache.k, cache.v)

        init = _weight_init(c)
        embedding = _param(self, "embed", init, (c.vocab_size, c.hidden_size), ("vocab", "embed"))
        x = jnp.take(embedding, input_ids_BxS, axis=0).astype(c.dtype)
        if c.is_gpt2:  # learned absolute positions (GPT-2 `wpe`)
            wpe = _param(self, "pos_embed", init, (c.max_position_embeddings, c.hidden_size), (None, "embed"))
            x = x + jnp.take(wpe, positions_BxS, axis=0).astype(c.dtype)
            cos_sin = None
        else:
            cos_sin = rope_tables(positions_BxS, inverse_frequencies(c), c.dtype, bound=rope_bound)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

        block = Block
        if c.remat != "none":
            block = nn.remat(Block, policy=c.remat_policy, prevent_cse=not c.scan_layers)
        carry = (x, cache_kv, jnp.asarray(0, jnp.int32))
        context = (cos_sin, allowed, index)
        if c.scan_layers:
            scanned = nn.scan(block, variable_axes={"params": 0},
                              split_rngs={"params": True, lora_lib.DROPOUT_RNG: True},
                              in_axes=nn.broadcast, length=c.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            carry, _ = scanned(c, name="layers")(carry, context)
        elif cache is not None and cache.per_layer:
            ks, vs = list(cache_kv[0]), list(cache_kv[1])
            for i in range(c.num_layers):
                (x, (ks[i], vs[i]), _), _ = block(c, name=f"layers_{i}")((x, (ks[i], vs[i]), None), context)
            carry = (x, (tuple(ks), tuple(vs)), None)
        else:
            for i in range(c.num_layers):
                carry, _ = block(c, name=f"layers_{i}")(carry, context)
        x, cache_kv, _ = carry
        if head_span is not None and head_positions_BxW is not None:
            raise ValueError("pass head_span or head_positions_BxW, not both")
        if head_span is not None:  # only these positions reach the head: [B, stop - start, D]
            x = x[:, head_span[0] : head_span[1]]
        if head_positions_BxW is not None:  # per-row positions: [B, W, D]
            x = jnp.take_along_axis(x, head_positions_BxW[..., None].astype(jnp.int32), axis=1)
        x = Norm(c, "final_norm")(x)

        if self.head == "scalar":
            w = _param(self, "score", nn.initializers.zeros, (c.hidden_size, 1), ("embed", None))
            out = jnp.einsum("bsd,do->bso", x, w.astype(c.dtype), preferred_element_type=jnp.float32)[..., 0]
        else:
            if c.tie_word_embeddings:
                if c.lora is not None and "lm_head" in c.lora.projections:
                    raise ValueError("model.lora.targets: lm_head needs an untied output layer "
                                     "(this model ties it to the input embedding)")
                out = project(x, embedding.astype(c.dtype).T)
            else:
                w = _weight(self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"), 1)
                out = dense(self, "lm_head", x, w, 1, ("embed", "vocab"))  # + a LoRA branch when targeted
            out = nn.with_logical_constraint(out, ("batch", "length", "act_vocab"))
        if return_hidden:  # the final-norm hidden states the head read (HF `hidden_states[-1]`)
            out = (out, x)
        if cache is None:
            return out
        cache = KVCache(*cache_kv)
        return out, (split_cache(cache) if split else cache)


def _dummy_inputs(batch: int, seq: int):
    return jnp.zeros((batch, seq), jnp.int32), jnp.ones((batch, seq), jnp.int32)


def init_params(model: Transformer, key: jax.Array, *, batch: int = 1, seq: int = 8):
    """Random params (normal(initializer_range) weights, unit norm scales, zero biases, zero score head) as a
    plain pytree of arrays in `param_dtype`."""
    variables = jax.jit(model.init)(key, *_dummy_inputs(batch, seq))
    return nn.meta.unbox(variables["params"])


def logical_specs(model: Transformer, *, batch: int = 1, seq: int = 8):
    """PartitionSpecs of logical axis names, with the same tree structure as `init_params(model, ...)`."""
    abstract = jax.eval_shape(functools.partial(model.init, jax.random.key(0)), *_dummy_inputs(batch, seq))
    return nn.get_partition_spec(abstract)["params"]
