"""ILQL on one trunk: the LM, two Q heads with Polyak-averaged targets and a V head (trlx ``ILQLHeads``).

Params are ``{"lm": <Transformer params>, "heads": <ILQLHeads params>}``; the heads read the trunk's
final-norm hidden states (HF ``hidden_states[-1]``, as trlx). Each head is trlx's ``make_head``:
``Linear(D, 2D) → ReLU → Linear(2D, out)`` (out = V for Q heads, 1 for V), torch's default init; the target
heads start as copies of the Q heads.

Training (:func:`ilql_loss`): ONE forward of ``[prompt | response]`` with the head run on positions
``P − 1 … P + T − 1``: position P − 1 + t is state s_t (predicting action a_t = response token t), the T + 1
positions are the states s_0 … s_T, so the LM logits and Q at the first T and V at all T + 1 come from it
(trlx's ``actions_ixs`` / ``states_ixs``). Decoding (:class:`ILQLPolicy`): a drop-in model for
``rlhf_jax.rollout.generate`` whose "logits" are ``log_softmax(z) + β·(min Q̂ − V)`` (trlx ``generate``);
the sampler's top-k and temperature then act on them exactly as trlx's ``topk_mask`` + ``softmax(·/τ)``.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax import ops
from rlhf_jax.data.ilql import ILQLBatch
from rlhf_jax.models import Transformer
from rlhf_jax.models.config import ModelConfig

#: torch.nn.Linear's default init: U(±1/sqrt(fan_in)) for weights (kaiming_uniform a=√5) and biases.
_TORCH_LINEAR = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias(fan_in: int):
    bound = fan_in ** -0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class MLPHead(nn.Module):
    """trlx ``make_head``: Linear(D, 2D) → ReLU → Linear(2D, out); float32 output."""

    config: ModelConfig
    out: int
    out_axis: str | None  # logical axis of the output ("vocab" for Q heads, None for V)

    @nn.compact
    def __call__(self, h_BxSxD):
        c, dt = self.config, self.config.dtype
        D, H = c.hidden_size, 2 * c.hidden_size
        part = nn.with_logical_partitioning
        w1 = self.param("w1", part(_TORCH_LINEAR, ("embed", "mlp")), (D, H), c.param_dtype)
        b1 = self.param("b1", part(_torch_bias(D), ("mlp",)), (H,), c.param_dtype)
        # the 2D-wide input axis is named "embed" so that it splits over fsdp like the LM head's
        w2 = self.param("w2", part(_TORCH_LINEAR, ("embed", self.out_axis)), (H, self.out), c.param_dtype)
        b2 = self.param("b2", part(_torch_bias(H), (self.out_axis,)), (self.out,), c.param_dtype)
        x = jax.nn.relu(h_BxSxD.astype(dt) @ w1.astype(dt) + b1.astype(dt))
        return (x @ w2.astype(dt) + b2.astype(dt)).astype(jnp.float32)


class ILQLHeads(nn.Module):
    """Q heads ``q_i``, target heads ``target_q_i`` (i < 2, or 1 with ``two_qs=False``) and ``v``."""

    config: ModelConfig
    two_qs: bool = True

    @nn.compact
    def __call__(self, h_BxSxD):
        n = 2 if self.two_qs else 1
        V = self.config.vocab_size
        qs = tuple(MLPHead(self.config, V, "vocab", name=f"q_{i}")(h_BxSxD) for i in range(n))
        target_qs = tuple(MLPHead(self.config, V, "vocab", name=f"target_q_{i}")(h_BxSxD) for i in range(n))
        v = MLPHead(self.config, 1, None, name="v")(h_BxSxD)[..., 0]
        return qs, target_qs, v


def q_names(params_heads) -> list[str]:
    return sorted(k for k in params_heads if k.startswith("q_"))


def init_heads(config: ModelConfig, key: jax.Array, *, two_qs: bool):
    """Boxed (logically partitioned) head params; each target head a copy of its Q head (trlx deepcopy)."""
    heads = ILQLHeads(config, two_qs=two_qs)
    params = dict(heads.init(key, jnp.zeros((1, 1, config.hidden_size), config.dtype))["params"])
    for name in q_names(params):
        params["target_" + name] = params[name]
    return params


def sync_targets(heads, before, *, alpha: float, sync):
    """Head params after an optimizer step: each target head is its value ``before`` the step (the optimizer
    never moves it), Polyak-averaged towards the updated Q head where ``sync`` (a bool, traced or not)."""
    out = dict(heads)
    for name in q_names(heads):
        t = "target_" + name
        moved = ops.polyak_update(before[t], heads[name], alpha=alpha)
        out[t] = jax.tree.map(lambda a, b: jnp.where(sync, a, b), moved, before[t])
    return out


class ILQLHparams(NamedTuple):
    """trlx ``ILQLConfig``'s loss hyperparameters (static)."""

    tau: float
    gamma: float
    cql_scale: float
    awac_scale: float
    beta: float


