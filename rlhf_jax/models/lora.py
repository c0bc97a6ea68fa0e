"""LoRA: a low-rank branch next to a frozen projection (Hu et al. 2021, "LoRA", eq. 3; PEFT `lora.Linear`).

    y = x W  +  (alpha / rank) · (x A) B        A: [in, r] (PEFT `lora_A.weight` = Aᵀ), B: [r, out] (zeros at start)

The adapters are ordinary params of the same Flax module, named ``<proj>_lora_a`` / ``<proj>_lora_b`` next to
the weight ``<proj>`` they adapt, with that weight's logical axes on their ``in`` / ``out`` side (the rank
axis is replicated), so they shard like the weights on any mesh. A params tree that holds adapters is a
LoRA tree: only the adapters and a scalar head (``score``: RM / critic value head) are trainable
(:func:`split_trainable`); the rest is the frozen base, shared (never in an optimizer, never
checkpointed). Without adapters every function here is the identity on the tree, so the full fine-tune
path is unchanged.

Targets are the names users know (PEFT ``target_modules``): ``q_proj k_proj v_proj o_proj gate_proj
up_proj down_proj`` (Llama family) and GPT-2's ``c_attn`` (= q, k, v), ``c_proj`` (attention output and
MLP down, as in PEFT) and ``c_fc``; ``all`` = every projection of the blocks. ``lm_head`` adds an adapter on the untied
output layer (PEFT ``target_modules=["lm_head"]``; not in ``all``, as PEFT's ``all-linear`` leaves it out): on a
small model the vocabulary matrices hold most of the weights, and a reward on the choice of words is learned
there first (README "Results").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

#: user target name → our projection names (Attention: q k v o; MLP: gate up down fc).
TARGETS = {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",), "gate_proj": ("gate",),
           "up_proj": ("up",), "down_proj": ("down",), "c_attn": ("q", "k", "v"), "c_proj": ("o", "down"),
           "c_fc": ("fc",), "all": ("q", "k", "v", "o", "gate", "up", "down", "fc"),
           "lm_head": ("lm_head",)}
SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"
TRAINABLE_HEADS = ("score",)  # a scalar head is trained with the adapters (PEFT `modules_to_save`)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """``model.lora``: rank r, alpha (scale alpha / r), dropout, target projections, optional PEFT start."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapter_path: Optional[str] = None  # start from a PEFT folder (adapter_config.json, adapter_model.safetensors)
    export_format: str = "merged"  # "merged": W + (alpha/r) A B as a plain HF model; "peft": a PEFT adapter folder
    seed: int = 0  # initialisation of A

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1:
            raise ValueError(f"model.lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if self.export_format not in ("merged", "peft"):
            raise ValueError(f"model.lora.export_format={self.export_format!r}; expected 'merged' or 'peft'")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"model.lora.targets: unknown {bad or 'empty list'}; expected names among "
                             f"{sorted(TARGETS)}")

    def spec(self) -> "LoRASpec":
        return LoRASpec(rank=self.rank, alpha=float(self.alpha),
                        projections=tuple(sorted({p for t in self.targets for p in TARGETS[t]})),
                        dropout=float(self.dropout))


@dataclasses.dataclass(frozen=True)
class LoRASpec:
    """What the module needs (hashable; a `ModelConfig.lora` field): rank, alpha, our projection names, and the
    dropout rate on the adapter path's input (used only by forwards given a :data:`DROPOUT_RNG` key)."""

    rank: int
    alpha: float
    projections: tuple[str, ...]
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# ------------------------------------------------------------------------------------------ dropout
#: the Flax rng stream of LoRA dropout; only training forwards (:func:`training`) provide it, so the sampler,
#: scoring, the adapters-off reference, evaluation and export never drop anything.
DROPOUT_RNG = "lora_dropout"


