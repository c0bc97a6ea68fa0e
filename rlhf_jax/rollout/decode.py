"""The jitted sampler: prefill once, then KV-cache decode inside ONE `lax.while_loop`.

Layout of the cache (length S = P + T, P the left-padded prompt bucket, T = max_new_tokens):

    slot:   0 ........ P-2 | P-1            | P ............. P+T-1
    holds:  prompt[:P-1]   | last prompt tok| response[0 .. T-2]   (response[T-1] is never fed back)

Prefill runs the first P - 1 prompt tokens and DISCARDS their logits, so XLA removes the
`[B, P, V]` LM-head product entirely (dead-code elimination); decode step t (t = 0 .. T-1) feeds token
x_t (x_0 = last prompt token, x_t = response[t-1]) at slot P - 1 + t, position len_b - 1 + t, and
samples response[t] from its logits. So the loop runs T single-token forwards and no work is wasted.
Left padding: every row's last prompt slot P - 1 is real, so all rows decode in lock-step; padded
slots carry mask 0 and never receive attention.

Groups (GRPO, RLOO, RAFT, online DPO, labelling sample R responses per prompt): with `prompt_repeats` = R
the caller passes the U distinct prompts; the prefill runs on those U rows only and its KV cache is
repeated to the B = U·R decode rows (rows u·R … u·R + R − 1 share prompt u, as `np.repeat`). The prompt
is therefore encoded once per group instead of R times (prefix sharing, as vLLM's prefix cache does for
OpenRLHF/verl); the decode is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models
from rlhf_jax.rollout import sampling
from rlhf_jax.rollout.types import Rollout
from rlhf_jax.runtime import xla

_CACHE_AXES = (None, "batch", "act_kv_heads", "length", None)  # KVCache leaves [L, B, K, Smax, hd] (or per layer)

@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Everything static about one compiled sampler (hashable: part of the compile-cache key)."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    min_new_tokens: int
    cache_dtype: Any
    prompt_repeats: int = 1


class _LoopState(NamedTuple):
    t: jax.Array  # int32 scalar: index of the response token sampled in this step
    token_B: jax.Array  # x_t, the token fed at slot P - 1 + t
    cache: Any
    cache_mask_BxS: jax.Array
    done_B: jax.Array  # bool: row already emitted EOS before step t
    response_ids_BxT: jax.Array
    response_mask_BxT: jax.Array
    logp_BxT: jax.Array
    sampling_logp_BxT: jax.Array


def _generate_impl(params, prompt_ids_BxP, prompt_mask_BxP, key, *, model, settings: SamplingSettings):
    s = settings
    R = s.prompt_repeats
    U, P = prompt_ids_BxP.shape  # U distinct prompts, each decoded R times: B = U·R rows
    B = U * R
    T = s.max_new_tokens
    S = P + T
    prompt_ids_UxP = prompt_ids_BxP.astype(jnp.int32)
    prompt_mask_UxP = prompt_mask_BxP.astype(jnp.int32)
    positions_UxP = models.default_positions(prompt_mask_UxP)
    cache_mask_UxS = jnp.zeros((U, S), jnp.int32).at[:, : P - 1].set(prompt_mask_UxP[:, : P - 1])
    cache = models.init_cache(model.config, U, S, dtype=s.cache_dtype)
    if not model.config.scan_layers:  # one buffer per layer: no per-step copy of each layer out of the stack
        cache = models.split_cache(cache)
    # Logical names only (a no-op without `nn.logical_axis_rules`): cache split like the attention heads.
    constrain = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: nn.with_logical_constraint(x, _CACHE_AXES[-x.ndim:]), tree)
    cache = constrain(cache)
    if P > 1:  # prefill: logits unused, so the LM head over [U, P-1] is dead code
        _, cache = model.apply(
            {"params": params},
            prompt_ids_UxP[:, : P - 1],
            cache_mask_UxS,
            positions_BxS=positions_UxP[:, : P - 1],
            cache=cache,
            cache_index=jnp.int32(0),
        )
    # the R decode rows of prompt u are u·R .. u·R + R − 1 (np.repeat order); R = 1 is the identity
    prompt_ids_BxP = jnp.repeat(prompt_ids_UxP, R, axis=0)
    prompt_mask_BxP = jnp.repeat(prompt_mask_UxP, R, axis=0)
    cache_mask_BxS = jnp.repeat(cache_mask_UxS, R, axis=0)
    cache = constrain(jax.tree.map(lambda x: jnp.repeat(x, R, axis=x.ndim - 4), cache))  # [(L,) B, K, S, hd]
    len_B = prompt_mask_BxP.sum(axis=-1)
    eos_ids = jnp.asarray(s.eos_token_ids, jnp.int32)

    def cond(st: _LoopState):
        return (st.t < T) & ~jnp.all(st.done_B)

    def body(st: _LoopState):
        slot = P - 1 + st.t
        fed_real_B = (~st.done_B).astype(jnp.int32)
        mask_BxS = jax.lax.dynamic_update_slice(st.cache_mask_BxS, fed_real_B[:, None], (0, slot))
        logits_Bx1xV, cache = model.apply(
            {"params": params},
            st.token_B[:, None],
            mask_BxS,
            positions_BxS=(len_B - 1 + st.t)[:, None],
            cache=st.cache,
            cache_index=slot,
        )
        out = sampling.sample_step(
            jax.random.fold_in(key, st.t),
            logits_Bx1xV[:, -1],
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            suppress_ids=s.eos_token_ids if s.min_new_tokens > 0 else (),
            suppress=st.t < s.min_new_tokens,
        )
        live_B = ~st.done_B
        token_B = jnp.where(live_B, out.token_B, s.pad_token_id)
        is_eos_B = jnp.any(out.token_B[:, None] == eos_ids[None, :], axis=-1)

        def put(arr_BxT, col_B):
            return jax.lax.dynamic_update_slice(arr_BxT, col_B[:, None].astype(arr_BxT.dtype), (0, st.t))

        return _LoopState(
            t=st.t + 1,
            token_B=token_B,
            cache=cache,
            cache_mask_BxS=mask_BxS,
            done_B=st.done_B | (live_B & is_eos_B),
            response_ids_BxT=put(st.response_ids_BxT, token_B),
            response_mask_BxT=put(st.response_mask_BxT, live_B),
            logp_BxT=put(st.logp_BxT, jnp.where(live_B, out.logp_B, 0.0)),
            sampling_logp_BxT=put(st.sampling_logp_BxT, jnp.where(live_B, out.sampling_logp_B, 0.0)),
        )

    init = _LoopState(
        t=jnp.int32(0),
        token_B=prompt_ids_BxP[:, P - 1],
        cache=cache,
        cache_mask_BxS=cache_mask_BxS,
        done_B=jnp.zeros((B,), bool),
        response_ids_BxT=jnp.full((B, T), s.pad_token_id, jnp.int32),
        response_mask_BxT=jnp.zeros((B, T), jnp.int32),
        logp_BxT=jnp.zeros((B, T), jnp.float32),
        sampling_logp_BxT=jnp.zeros((B, T), jnp.float32),
    )
    final = jax.lax.while_loop(cond, body, init)
    return Rollout(
        prompt_ids_BxP=prompt_ids_BxP,
        prompt_mask_BxP=prompt_mask_BxP,
        response_ids_BxT=final.response_ids_BxT,
        response_mask_BxT=final.response_mask_BxT,
        logp_BxT=final.logp_BxT,
        sampling_logp_BxT=final.sampling_logp_BxT,
        lengths_B=final.response_mask_BxT.sum(axis=-1),
    )


def _rules_key() -> tuple:
    rules = nn.get_logical_axis_rules()
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules)


class _Frozen(NamedTuple):
    """A pytree as a hashable compile-cache key (treedef + leaves; shardings are hashable)."""

    treedef: Any
    leaves: tuple

    @classmethod
    def of(cls, tree) -> "_Frozen | None":
        if tree is None:
            return None
        leaves, treedef = jax.tree.flatten(tree)
        return cls(treedef, tuple(leaves))

    def thaw(self):
        return jax.tree.unflatten(self.treedef, self.leaves)


@functools.lru_cache(maxsize=64)
def _compiled(model, settings: SamplingSettings, frozen_param_shardings, batch_sharding, rules,
              stored_dtypes: frozenset = frozenset()):
    """One `jax.jit` per (model, settings, shardings, axis rules, param dtypes); jit itself caches per input shape.
    ``stored_dtypes`` (the params' dtypes) choose the XLA options (`runtime.xla.compiler_options`: bf16 weights
    with f32 compute are sliced in bf16, layer by layer)."""
    del rules  # only part of the key: a program traced under other logical-axis rules is not reused
    param_shardings = None if frozen_param_shardings is None else frozen_param_shardings.thaw()
    in_shardings = out_shardings = None
    if param_shardings is not None or batch_sharding is not None:
        in_shardings = (param_shardings, batch_sharding, batch_sharding, None)
        out_shardings = batch_sharding  # every Rollout field is [B, ...]
    return jax.jit(
        functools.partial(_generate_impl, model=model, settings=settings),
        in_shardings=in_shardings,
        out_shardings=out_shardings,
        compiler_options=xla.compiler_options(compute_dtype=model.config.dtype, stored_dtypes=stored_dtypes),
    )


def _as_eos_tuple(eos_token_id) -> tuple[int, ...]:
    ids = (eos_token_id,) if isinstance(eos_token_id, (int, np.integer)) else tuple(eos_token_id)
    if not ids or not all(isinstance(i, (int, np.integer)) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id must be an int >= 0 or a non-empty tuple of them, got {eos_token_id!r}")
    return tuple(int(i) for i in ids)


#: Env switch for the prompt-mask check of `jax.Array` inputs (numpy inputs are always checked in full):
#: "auto" (default) checks fully-addressable arrays (single process), "local" also checks a multi-process
#: array's process-local rows, "off" never fetches a jax.Array.
CHECK_PROMPTS_ENV = "RLHF_JAX_CHECK_PROMPTS"
_CHECK_MODES = ("auto", "local", "off")


def _check_mask_rows(mask: np.ndarray, row0: int = 0) -> None:
    """Left-padding checks of host rows `mask` (global row numbers start at `row0`)."""
    empty = np.flatnonzero(mask.sum(-1) == 0)
    if empty.size:
        raise ValueError(f"generate: prompt rows {(empty + row0).tolist()} have no real token (prompt_mask_BxP all 0)")
    bad = np.flatnonzero((mask[:, -1] != 1) | np.any(np.diff(mask, axis=-1) < 0, axis=-1))
    if bad.size:
        raise ValueError(
            f"generate: prompts must be LEFT-padded (mask 0...0 1...1); rows {(bad + row0).tolist()} are not")


def _check_prompts(prompt_ids_BxP, prompt_mask_BxP) -> None:
    """Shapes always; mask values without ever fetching a global array (see `CHECK_PROMPTS_ENV`).

    A global `jax.Array` spanning several processes cannot be fetched, and checking only the local rows
    would let one process raise while the others enter the program's collectives (a hang), so by default
    such arrays are not checked: validate prompts on the host before `shard_batch` (the data pipeline does).
    """
    if prompt_ids_BxP.ndim != 2 or prompt_ids_BxP.shape != prompt_mask_BxP.shape:
        raise ValueError(
            f"generate: prompt_ids_BxP {prompt_ids_BxP.shape} and prompt_mask_BxP {prompt_mask_BxP.shape} "
            "must both be [B, P]"
        )
    if isinstance(prompt_mask_BxP, (jax.core.Tracer, jax.ShapeDtypeStruct)):  # traced, or abstract (`lower_generate`)
        return
    if not isinstance(prompt_mask_BxP, jax.Array):  # host data: checking is free
        _check_mask_rows(np.asarray(prompt_mask_BxP))
        return
    mode = os.environ.get(CHECK_PROMPTS_ENV, "auto").strip().lower() or "auto"
    if mode not in _CHECK_MODES:
        raise ValueError(f"{CHECK_PROMPTS_ENV}={mode!r}; expected one of {_CHECK_MODES}")
    if mode == "off":
        return
    # Single process: one small [B, P] device->host copy (cached on the array), the same check as for numpy.
    if prompt_mask_BxP.is_fully_addressable:
        _check_mask_rows(np.asarray(prompt_mask_BxP))
        return
    if mode == "local":  # multi-process "auto" skips: no fetch, no host sync in the trainers' hot path
        _check_addressable_rows(prompt_mask_BxP)


def _check_addressable_rows(mask_BxP: jax.Array) -> None:
    """Checks the rows of `mask_BxP` held by this process (one device->host copy per distinct local shard)."""
    seen = set()
    for shard in mask_BxP.addressable_shards:
        rows, cols = shard.index
        if (cols.start or 0) != 0 or cols.stop not in (None, mask_BxP.shape[1]):
            continue  # a column-split shard does not hold whole rows
        row0 = rows.start or 0
        if row0 not in seen:
            seen.add(row0)
            _check_mask_rows(np.asarray(shard.data), row0)


def generate(
    model,
    params,
    prompt_ids_BxP,
    prompt_mask_BxP,
    *,
    key: jax.Array,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | tuple[int, ...],
    pad_token_id: int,
    min_new_tokens: int = 0,
    cache_dtype: Any = None,
    prompt_repeats: int = 1,
    param_shardings: Any = None,
    batch_sharding: Any = None,
) -> Rollout:
    """Sample `max_new_tokens` tokens per LEFT-padded prompt with a KV cache, in one compiled program.

    y_t ~ q_t ∝ filter(softmax(z_t / τ)), z_t = model logits given (x, y_<t); decode stops as soon as
    every row has emitted an EOS. Log-prob convention: see `rlhf_jax.rollout.sampling`.

    Args:
      model: a `rlhf_jax.models.Transformer` with the LM head (hashable; part of the compile key).
      params: its parameters, passed to `jit` as an argument (new params of the same shapes reuse the
        compiled program).
      prompt_ids_BxP: int ids, LEFT-padded (P from a few bucketed widths, e.g. `data.batching.pad_prompts`).
      prompt_mask_BxP: 1 on real prompt tokens; each row needs ≥ 1 real token. Checked (ValueError) in full for
        host arrays and single-process `jax.Array`s (one small device->host copy); a multi-process global array is
        not fetched and not checked unless `RLHF_JAX_CHECK_PROMPTS=local` (each process checks its own rows).
      key: PRNG key; the same key, params and prompts give the same rollout.
      max_new_tokens: T, the static response length.
      temperature: τ; 0 = greedy.
      top_k, top_p: optional truncation (static).
      eos_token_id: an id or a tuple of ids that end a response.
      pad_token_id: written after the first EOS.
      min_new_tokens: EOS is suppressed before this many tokens (HF semantics).
      cache_dtype: KV-cache dtype (default: the model's).
      prompt_repeats: R ≥ 1. The prompts are U DISTINCT prompts and each is sampled R times: the result
        has B = U·R rows, rows u·R … u·R + R − 1 for prompt u (`np.repeat` order). The prompt is prefilled
        once per u and its KV cache shared by the R rows; R = 1 is plain sampling.
      param_shardings: optional pytree of `jax.sharding.Sharding` matching `params`
        (from `rlhf_jax.sharding`); batch_sharding: optional sharding of `[B, ...]` arrays. The cache and
        activations follow the model's logical constraints under the caller's
        `jax.set_mesh(mesh)` / `nn.logical_axis_rules(rules)` context. With FSDP-sharded params every decode
        step all-gathers the weights; pass a copy from `rlhf_jax.rollout.reshard_for_inference` with its
        `inference_layout` shardings to decode without parameter all-gathers.

    Returns:
      A `Rollout` (shapes `[B, P]` and `[B, T]`, B = U·R; its prompts are the repeated ones).
    """
    fn = _sampler(model, prompt_ids_BxP, prompt_mask_BxP, stored_dtypes=xla.leaf_dtypes(params),
                  max_new_tokens=max_new_tokens, temperature=temperature,
                  top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                  min_new_tokens=min_new_tokens, cache_dtype=cache_dtype, prompt_repeats=prompt_repeats,
                  param_shardings=param_shardings, batch_sharding=batch_sharding)
    return fn(params, prompt_ids_BxP, prompt_mask_BxP, key)


def lower_generate(model, params, prompt_ids_BxP, prompt_mask_BxP, *, key: jax.Array, **kwargs) -> jax.stages.Lowered:
    """The program `generate` would run for the same arguments, lowered but not run. Call it under the same
    mesh / axis-rules context; `.compile().as_text()` gives the partitioned HLO (e.g. to check which collectives
    run inside the decode loop, as `tests/rollout/test_layout.py` does)."""
    fn = _sampler(model, prompt_ids_BxP, prompt_mask_BxP, stored_dtypes=xla.leaf_dtypes(params), **kwargs)
    return fn.lower(params, prompt_ids_BxP, prompt_mask_BxP, key)


def _sampler(model, prompt_ids_BxP, prompt_mask_BxP, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id, pad_token_id: int,
             min_new_tokens: int = 0, cache_dtype: Any = None, prompt_repeats: int = 1, param_shardings: Any = None,
             batch_sharding: Any = None, stored_dtypes: Any = ()):
    """Validates `generate`'s arguments; the jitted sampler for them (cached)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be a positive int or None, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
    if not isinstance(prompt_repeats, (int, np.integer)) or prompt_repeats < 1:
        raise ValueError(f"prompt_repeats must be an int >= 1, got {prompt_repeats!r}")
    _check_prompts(prompt_ids_BxP, prompt_mask_BxP)
    settings = SamplingSettings(
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_k=None if top_k is None else int(top_k),
        top_p=None if top_p is None or top_p == 1.0 else float(top_p),
        eos_token_ids=_as_eos_tuple(eos_token_id),
        pad_token_id=int(pad_token_id),
        min_new_tokens=int(min_new_tokens),
        cache_dtype=cache_dtype,
        prompt_repeats=int(prompt_repeats),
    )
    return _compiled(model, settings, _Frozen.of(param_shardings), batch_sharding, _rules_key(),
                     frozenset(stored_dtypes))