class ILQLAux(NamedTuple):
    """Sums over the real response tokens of a batch (divided by `tokens` for logging)."""

    tokens: jax.Array
    sequences: jax.Array
    loss_q: jax.Array
    loss_v: jax.Array
    loss_cql: jax.Array
    loss_awac: jax.Array
    q: jax.Array
    target_q: jax.Array
    v: jax.Array
    awac_weight: jax.Array


def ilql_forward(model: Transformer, heads: ILQLHeads, params, batch: ILQLBatch):
    """(logits_BxTxV, qs, target_qs, v_BxT1) from one forward of ``[prompt | response]``."""
    P, T = batch.prompt_ids_BxP.shape[1], batch.response_ids_BxT.shape[1]
    ids = jnp.concatenate([batch.prompt_ids_BxP, batch.response_ids_BxT], axis=1)
    mask = jnp.concatenate([batch.prompt_mask_BxP, batch.response_mask_BxT], axis=1)
    logits, hidden = model.apply({"params": params["lm"]}, ids, mask, head_span=(P - 1, P + T), return_hidden=True)
    qs, target_qs, v = heads.apply({"params": params["heads"]}, hidden)
    cut = lambda x: x[:, :T]  # noqa: E731  (actions are states 0 … T − 1)
    return cut(logits), tuple(map(cut, qs)), tuple(jax.lax.stop_gradient(cut(q)) for q in target_qs), v


def ilql_loss(model: Transformer, heads: ILQLHeads, params, batch: ILQLBatch, key: jax.Array, *,
              hp: ILQLHparams):
    """``((loss_sum, tokens), ILQLAux)``: trlx's ILQL loss, token-mean once divided (``train.step``)."""
    del key
    logits, qs, target_qs, v = ilql_forward(model, heads, params, batch)
    terms = ops.ilql_loss(logits, qs, target_qs, v, batch.response_ids_BxT, batch.rewards_BxT,
                          batch.response_mask_BxT, tau=hp.tau, gamma=hp.gamma, cql_scale=hp.cql_scale,
                          awac_scale=hp.awac_scale, beta=hp.beta)
    mask = batch.response_mask_BxT.astype(jnp.float32)
    tokens = jnp.sum(mask)
    aux = ILQLAux(tokens=tokens, sequences=jnp.sum(jnp.any(mask > 0, axis=1)).astype(jnp.float32),
                  **{f: jnp.sum(getattr(terms, f)) for f in ILQLAux._fields[2:]})
    return (jnp.sum(terms.loss), tokens), aux


def describe_aux(aux: ILQLAux) -> dict[str, float]:
    """Per-token means of the summed aux (host floats)."""
    n = max(float(aux.tokens), 1.0)
    return {"tokens": float(aux.tokens), "sequences": float(aux.sequences),
            **{f: float(getattr(aux, f)) / n for f in ILQLAux._fields[2:]}}


class ILQLPolicy(nn.Module):
    """The decoding model: same call signature as `Transformer` (with a KV cache it returns
    ``(scores, cache)``), scores ``log_softmax(z) + beta·(min_i Q̂_i − V)`` at every position."""

    config: ModelConfig
    two_qs: bool = True
    beta: float = 1.0

    @nn.compact
    def __call__(self, input_ids_BxS, attention_mask_BxS, **kwargs):
        out = Transformer(self.config, name="lm")(input_ids_BxS, attention_mask_BxS, return_hidden=True, **kwargs)
        (logits, hidden), cache = (out, None) if kwargs.get("cache") is None else out
        _, target_qs, v = ILQLHeads(self.config, two_qs=self.two_qs, name="heads")(hidden)
        B, S, V = logits.shape
        flat = lambda x: x.reshape(B * S, *x.shape[2:])  # noqa: E731
        scores = ops.ilql_perturbed_logits(flat(logits), [flat(q) for q in target_qs], flat(v), beta=self.beta)
        scores = scores.reshape(B, S, V)
        return scores if cache is None else (scores, cache)
