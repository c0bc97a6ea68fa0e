r"""ILQL: implicit language Q-learning (Snell et al. 2022, "Offline RL for Natural Language Generation with
Implicit Language Q Learning"), with the definitions of trlx's ``ILQLConfig.loss`` and
``AutoModelForCausalLMWithILQLHeads.generate`` (``trlx/models/modeling_ilql.py``).

Per response token t (action a_t taken in state s_t; s_{n} the terminal state after the last token), with Q
heads Q_i, their Polyak-averaged targets Q̂_i, the value head V and the LM logits z::

    Q̂_t  = min_i Q̂_i(s_t, a_t)                                    (stop-gradient)
    y_t   = r_t + γ · sg(V(s_{t+1})) · done_{t+1}                   (done = 0 at the terminal state)
    L_Q   = Σ_i (Q_i(s_t, a_t) − y_t)²
    L_V   = |τ − 1[Q̂_t < V(s_t)]| · (Q̂_t − V(s_t))²                 (expectile regression, τ ∈ (0, 1))
    L_CQL = Σ_i CE(Q_i(s_t, ·), a_t) = Σ_i [logsumexp_a Q_i(s_t, a) − Q_i(s_t, a_t)]
    w_t   = sg(exp(β · (Q̂_t − V(s_t))))                               (AWAC weight)
    L_AWAC = w_t · CE(z_t, a_t)
    ℓ_t   = L_Q + L_V + cql_scale · L_CQL + awac_scale · L_AWAC

trlx divides the masked sum of every term by the number of non-terminal tokens of the batch, i.e. the
token-mean of ℓ: :func:`ilql_loss` returns ℓ per token and the caller aggregates ``(sum, count)``.

Decoding (trlx ``generate``): ``log_softmax(z) + β_gen · (min_i Q̂_i(s, ·) − V(s))``, then top-k and
temperature (:func:`ilql_perturbed_logits`). The target heads follow the online ones by Polyak averaging
``θ̂ ← α·θ + (1 − α)·θ̂`` every ``steps_for_target_q_sync`` steps (:func:`polyak_update`).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from rlhf_jax.ops._util import as_float, bool_mask, check_rank, compute_dtype


class ILQLTerms(NamedTuple):
    """Per-token terms of :func:`ilql_loss`, ``[B, T]``, 0 where the mask is 0."""

    loss: jax.Array  # ℓ_t, the combined loss
    loss_q: jax.Array  # Σ_i (Q_i − y)²
    loss_v: jax.Array  # expectile loss
    loss_cql: jax.Array  # Σ_i CE(Q_i, a)
    loss_awac: jax.Array  # w · CE(z, a)
    q: jax.Array  # Q_1(s_t, a_t) (the first head), for logging
    target_q: jax.Array  # min_i Q̂_i(s_t, a_t)
    v: jax.Array  # V(s_t)
    awac_weight: jax.Array  # w_t


def expectile_loss(diff: jax.Array, *, tau: float) -> jax.Array:
    r"""Asymmetric squared loss of ``diff = target − prediction``: :math:`|\tau − 1[d < 0]|\, d^2`.

    τ = 0.5 is half the squared error; τ → 1 fits the upper expectile (trlx: ``(tQ >= V)·τ·(tQ − V)² +
    (tQ < V)·(1 − τ)·(tQ − V)²``; Kostrikov et al. 2021, IQL)."""
    d = jnp.asarray(diff)
    return jnp.where(d >= 0, tau, 1.0 - tau) * d * d


def cql_loss(q_BxTxV: jax.Array, actions_BxT: jax.Array) -> jax.Array:
    r"""Conservative Q term as trlx: the cross-entropy of ``softmax(Q(s, ·))`` at the taken action,
    :math:`\log\sum_a e^{Q(s,a)} − Q(s, a_t)`, ``[B, T]`` (Kumar et al. 2020, CQL(H))."""
    check_rank("cql_loss", "q_BxTxV", q_BxTxV, 3)
    dtype = compute_dtype(q_BxTxV)
    q = q_BxTxV.astype(dtype)
    picked = jnp.take_along_axis(q, actions_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(q, axis=-1) - picked


def awac_weights(target_q_BxT: jax.Array, v_BxT: jax.Array, *, beta: float) -> jax.Array:
    r"""AWAC weights :math:`\exp(\beta (\hat Q − V))`, stop-gradient (Nair et al. 2020; trlx ``awac_weight``)."""
    return jax.lax.stop_gradient(jnp.exp(beta * (target_q_BxT - v_BxT)))


def ilql_td_targets(rewards_BxT: jax.Array, v_next_BxT: jax.Array, next_nonterminal_BxT: jax.Array, *,
                    gamma: float) -> jax.Array:
    r"""TD targets :math:`y_t = r_t + \gamma \cdot \mathrm{sg}(V(s_{t+1})) \cdot \mathrm{done}_{t+1}`, with
    ``next_nonterminal`` = trlx's ``dones[:, 1:]`` (1 while the next state is not terminal)."""
    v_next = jax.lax.stop_gradient(v_next_BxT * next_nonterminal_BxT.astype(v_next_BxT.dtype))
    return rewards_BxT + gamma * v_next