def dropout_input(x: jax.Array, *, rate: float, key: jax.Array) -> jax.Array:
    """The adapter path's input under dropout (PEFT ``lora_dropout``, ``torch.nn.Dropout`` semantics)::

        drop(x) = x ⊙ m / (1 − p),    m ~ Bernoulli(1 − p) elementwise

    so ``y = x W + (alpha/r) · drop(x) A B``: the frozen path ``x W`` sees ``x`` unchanged (PEFT
    `lora.Linear.forward`: ``result = base_layer(x); result += lora_B(lora_A(dropout(x))) * scaling``)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class _Training:
    """A view of a Flax module whose ``apply`` passes a LoRA dropout key (call i draws from fold_in(key, i))."""

    def __init__(self, model, key: jax.Array):
        self.model, self.key, self.calls = model, key, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def apply(self, variables, *args, **kwargs):
        key = jax.random.fold_in(self.key, self.calls)
        self.calls += 1
        return self.model.apply(variables, *args, rngs={DROPOUT_RNG: key}, **kwargs)


def dropout_rate(model) -> float:
    """``model.lora.dropout`` of a Flax module (0 without LoRA)."""
    spec = getattr(getattr(model, "config", None), "lora", None)
    return 0.0 if spec is None else spec.dropout


def training(model, key: Optional[jax.Array]):
    """``model`` for a TRAINING forward: with LoRA dropout > 0 and a key, a view whose ``apply`` draws the
    dropout masks from ``key`` (the train step's key: run seed, step, micro-batch); otherwise ``model``
    itself (dropout 0, or ``key`` None for evaluation: the exact same program as before)."""
    if key is None or dropout_rate(model) == 0.0:
        return model
    return _Training(model, jax.random.fold_in(key, 0x10A))


# ------------------------------------------------------------------------------------- params trees
def _is_adapter(name: str) -> bool:
    return name.endswith(SUFFIX_A) or name.endswith(SUFFIX_B)


def has_adapters(params: Any) -> bool:
    """True when the params dict holds LoRA adapters (anywhere)."""
    if not isinstance(params, dict):
        return False
    return any(_is_adapter(k) or has_adapters(v) for k, v in params.items())


def _split(tree: dict, top: bool) -> tuple[dict, dict]:
    train, frozen = {}, {}
    for k, v in tree.items():
        if isinstance(v, dict):
            t, f = _split(v, False)
            if t:
                train[k] = t
            if f:
                frozen[k] = f
        elif _is_adapter(k) or (top and k in TRAINABLE_HEADS):
            train[k] = v
        else:
            frozen[k] = v
    return train, frozen


def split_trainable(params: Any) -> tuple[Any, Optional[dict]]:
    """``(trainable, frozen)``: for a LoRA tree the adapters (+ ``score``) and the frozen base, as two pruned
    dicts; otherwise ``(params, None)`` (everything trains)."""
    if not has_adapters(params):
        return params, None
    return _split(params, True)


def trainable(params: Any) -> Any:
    """The trainable part of a params tree (the tree itself without adapters)."""
    return split_trainable(params)[0]


def join(train: Any, frozen: Optional[dict]) -> Any:
    """Inverse of :func:`split_trainable`."""
    if frozen is None:
        return train
    out = dict(frozen)
    for k, v in train.items():
        out[k] = join(v, out[k]) if isinstance(v, dict) and k in out else v
    return out


def value_and_grad(fn, *, has_aux: bool = False):
    """``jax.value_and_grad(fn)`` over the TRAINABLE part of its first argument (a params tree, or a tuple of
    them / None): the frozen base is a constant, so its weight gradients are never formed."""

    def wrapped(params, *args):
        parts = params if isinstance(params, tuple) else (params,)
        if not any(has_adapters(p) for p in parts):  # full fine-tune: exactly jax.value_and_grad
            return jax.value_and_grad(fn, has_aux=has_aux)(params, *args)
        splits = [split_trainable(p) if p is not None else (None, None) for p in parts]
        train = tuple(s[0] for s in splits)

        def f(t, *a):
            full = tuple(join(ti, s[1]) if ti is not None else None for ti, s in zip(t, splits))
            return fn(full if isinstance(params, tuple) else full[0], *a)

        out, g = jax.value_and_grad(f, has_aux=has_aux)(train, *args)
        return out, (g if isinstance(params, tuple) else g[0])

    return wrapped


def adapters_off(params: Any) -> Any:
    """The same tree with every ``B`` zeroed: the base model's function exactly (x W + x A 0 = x W); the
    reference policy for free (PEFT `disable_adapter`). Identity on a tree without adapters."""
    if not isinstance(params, dict):
        return params
    return {k: (jnp.zeros_like(v) if k.endswith(SUFFIX_B) else adapters_off(v)) for k, v in params.items()}


def cast_frozen(params: Any, dtype) -> Any:
    """Floating frozen leaves cast to ``dtype`` (``model.base_dtype``); adapters and heads keep theirs."""
    train, frozen = split_trainable(params)
    if frozen is None or dtype is None:
        return params
    dt = jnp.dtype(dtype)
    return join(train, jax.tree.map(lambda x: x.astype(dt) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen))


def merged(params: Any, spec: LoRASpec) -> Any:
    """Base weights with the adapters folded in, ``W + (alpha/r) A B``, adapters removed (a plain tree for the
    model without LoRA: the merged Hugging Face export). Computed in float32, stored in W's dtype."""
    def fold(w, a, b):
        d = delta(a, b, w.shape, scanned=a.ndim + b.ndim - 2 > w.ndim)
        return (w.astype(jnp.float32) + spec.scale * d).astype(w.dtype)

    return _map_adapted(params, fold, lambda v: v)


def _map_adapted(params: Any, adapted, other) -> Any:
    """The params tree without adapters: ``adapted(W, A, B)`` for every adapted weight, ``other(x)`` for
    every other leaf."""
    if not isinstance(params, dict):
        return params
    out = {}
    for k, v in params.items():
        if _is_adapter(k):
            continue
        if isinstance(v, dict):
            out[k] = _map_adapted(v, adapted, other)
        elif k + SUFFIX_A in params:
            out[k] = adapted(v, params[k + SUFFIX_A], params[k + SUFFIX_B])
        else:
            out[k] = other(v)
    return out


class MergedWeight:
    """One adapted weight of the merged export, ``W + (alpha/r) A B`` in ``out_dtype``, computed a layer at a
    time when `models.save_pretrained` writes it (``layer_array``) instead of all at once: a whole merged
    copy of a 32-layer l2048 base (5.5 GiB) took the end of the run from 16.0 to 20.1 GiB of host memory.
    Same arithmetic as :func:`merged`; ``shape`` and ``dtype`` are the written weight's."""

    def __init__(self, w, a, b, scale: float, out_dtype):
        self.w, self.a, self.b, self.scale = w, a, b, float(scale)
        self.scanned = a.ndim + b.ndim - 2 > w.ndim
        self.shape, self.dtype = tuple(w.shape), jnp.dtype(out_dtype)

    def layer_array(self, layer):
        """The merged weight (``layer`` None) or its layer ``layer`` of a scanned stack, as a jax Array sharded
        like ``W``; one jitted program per (shapes, shardings), the layer index traced."""
        if layer is None:
            return _merge_weight(self.w, self.a, self.b, None, scale=self.scale, scanned=self.scanned,
                                 out_dtype=self.dtype)
        return _merge_weight(self.w, self.a, self.b, np.int32(layer), scale=self.scale, scanned=False,
                             out_dtype=self.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "scanned", "out_dtype"))
