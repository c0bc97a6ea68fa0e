"""TRL ``DPOTrainer`` options beyond the loss type: the ``sft`` term (``rpo_alpha``), WPO weights, LD-DPO.

Reference: TRL 1.16 ``trl/trainer/dpo_trainer.py`` (``DPOTrainer._compute_loss`` and
``_compute_ref_logps``) and ``trl/kernels/chunked_logprob.py`` (``log_sum_sq_probs``), read for this
implementation; the values are checked against that code in ``tests/ops/test_dpo_options_trl_parity.py``.
Combining several loss types with weights is ``ops.dpo_loss(loss_type=(...), loss_weights=(...))``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops._util import bool_mask, check_rank, check_same_shape, compute_dtype


def sft_nll(chosen_token_logps_BxT: jax.Array, chosen_mask_BxT: jax.Array) -> jax.Array:
    r"""TRL's ``sft`` loss type: the token-mean NLL over every chosen completion token of the batch.

    .. math:: \ell_\text{sft} = -\frac{\sum_{i,t} m_{it}\log\pi(y^c_{it})}{\sum_{i,t} m_{it}}

    (TRL 1.16 ``loss_type="sft"``: ``-chosen_per_token_logps[chosen_mask].mean()``, broadcast to every
    pair; RPO, Pang et al. 2024, as TRL ≤ 0.x ``rpo_alpha``: ``losses + rpo_alpha * nll_loss``.) One
    scalar for the batch (0 when it has no token); the per-token form keeps ``ld_alpha`` out of it, as TRL.
    """
    check_rank("sft_nll", "chosen_token_logps_BxT", chosen_token_logps_BxT, 2)
    check_same_shape("sft_nll", chosen_token_logps_BxT=chosen_token_logps_BxT, chosen_mask_BxT=chosen_mask_BxT)
    return sft_nll_from_sums(*_sums(chosen_token_logps_BxT, chosen_mask_BxT))


def _sums(logp_BxT, mask_BxT):
    dtype = compute_dtype(logp_BxT)
    m = bool_mask(mask_BxT)
    return jnp.sum(jnp.where(m, logp_BxT.astype(dtype), 0), axis=-1), jnp.sum(m, axis=-1).astype(dtype)


def sft_nll_from_sums(chosen_logps_B: jax.Array, chosen_lengths_B: jax.Array) -> jax.Array:
    r""":func:`sft_nll` from per-row sums :math:`\sum_t m_t\log\pi` and token counts (rows of 0 tokens add 0)."""
    check_rank("sft_nll_from_sums", "chosen_logps_B", chosen_logps_B, 1)
    check_same_shape("sft_nll_from_sums", chosen_logps_B=chosen_logps_B, chosen_lengths_B=chosen_lengths_B)
    dtype = compute_dtype(chosen_logps_B)
    n = jnp.sum(chosen_lengths_B.astype(dtype))
    return -jnp.sum(chosen_logps_B.astype(dtype)) / jnp.maximum(n, 1.0)


def log_sum_sq_probs(logits_BxTxV: jax.Array) -> jax.Array:
    r""":math:`\log\sum_v p_{t,v}^2 = \mathrm{LSE}(2z_t) - 2\,\mathrm{LSE}(z_t)` at each position (float32 or wider).

    The WPO alignment term (TRL ``chunked_logprob``: ``log(sq_sum_exp) - 2 log(sum_exp)``).
    """
    check_rank("log_sum_sq_probs", "logits_BxTxV", logits_BxTxV, 3)
    z = logits_BxTxV.astype(compute_dtype(logits_BxTxV))
    return jax.nn.logsumexp(2.0 * z, axis=-1) - 2.0 * jax.nn.logsumexp(z, axis=-1)


def wpo_weights(chosen_aligned_B: jax.Array, rejected_aligned_B: jax.Array, chosen_lengths_B: jax.Array,
                rejected_lengths_B: jax.Array) -> jax.Array:
    r"""WPO per-pair weight (Zhou et al. 2024, Eq. 2, as TRL ``use_weighting``), stop-gradient.

    .. math:: w = \exp\Big(\tfrac{1}{|y_c|}\sum_t a^c_t\Big)\exp\Big(\tfrac{1}{|y_r|}\sum_t a^r_t\Big),
              \qquad a_t = \log\pi(y_t) - \log\sum_v \pi(v)^2

    Inputs are the per-row sums :math:`\sum_t m_t a_t` (see :func:`log_sum_sq_probs`) and token counts
    (clamped at ≥ 1). Every loss type, ``sft`` included, is multiplied by ``w`` before its batch mean.
    """
    check_rank("wpo_weights", "chosen_aligned_B", chosen_aligned_B, 1)
    check_same_shape("wpo_weights", chosen_aligned_B=chosen_aligned_B, rejected_aligned_B=rejected_aligned_B,
                     chosen_lengths_B=chosen_lengths_B, rejected_lengths_B=rejected_lengths_B)
    dtype = compute_dtype(chosen_aligned_B, rejected_aligned_B)

    def mean(a, n):
        return a.astype(dtype) / jnp.maximum(n.astype(dtype), 1.0)

    w = jnp.exp(mean(chosen_aligned_B, chosen_lengths_B)) * jnp.exp(mean(rejected_aligned_B, rejected_lengths_B))
    return jax.lax.stop_gradient(w)


def ld_logps(token_logps_2BxT: jax.Array, mask_2BxT: jax.Array, *, ld_alpha: float) -> jax.Array:
    r"""LD-DPO sequence log-probs (Liu et al. 2024, as TRL ``ld_alpha``) of the rows chosen ++ rejected.

    With :math:`\ell_p = \min(|y_c|, |y_r|)` the pair's shared length and k the 1-based index of a
    token among its row's completion tokens:

    .. math:: \log\pi_\text{LD}(y) = \sum_{k \le \ell_p} \log\pi(y_k) + \alpha \sum_{k > \ell_p} \log\pi(y_k)

    α = 1 is plain DPO's sum; α = 0 drops every token past the shared length. The reference gets the same
    treatment (TRL ``_compute_ref_logps``). Row i of the first half is paired with row i of the second.

    Returns:
      ``logp_2B``.
    """
    check_rank("ld_logps", "token_logps_2BxT", token_logps_2BxT, 2)
    check_same_shape("ld_logps", token_logps_2BxT=token_logps_2BxT, mask_2BxT=mask_2BxT)
    if token_logps_2BxT.shape[0] % 2:
        raise ValueError(f"rlhf_jax.ops.ld_logps: needs an even row count (chosen ++ rejected), got "
                         f"{token_logps_2BxT.shape[0]}")
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"rlhf_jax.ops.ld_logps: ld_alpha must be in [0, 1], got {ld_alpha}")
    dtype = compute_dtype(token_logps_2BxT)
    m = bool_mask(mask_2BxT)
    pos = jnp.cumsum(m.astype(jnp.int32), axis=1)
    lens = pos[:, -1]
    b = lens.shape[0] // 2
    shared = jnp.minimum(lens[:b], lens[b:])
    shared_2B = jnp.concatenate([shared, shared])[:, None]
    logp = jnp.where(m, token_logps_2BxT.astype(dtype), 0)
    head = jnp.sum(jnp.where(pos <= shared_2B, logp, 0), axis=1)
    tail = jnp.sum(jnp.where(pos > shared_2B, logp, 0), axis=1)
    return head + ld_alpha * tail
