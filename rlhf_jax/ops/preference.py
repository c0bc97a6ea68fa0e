"""Reference-free and unpaired preference losses: SimPO, ORPO, KTO, and the Bradley–Terry RM loss.

DPO and its TRL variants live in :mod:`rlhf_jax.ops.dpo`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops._util import check_rank, check_same_shape, compute_dtype

log_sigmoid = jax.nn.log_sigmoid
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def simpo_loss(
    chosen_avg_logps_B: jax.Array,
    rejected_avg_logps_B: jax.Array,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""SimPO: reference-free, length-normalised DPO with a target margin γ.

    .. math:: \ell = -(1-\epsilon)\log\sigma(x) - \epsilon\log\sigma(-x), \qquad
              x = \beta\,\overline{\log\pi}(y_c) - \beta\,\overline{\log\pi}(y_r) - \gamma

    (Meng et al. 2024, Eq. 6; TRL ``CPOTrainer`` with ``loss_type="simpo"``, where ``simpo_gamma`` = γ
    and ε is label smoothing.) Inputs are *average* per-token log-probs
    (``sequence_logprobs(..., average=True)``). Rewards are β·avg log-prob (stop-gradient), as TRL.

    Returns:
      ``(losses_B, chosen_rewards_B, rejected_rewards_B)``.
    """
    check_rank("simpo_loss", "chosen_avg_logps_B", chosen_avg_logps_B, 1)
    check_same_shape("simpo_loss", chosen_avg_logps_B=chosen_avg_logps_B, rejected_avg_logps_B=rejected_avg_logps_B)
    dtype = compute_dtype(chosen_avg_logps_B, rejected_avg_logps_B)
    c, r = chosen_avg_logps_B.astype(dtype), rejected_avg_logps_B.astype(dtype)
    x = beta * (c - r) - gamma
    losses = -log_sigmoid(x) * (1 - label_smoothing) - log_sigmoid(-x) * label_smoothing
    return losses, jax.lax.stop_gradient(beta * c), jax.lax.stop_gradient(beta * r)


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 − eˣ) for x < 0, accurate at both ends (Mächler 2012)."""
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_log_odds(chosen_avg_logps_B: jax.Array, rejected_avg_logps_B: jax.Array) -> jax.Array:
    r"""Log odds ratio :math:`\log\frac{\mathrm{odds}(y_c)}{\mathrm{odds}(y_r)}`.

    odds(y) = p/(1−p) with p = exp(average token log-prob); log(1 − p) computed stably.
    """
    check_same_shape("orpo_log_odds", chosen_avg_logps_B=chosen_avg_logps_B, rejected_avg_logps_B=rejected_avg_logps_B)
    dtype = compute_dtype(chosen_avg_logps_B, rejected_avg_logps_B)
    c, r = chosen_avg_logps_B.astype(dtype), rejected_avg_logps_B.astype(dtype)
    return (c - r) - (_log1mexp(c) - _log1mexp(r))


def orpo_loss(
    chosen_avg_logps_B: jax.Array,
    rejected_avg_logps_B: jax.Array,
    *,
    beta: float,
    chosen_nll_B: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""ORPO: SFT negative log-likelihood plus an odds-ratio preference term (no reference model).

    .. math:: \ell = \mathrm{NLL}(y_c) - \lambda \log\sigma\Big(\log\frac{\mathrm{odds}(y_c)}{\mathrm{odds}(y_r)}\Big)

    (Hong et al. 2024, Eqs. 6–7; TRL ``ORPOTrainer.odds_ratio_loss``, where λ is called ``beta``.)
    Inputs are *average* per-token log-probs of the completions. ``chosen_nll_B`` is the per-row SFT
    term (e.g. −mean token log-prob of the chosen completion); omit it to get only the odds-ratio
    term and aggregate the NLL yourself (TRL uses a token-mean NLL over the chosen batch). Rewards are
    β·avg log-prob (stop-gradient), as TRL.

    Returns:
      ``(losses_B, chosen_rewards_B, rejected_rewards_B)``.
    """
    check_rank("orpo_loss", "chosen_avg_logps_B", chosen_avg_logps_B, 1)
    log_odds = orpo_log_odds(chosen_avg_logps_B, rejected_avg_logps_B)
    losses = -beta * log_sigmoid(log_odds)
    if chosen_nll_B is not None:
        check_same_shape("orpo_loss", chosen_avg_logps_B=chosen_avg_logps_B, chosen_nll_B=chosen_nll_B)
        losses = losses + chosen_nll_B.astype(losses.dtype)
    c = chosen_avg_logps_B.astype(losses.dtype)
    r = rejected_avg_logps_B.astype(losses.dtype)
    return losses, jax.lax.stop_gradient(beta * c), jax.lax.stop_gradient(beta * r)


