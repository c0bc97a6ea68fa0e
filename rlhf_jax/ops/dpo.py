"""The DPO loss family on sequence log-probabilities, reproducing TRL's ``DPOTrainer``.

Reference: TRL 1.x ``trl/trainer/dpo_trainer.py`` (``DPOTrainer._compute_loss``: f-divergence scores,
then one branch per ``loss_type``), read for this implementation. Inputs are per-sequence log-prob
*sums* over completion tokens (see :func:`sequence_logprobs`); the reference ones may be precomputed.

Notation (per row): log-ratios :math:`u_c = \\log\\pi_\\theta(y_c) - \\log\\pi_\\text{ref}(y_c)`,
:math:`u_r` likewise; f-divergence scores :math:`s_c = f(u_c)`, :math:`s_r = f(u_r)`;
:math:`\\Delta = s_c - s_r`. Implicit rewards are always :math:`\\beta u_c, \\beta u_r`
(stop-gradient), as TRL logs them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.ops._util import check_rank, check_same_shape, compute_dtype

DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm",
)  # fmt: skip
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
_LENGTH_NORMALISED = ("ipo", "sigmoid_norm")
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop")
_ALPHA_EXP_CLAMP = 80.0  # TRL's clamp for float32/bfloat16 before exp

log_sigmoid = jax.nn.log_sigmoid


def f_divergence_scores(logratios: jax.Array, *, f_divergence: str, alpha: float = 0.5) -> jax.Array:
    r"""Per-sequence score f(u) of a log-ratio u for f-DPO (Wang et al. 2023, "Beyond Reverse KL").

    Exactly TRL 1.16's ``f'(t)`` at :math:`t = e^u` (constants included: they cancel in the
    chosen − rejected difference but not in the length-normalised ``ipo``/``sigmoid_norm``):
    reverse_kl: u; forward_kl: :math:`1 - e^{-u}`; js_divergence: :math:`\log 2 + \log\sigma(u)`;
    alpha_divergence: :math:`(e^{(\alpha-1)u} - 1)/(\alpha-1)` with the exponent clamped at 80
    (reverse_kl when |α − 1| < 1e-6).
    """
    if f_divergence == "reverse_kl":
        return logratios
    if f_divergence == "forward_kl":
        return 1.0 - jnp.exp(-logratios)
    if f_divergence == "js_divergence":
        return jnp.log(2.0) + log_sigmoid(logratios)
    if f_divergence == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        t = jnp.minimum((alpha - 1.0) * logratios, _ALPHA_EXP_CLAMP)
        return (jnp.exp(t) - 1.0) / (alpha - 1.0)
    raise ValueError(f"rlhf_jax.ops.dpo_loss: unknown f_divergence {f_divergence!r}; expected {F_DIVERGENCES}")


def _smoothed_sigmoid(x: jax.Array, eps: float) -> jax.Array:
    return -log_sigmoid(x) * (1 - eps) - log_sigmoid(-x) * eps


def dpo_loss(
    policy_chosen_logps_B: jax.Array,
    policy_rejected_logps_B: jax.Array,
    ref_chosen_logps_B: jax.Array,
    ref_rejected_logps_B: jax.Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths_B: jax.Array | None = None,
    rejected_lengths_B: jax.Array | None = None,
    f_divergence: str = "reverse_kl",
    alpha: float = 0.5,
    discopop_tau: float = 0.05,
    bco_delta: float | jax.Array = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""Per-pair losses of the DPO family and the implicit rewards, as TRL ``DPOTrainer``.

    With :math:`\Delta = s_c - s_r` (module docstring), ε = ``label_smoothing``, x = βΔ:

    - sigmoid (Rafailov et al. 2023): :math:`-(1-\epsilon)\log\sigma(x) - \epsilon\log\sigma(-x)`
      (ε > 0 is cDPO; ε = 0 is TRL 1.x's sigmoid exactly).
    - hinge (SLiC, Zhao et al. 2023): :math:`\mathrm{relu}(1 - x)`.
    - ipo (Azar et al. 2023, Eq. 17, length-normalised as TRL): :math:`(s_c/|y_c| - s_r/|y_r| - 1/(2\beta))^2`.
    - exo_pair (Ji et al. 2024, Eq. 16): :math:`\sigma(x)(\log\sigma(x) - \log(1-\epsilon)) +
      \sigma(-x)(\log\sigma(-x) - \log\epsilon)`; ε = 0 is replaced by 1e-3 as TRL (0.x) does.
    - nca_pair (Chen et al. 2024):
      :math:`-\log\sigma(\beta s_c) - \tfrac12\log\sigma(-\beta s_c) - \tfrac12\log\sigma(-\beta s_r)`.
    - robust (Chowdhury et al. 2024): :math:`(-(1-\epsilon)\log\sigma(x) + \epsilon\log\sigma(-x))/(1-2\epsilon)`.
    - bco_pair (Jung et al. 2024): :math:`-\log\sigma(\beta s_c - \delta) - \log\sigma(-(\beta s_r - \delta))`.
      TRL ≤ 0.x subtracts δ = a running mean of mean(βu_c, βu_r) kept across steps
      (``RunningMoments``); TRL 1.x uses δ = 0. Pass the running mean as ``bco_delta`` (default 0).
    - sppo_hard (Wu et al. 2024): :math:`(s_c - \tfrac{1}{2\beta})^2 + (s_r + \tfrac{1}{2\beta})^2`.
    - aot (Melnyk et al. 2024), *couples the batch*: d = sort_B(π_c − π_r) − sort_B(ref_c − ref_r)
      (raw log-probs, no f-divergence); loss = smoothed sigmoid of βd.
    - aot_unpaired, *couples the batch*: d = sort_B(u_c) − sort_B(u_r); smoothed sigmoid of βd.
    - apo_zero (D'Oosterlinck et al. 2024, Eq. 7): :math:`1 - \sigma(\beta u_c) + \sigma(\beta u_r)`.
    - apo_down (Eq. 8): :math:`\sigma(\beta u_c) + 1 - \sigma(x)`.
    - discopop (Lu et al. 2024, Eq. 5): with w = σ(x/τ): :math:`-\log\sigma(x)(1-w) + e^{-x} w`.
    - sigmoid_norm (TRL 1.x): :math:`-\log\sigma(\beta(s_c/|y_c| - s_r/|y_r|))`.

    Lengths (completion token counts, clamped at ≥ 1) are required by ``ipo`` and ``sigmoid_norm``.

    Args:
      policy_chosen_logps_B, policy_rejected_logps_B: policy log-prob sums.
      ref_chosen_logps_B, ref_rejected_logps_B: reference log-prob sums.
      beta: β (IPO's τ).
      loss_type: one of ``DPO_LOSS_TYPES``.
      label_smoothing: ε for sigmoid/robust/exo_pair/aot/aot_unpaired.
      chosen_lengths_B, rejected_lengths_B: completion lengths (ipo, sigmoid_norm).
      f_divergence: one of ``F_DIVERGENCES`` (TRL ``f_divergence_type``).
      alpha: α of the alpha divergence (TRL ``f_alpha_divergence_coef``).
      discopop_tau: τ of DiscoPOP (TRL default 0.05).
      bco_delta: δ of bco_pair (see above).

    Returns:
      ``(losses_B, chosen_rewards_B, rejected_rewards_B)``; the trainer's loss is ``mean(losses_B)``.
    """
    name = "dpo_loss"
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"rlhf_jax.ops.dpo_loss: unknown loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    if f_divergence != "reverse_kl" and loss_type not in F_DIVERGENCE_LOSS_TYPES:
        raise ValueError(
            f"rlhf_jax.ops.dpo_loss: f_divergence={f_divergence!r} is only defined for {F_DIVERGENCE_LOSS_TYPES} "
            f"(as in TRL 1.16: the f-DPO log Z term cancels only in the chosen - rejected difference); "
            f"got loss_type={loss_type!r}"
        )
    check_rank(name, "policy_chosen_logps_B", policy_chosen_logps_B, 1)
    check_same_shape(
        name,
        policy_chosen_logps_B=policy_chosen_logps_B,
        policy_rejected_logps_B=policy_rejected_logps_B,
        ref_chosen_logps_B=ref_chosen_logps_B,
        ref_rejected_logps_B=ref_rejected_logps_B,
    )
    dtype = compute_dtype(policy_chosen_logps_B, policy_rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    pc, pr, rc, rr = (
        a.astype(dtype)
        for a in (policy_chosen_logps_B, policy_rejected_logps_B, ref_chosen_logps_B, ref_rejected_logps_B)
    )
    u_c, u_r = pc - rc, pr - rr
    s_c = f_divergence_scores(u_c, f_divergence=f_divergence, alpha=alpha)
    s_r = f_divergence_scores(u_r, f_divergence=f_divergence, alpha=alpha)
    delta = s_c - s_r
    x = beta * delta
    eps = label_smoothing

    if loss_type in _LENGTH_NORMALISED:
        if chosen_lengths_B is None or rejected_lengths_B is None:
            raise ValueError(
                f"rlhf_jax.ops.dpo_loss: loss_type={loss_type!r} needs chosen_lengths_B and rejected_lengths_B"
            )
        check_same_shape(
            name, policy_chosen_logps_B=pc, chosen_lengths_B=chosen_lengths_B, rejected_lengths_B=rejected_lengths_B
        )
        avg_delta = s_c / jnp.maximum(chosen_lengths_B.astype(dtype), 1.0) - s_r / jnp.maximum(
            rejected_lengths_B.astype(dtype), 1.0
        )

    if loss_type == "sigmoid":
        losses = _smoothed_sigmoid(x, eps)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1 - x)
    elif loss_type == "ipo":
        losses = jnp.square(avg_delta - 1 / (2 * beta))
    elif loss_type == "exo_pair":
        if not 0 < eps < 1:  # TRL 1.16 raises at 0 (the EXO paper recommends 1e-3)
            raise ValueError(f"rlhf_jax.ops.dpo_loss: exo_pair needs 0 < label_smoothing < 1, got {eps}")
        losses = jax.nn.sigmoid(x) * (log_sigmoid(x) - jnp.log1p(-eps)) + jax.nn.sigmoid(-x) * (
            log_sigmoid(-x) - jnp.log(eps)
        )
    elif loss_type == "nca_pair":
        cr, rj = beta * u_c, beta * u_r
        losses = -log_sigmoid(cr) - 0.5 * log_sigmoid(-cr) - 0.5 * log_sigmoid(-rj)
    elif loss_type == "robust":
        if not 0 <= eps < 0.5:
            raise ValueError(f"rlhf_jax.ops.dpo_loss: robust needs 0 <= label_smoothing < 0.5, got {eps}")
        losses = (-(1 - eps) * log_sigmoid(x) + eps * log_sigmoid(-x)) / (1 - 2 * eps)
    elif loss_type == "bco_pair":
        d = jnp.asarray(bco_delta, dtype)
        losses = -log_sigmoid(beta * u_c - d) - log_sigmoid(-(beta * u_r - d))
    elif loss_type == "sppo_hard":
        losses = jnp.square(u_c - 0.5 / beta) + jnp.square(u_r + 0.5 / beta)
    elif loss_type == "aot":
        d = jnp.sort(pc - pr) - jnp.sort(rc - rr)
        losses = _smoothed_sigmoid(beta * d, eps)
    elif loss_type == "aot_unpaired":
        d = jnp.sort(u_c) - jnp.sort(u_r)
        losses = _smoothed_sigmoid(beta * d, eps)
    elif loss_type == "apo_zero":
        losses = 1 - jax.nn.sigmoid(beta * u_c) + jax.nn.sigmoid(beta * u_r)
    elif loss_type == "apo_down":
        losses = jax.nn.sigmoid(beta * u_c) + 1 - jax.nn.sigmoid(x)
    elif loss_type == "discopop":
        w = jax.nn.sigmoid(x / discopop_tau)
        losses = -log_sigmoid(x) * (1 - w) + jnp.exp(-x) * w
    else:  # sigmoid_norm
        losses = -log_sigmoid(beta * avg_delta)

    chosen_rewards = jax.lax.stop_gradient(beta * u_c)
    rejected_rewards = jax.lax.stop_gradient(beta * u_r)
    return losses, chosen_rewards, rejected_rewards