def _pick(x_BxTxV, actions_BxT):
    return jnp.take_along_axis(x_BxTxV, actions_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]


def ilql_loss(logits_BxTxV: jax.Array, qs: Sequence[jax.Array], target_qs: Sequence[jax.Array],
              v_BxT1: jax.Array, actions_BxT: jax.Array, rewards_BxT: jax.Array, mask_BxT: jax.Array, *,
              tau: float, gamma: float, cql_scale: float, awac_scale: float, beta: float) -> ILQLTerms:
    """Per-token ILQL loss (see the module docstring) for a right-padded batch of responses.

    Args:
      logits_BxTxV: LM logits at the T action positions (position t predicts action a_t).
      qs, target_qs: the online and target Q heads at the same positions, each ``[B, T, V]``.
      v_BxT1: V at the T + 1 states s_0 … s_T (state t+1 follows action t).
      actions_BxT: the response tokens a_t.
      rewards_BxT: per-token rewards (trlx puts the sequence reward on the last token).
      mask_BxT: 1 on real response tokens (a row of n tokens: the first n); the state after the last real
        token is terminal (its V is not bootstrapped from).
      tau, gamma, cql_scale, awac_scale, beta: trlx's ``ILQLConfig`` hyperparameters.

    Returns:
      :class:`ILQLTerms`, every entry 0 on padding (padding never changes a real token's terms).
    """
    check_rank("ilql_loss", "logits_BxTxV", logits_BxTxV, 3)
    check_rank("ilql_loss", "v_BxT1", v_BxT1, 2)
    B, T = actions_BxT.shape
    if v_BxT1.shape != (B, T + 1):
        raise ValueError(f"rlhf_jax.ops.ilql_loss: v must be [B, T + 1]={(B, T + 1)}, got {v_BxT1.shape}")
    if not qs or len(qs) != len(target_qs):
        raise ValueError(f"rlhf_jax.ops.ilql_loss: need as many target Q heads as Q heads (≥ 1), got "
                         f"{len(qs)} and {len(target_qs)}")
    dtype = compute_dtype(logits_BxTxV, v_BxT1, *qs)
    m = bool_mask(mask_BxT)
    zero = jnp.zeros((B, T), dtype)
    v_all = as_float(v_BxT1, dtype)
    v, v_next = v_all[:, :-1], v_all[:, 1:]
    # next state s_{t+1} is non-terminal iff token t + 1 is real (trlx dones[:, 1:])
    next_nonterminal = jnp.concatenate([m[:, 1:], jnp.zeros((B, 1), bool)], axis=1)
    y = ilql_td_targets(as_float(rewards_BxT, dtype), v_next, next_nonterminal, gamma=gamma)
    q_taken = [_pick(as_float(q, dtype), actions_BxT) for q in qs]
    target_q = jax.lax.stop_gradient(
        jnp.min(jnp.stack([_pick(as_float(q, dtype), actions_BxT) for q in target_qs]), axis=0))
    loss_q = sum(jnp.square(q - y) for q in q_taken)
    loss_v = expectile_loss(target_q - v, tau=tau)
    loss_cql = sum(cql_loss(q, actions_BxT) for q in qs)
    weight = awac_weights(target_q, v, beta=beta)
    z = logits_BxTxV.astype(dtype)
    ce = jax.nn.logsumexp(z, axis=-1) - _pick(z, actions_BxT)
    loss_awac = weight * ce
    loss = loss_q + loss_v + cql_scale * loss_cql + awac_scale * loss_awac
    keep = lambda x: jnp.where(m, x, zero)  # noqa: E731  (where, not *: a NaN on padding stays out)
    return ILQLTerms(loss=keep(loss), loss_q=keep(loss_q), loss_v=keep(loss_v), loss_cql=keep(loss_cql),
                     loss_awac=keep(loss_awac), q=keep(q_taken[0]), target_q=keep(target_q), v=keep(v),
                     awac_weight=keep(weight))


def ilql_perturbed_logits(logits_BxV: jax.Array, target_qs: Sequence[jax.Array], v_B: jax.Array, *,
                          beta: float) -> jax.Array:
    r"""trlx's decoding scores :math:`\log\mathrm{softmax}(z) + \beta\,(\min_i \hat Q_i(s, \cdot) − V(s))`,
    ``[B, V]`` in float32 (then top-k and temperature as usual: sampling softmax(scores / τ) over the top k)."""
    check_rank("ilql_perturbed_logits", "logits_BxV", logits_BxV, 2)
    dtype = compute_dtype(logits_BxV)
    q = jnp.min(jnp.stack([as_float(t, dtype) for t in target_qs]), axis=0)
    return jax.nn.log_softmax(logits_BxV.astype(dtype), axis=-1) + beta * (q - as_float(v_B, dtype)[:, None])


def polyak_update(target: Any, online: Any, *, alpha: float) -> Any:
    r"""Polyak averaging of every leaf: :math:`\hat\theta \leftarrow \alpha\theta + (1 − \alpha)\hat\theta`
    (trlx ``ILQLHeads._sync_target_q_heads``; α = 1 copies)."""
    return jax.tree.map(lambda t, o: (alpha * o + (1.0 - alpha) * t).astype(t.dtype), target, online)