def kto_kl_baseline(policy_kl_logps_B: jax.Array, ref_kl_logps_B: jax.Array) -> jax.Array:
    r"""KTO's reference point :math:`z_0 = \max(0, \mathrm{mean}(\log\pi_\theta(y') - \log\pi_\text{ref}(y')))`.

    y' are mismatched completions (each prompt paired with another row's completion), as TRL
    ``KTOTrainer``; stop-gradient. Under ``jit`` with a global batch the mean is already global.
    """
    check_same_shape("kto_kl_baseline", policy_kl_logps_B=policy_kl_logps_B, ref_kl_logps_B=ref_kl_logps_B)
    dtype = compute_dtype(policy_kl_logps_B, ref_kl_logps_B)
    kl = jnp.mean(policy_kl_logps_B.astype(dtype) - ref_kl_logps_B.astype(dtype))
    return jax.lax.stop_gradient(jnp.maximum(kl, 0))


def kto_loss(
    policy_logps_B: jax.Array,
    ref_logps_B: jax.Array,
    desirable_B: jax.Array,
    *,
    kl: float | jax.Array,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> tuple[jax.Array, jax.Array]:
    r"""KTO on unpaired completions labelled desirable (1) or undesirable (0).

    With u = log π_θ(y) − log π_ref(y) and the reference point z₀ = ``kl`` (see :func:`kto_kl_baseline`;
    clamped at ≥ 0 and stop-gradiented here, as TRL):

    .. math:: \ell = \begin{cases} \lambda_D\,(1 - \sigma(\beta(u - z_0))) & \text{desirable} \\
                                  \lambda_U\,(1 - \sigma(\beta(z_0 - u))) & \text{undesirable} \end{cases}

    (Ethayarajh et al. 2024, Eq. 8; TRL ``KTOTrainer.kto_loss``.) ``loss_type="apo_zero_unpaired"``
    (TRL, D'Oosterlinck et al. 2024): 1 − σ(βu) for desirable, σ(βu) for undesirable, no z₀.
    TRL concatenates desirable then undesirable rows and averages; here rows keep their order and the
    trainer averages ``losses_B`` (or aggregates them).

    Returns:
      ``(losses_B, rewards_B)`` with rewards β·u (stop-gradient).
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"rlhf_jax.ops.kto_loss: unknown loss_type {loss_type!r}; expected {KTO_LOSS_TYPES}")
    check_rank("kto_loss", "policy_logps_B", policy_logps_B, 1)
    check_same_shape("kto_loss", policy_logps_B=policy_logps_B, ref_logps_B=ref_logps_B, desirable_B=desirable_B)
    dtype = compute_dtype(policy_logps_B, ref_logps_B)
    u = policy_logps_B.astype(dtype) - ref_logps_B.astype(dtype)
    good = jnp.asarray(desirable_B) != 0
    if loss_type == "kto":
        z0 = jax.lax.stop_gradient(jnp.maximum(jnp.asarray(kl, dtype), 0))
        good_loss = 1 - jax.nn.sigmoid(beta * (u - z0))
        bad_loss = 1 - jax.nn.sigmoid(beta * (z0 - u))
    else:
        good_loss = 1 - jax.nn.sigmoid(beta * u)
        bad_loss = jax.nn.sigmoid(beta * u)
    losses = jnp.where(good, desirable_weight * good_loss, undesirable_weight * bad_loss)
    return losses, jax.lax.stop_gradient(beta * u)


def bradley_terry_loss(
    chosen_B: jax.Array, rejected_B: jax.Array, *, margin: jax.Array | float | None = None
) -> jax.Array:
    r"""Pairwise reward-model loss :math:`-\log\sigma(s_c - s_r - m)` (Bradley & Terry 1952;
    Ouyang et al. 2022; margin as Llama 2 / TRL ``RewardTrainer``)."""
    check_rank("bradley_terry_loss", "chosen_B", chosen_B, 1)
    check_same_shape("bradley_terry_loss", chosen_B=chosen_B, rejected_B=rejected_B)
    dtype = compute_dtype(chosen_B, rejected_B)
    diff = chosen_B.astype(dtype) - rejected_B.astype(dtype)
    if margin is not None:
        diff = diff - jnp.asarray(margin, dtype)
    return -log_sigmoid(diff)