def _merge_weight(w, a, b, layer, *, scale: float, scanned: bool, out_dtype):
    if layer is not None:
        w, a, b = (jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False) for x in (w, a, b))
    d = delta(a, b, w.shape, scanned=scanned)
    return (w.astype(jnp.float32) + scale * d).astype(w.dtype).astype(out_dtype)


def merged_lazily(params: Any, spec: LoRASpec, out_dtype) -> Any:
    """:func:`merged`'s tree for `models.save_pretrained`: each adapted weight a :class:`MergedWeight`
    (merged when written), every other floating leaf cast to ``out_dtype``, adapters removed."""
    return _map_adapted(params, lambda w, a, b: MergedWeight(w, a, b, spec.scale, out_dtype),
                        lambda v: v.astype(out_dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v)


def delta(a, b, w_shape, *, scanned: bool = False):
    """``A B`` reshaped to the weight's shape (float32); a leading layers axis when ``scanned``."""
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    if scanned:
        n = a.shape[0]
        r = a.shape[-1]
        return jnp.einsum("lir,lro->lio", a32.reshape(n, -1, r), b32.reshape(n, r, -1)).reshape(w_shape)
    r = a.shape[-1]
    return (a32.reshape(-1, r) @ b32.reshape(r, -1)).reshape(w_shape)


def adapter_part(params: Any) -> dict:
    """Only the adapter leaves (no head) of a params tree, as a pruned dict."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            sub = adapter_part(v)
            if sub:
                out[k] = sub
        elif _is_adapter(k):
            out[k] = v
    return out


def init_adapters(abstract: dict, key: jax.Array, *, scanned: bool) -> dict:
    """Fresh adapters for the adapter leaves of ``abstract`` (shape/dtype structs): A uniform(±1/sqrt(fan_in))
    (PEFT's default), B zeros, so the model starts as the base model exactly. Pure; jit it with shardings."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(adapter_part(abstract))
    out = []
    for i, (path, x) in enumerate(leaves):
        if str(path[-1].key).endswith(SUFFIX_B):
            out.append(jnp.zeros(x.shape, x.dtype))
            continue
        fan_in = 1  # a scanned block leaf has a leading layers axis; a top-level one (lm_head) does not
        for d in x.shape[1 if scanned and str(path[0].key) == "layers" else 0:-1]:
            fan_in *= d
        bound = fan_in ** -0.5
        out.append(jax.random.uniform(jax.random.fold_in(key, i), x.shape, x.dtype, -bound, bound))
    return jax.tree_util.tree_unflatten(tree, out)
