"""Per-token log-probabilities, entropy and per-sequence reductions of language-model logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops._util import bool_mask, check_rank, check_same_shape, compute_dtype, safe_div


def token_logprobs(logits_BxTxV: jax.Array, tokens_BxT: jax.Array) -> jax.Array:
    r"""Log-probability of each given token under the logits' softmax.

    .. math:: \log \pi(y_t) = z_{t, y_t} - \log\sum_v \exp z_{t, v}

    The log-normaliser is computed in (at least) float32 by one fused reduction, and only the chosen
    logit is gathered, so no full ``[B, T, V]`` log-softmax is materialised (bf16 logits stay bf16 in
    memory). Callers shift themselves: logits at position t score token t here.

    Args:
      logits_BxTxV: unnormalised logits, any float dtype.
      tokens_BxT: integer token ids in ``[0, V)``.

    Returns:
      ``logp_BxT`` in ``promote_types(logits.dtype, float32)``.
    """
    check_rank("token_logprobs", "logits_BxTxV", logits_BxTxV, 3)
    check_rank("token_logprobs", "tokens_BxT", tokens_BxT, 2)
    if logits_BxTxV.shape[:2] != tokens_BxT.shape:
        raise ValueError(
            "rlhf_jax.ops.token_logprobs: logits [B,T,V] and tokens [B,T] disagree: "
            f"{logits_BxTxV.shape} vs {tokens_BxT.shape}"
        )
    dtype = compute_dtype(logits_BxTxV)
    lse_BxT = jax.nn.logsumexp(logits_BxTxV.astype(dtype), axis=-1)
    picked_BxT = jnp.take_along_axis(logits_BxTxV, tokens_BxT[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked_BxT.astype(dtype) - lse_BxT


def entropy(logits_BxTxV: jax.Array) -> jax.Array:
    r"""Entropy of the softmax distribution at each position.

    .. math:: H_t = \log Z_t - \sum_v p_{t,v} z_{t,v}, \qquad p = \mathrm{softmax}(z)

    Computed in (at least) float32; entries with probability 0 (e.g. logits masked to ``-inf`` by
    top-k) contribute 0 instead of ``0 · inf``.

    Args:
      logits_BxTxV: unnormalised logits, any float dtype.

    Returns:
      ``entropy_BxT`` in ``promote_types(logits.dtype, float32)``.
    """
    check_rank("entropy", "logits_BxTxV", logits_BxTxV, 3)
    dtype = compute_dtype(logits_BxTxV)
    z = logits_BxTxV.astype(dtype)
    lse_BxT = jax.nn.logsumexp(z, axis=-1)
    p = jnp.exp(z - lse_BxT[..., None])
    pz_BxT = jnp.sum(jnp.where(p > 0, p * z, 0), axis=-1)
    return lse_BxT - pz_BxT


def sequence_logprobs(logp_BxT: jax.Array, mask_BxT: jax.Array, *, average: bool = False) -> jax.Array:
    r"""Sum (or mean) of token log-probs over the real tokens of each row.

    .. math:: \log\pi(y) = \sum_t m_t \log\pi(y_t) \quad\text{or}\quad
              \frac{\sum_t m_t \log\pi(y_t)}{\sum_t m_t}

    Padding (mask 0) is ignored even when it holds NaN or ``-inf``. A row with no real token gives 0.

    Args:
      logp_BxT: per-token log-probabilities.
      mask_BxT: 1 on real tokens, 0 on padding.
      average: divide by the number of real tokens (SimPO/ORPO/IPO style) instead of summing (DPO).

    Returns:
      ``logp_B``.
    """
    check_rank("sequence_logprobs", "logp_BxT", logp_BxT, 2)
    check_same_shape("sequence_logprobs", logp_BxT=logp_BxT, mask_BxT=mask_BxT)
    dtype = compute_dtype(logp_BxT)
    m = bool_mask(mask_BxT)
    total_B = jnp.sum(jnp.where(m, logp_BxT.astype(dtype), 0), axis=-1)
    if not average:
        return total_B
    return safe_div(total_B, jnp.sum(m, axis=-1).astype(dtype))
