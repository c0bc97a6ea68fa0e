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

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.ops._util import check_rank, check_same_shape, compute_dtype

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


class _Terms(NamedTuple):
    """What every per-loss function reads (notation of the module docstring), in the compute dtype."""

    pc: jax.Array  # policy chosen log-prob sums
    pr: jax.Array  # policy rejected
    rc: jax.Array  # reference chosen
    rr: jax.Array  # reference rejected
    u_c: jax.Array  # pc - rc
    u_r: jax.Array  # pr - rr
    x: jax.Array  # beta * (s_c - s_r)
    avg_delta: jax.Array | None  # s_c/|y_c| - s_r/|y_r| (only for _LENGTH_NORMALISED types)
    beta: float
    eps: float  # label_smoothing
    tau: float  # discopop_tau
    bco_delta: float | jax.Array
    dtype: jnp.dtype


def _sigmoid(t: _Terms) -> jax.Array:
    """-(1-ε)logσ(x) - ε logσ(-x): DPO (Rafailov et al. 2023); ε > 0 is cDPO; TRL "sigmoid"."""
    return _smoothed_sigmoid(t.x, t.eps)


def _hinge(t: _Terms) -> jax.Array:
    """relu(1 - x): SLiC (Zhao et al. 2023); TRL "hinge"."""
    return jax.nn.relu(1 - t.x)


def _ipo(t: _Terms) -> jax.Array:
    """(s_c/|y_c| - s_r/|y_r| - 1/(2β))²: IPO (Azar et al. 2023, Eq. 17), length-normalised as TRL "ipo"."""
    return jnp.square(t.avg_delta - 1 / (2 * t.beta))


def _exo_pair(t: _Terms) -> jax.Array:
    """σ(x)(logσ(x) - log(1-ε)) + σ(-x)(logσ(-x) - log ε): EXO (Ji et al. 2024, Eq. 16); TRL "exo_pair"."""
    eps = t.eps
    if not 0 < eps < 1:  # TRL 1.16 raises at 0 (the EXO paper recommends 1e-3)
        raise ValueError(f"rlhf_jax.ops.dpo_loss: exo_pair needs 0 < label_smoothing < 1, got {eps}")
    x = t.x
    return jax.nn.sigmoid(x) * (log_sigmoid(x) - jnp.log1p(-eps)) + jax.nn.sigmoid(-x) * (
        log_sigmoid(-x) - jnp.log(eps)
    )


def _nca_pair(t: _Terms) -> jax.Array:
    """-logσ(βu_c) - ½logσ(-βu_c) - ½logσ(-βu_r): NCA (Chen et al. 2024); TRL "nca_pair"."""
    cr, rj = t.beta * t.u_c, t.beta * t.u_r
    return -log_sigmoid(cr) - 0.5 * log_sigmoid(-cr) - 0.5 * log_sigmoid(-rj)


def _robust(t: _Terms) -> jax.Array:
    """(-(1-ε)logσ(x) + ε logσ(-x))/(1-2ε): robust DPO (Chowdhury et al. 2024); TRL "robust"."""
    eps = t.eps
    if not 0 <= eps < 0.5:
        raise ValueError(f"rlhf_jax.ops.dpo_loss: robust needs 0 <= label_smoothing < 0.5, got {eps}")
    return (-(1 - eps) * log_sigmoid(t.x) + eps * log_sigmoid(-t.x)) / (1 - 2 * eps)


def _bco_pair(t: _Terms) -> jax.Array:
    """-logσ(βu_c - δ) - logσ(-(βu_r - δ)): BCO (Jung et al. 2024); TRL "bco_pair" (δ = bco_delta)."""
    d = jnp.asarray(t.bco_delta, t.dtype)
    return -log_sigmoid(t.beta * t.u_c - d) - log_sigmoid(-(t.beta * t.u_r - d))


def _sppo_hard(t: _Terms) -> jax.Array:
    """(u_c - 1/(2β))² + (u_r + 1/(2β))²: SPPO (Wu et al. 2024); TRL "sppo_hard"."""
    return jnp.square(t.u_c - 0.5 / t.beta) + jnp.square(t.u_r + 0.5 / t.beta)


def _aot(t: _Terms) -> jax.Array:
    """Smoothed sigmoid of β(sort_B(π_c - π_r) - sort_B(ref_c - ref_r)): AOT (Melnyk et al. 2024); TRL "aot"."""
    d = jnp.sort(t.pc - t.pr) - jnp.sort(t.rc - t.rr)
    return _smoothed_sigmoid(t.beta * d, t.eps)


def _aot_unpaired(t: _Terms) -> jax.Array:
    """Smoothed sigmoid of β(sort_B(u_c) - sort_B(u_r)): AOT unpaired (Melnyk et al. 2024); TRL "aot_unpaired"."""
    d = jnp.sort(t.u_c) - jnp.sort(t.u_r)
    return _smoothed_sigmoid(t.beta * d, t.eps)


def _apo_zero(t: _Terms) -> jax.Array:
    """1 - σ(βu_c) + σ(βu_r): APO-zero (D'Oosterlinck et al. 2024, Eq. 7); TRL "apo_zero"."""
    return 1 - jax.nn.sigmoid(t.beta * t.u_c) + jax.nn.sigmoid(t.beta * t.u_r)


def _apo_down(t: _Terms) -> jax.Array:
    """σ(βu_c) + 1 - σ(x): APO-down (D'Oosterlinck et al. 2024, Eq. 8); TRL "apo_down"."""
    return jax.nn.sigmoid(t.beta * t.u_c) + 1 - jax.nn.sigmoid(t.x)


def _discopop(t: _Terms) -> jax.Array:
    """-logσ(x)(1 - w) + e^{-x} w, w = σ(x/τ): DiscoPOP (Lu et al. 2024, Eq. 5); TRL "discopop"."""
    w = jax.nn.sigmoid(t.x / t.tau)
    return -log_sigmoid(t.x) * (1 - w) + jnp.exp(-t.x) * w


def _sigmoid_norm(t: _Terms) -> jax.Array:
    """-logσ(β(s_c/|y_c| - s_r/|y_r|)): length-normalised DPO; TRL 1.x "sigmoid_norm"."""
    return -log_sigmoid(t.beta * t.avg_delta)


_DPO_LOSSES: dict[str, Callable[[_Terms], jax.Array]] = {
    "sigmoid": _sigmoid,
    "hinge": _hinge,
    "ipo": _ipo,
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "robust": _robust,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "sigmoid_norm": _sigmoid_norm,
}
DPO_LOSS_TYPES = tuple(_DPO_LOSSES)  # the table's keys, in TRL's order
#: what ``loss_type`` may list: the table plus TRL's ``sft`` (needs ``sft_nll``, see ``ops.dpo_options``)
DPO_COMBINABLE_LOSS_TYPES = (*DPO_LOSS_TYPES, "sft")


def _check_loss_args(loss_type: str, f_divergence: str) -> None:
    if loss_type not in DPO_COMBINABLE_LOSS_TYPES:
        raise ValueError(
            f"rlhf_jax.ops.dpo_loss: unknown loss_type {loss_type!r}; expected one of {DPO_COMBINABLE_LOSS_TYPES}")
    if f_divergence != "reverse_kl" and loss_type not in (*F_DIVERGENCE_LOSS_TYPES, "sft"):
        raise ValueError(
            f"rlhf_jax.ops.dpo_loss: f_divergence={f_divergence!r} is only defined for {F_DIVERGENCE_LOSS_TYPES} "
            f"(as in TRL 1.16: the f-DPO log Z term cancels only in the chosen - rejected difference); "
            f"got loss_type={loss_type!r}"
        )


def _avg_delta(loss_type, pc, s_c, s_r, chosen_lengths_B, rejected_lengths_B, dtype) -> jax.Array:
    """s_c/|y_c| - s_r/|y_r| with lengths clamped at >= 1 (for the _LENGTH_NORMALISED types)."""
    if chosen_lengths_B is None or rejected_lengths_B is None:
        raise ValueError(
            f"rlhf_jax.ops.dpo_loss: loss_type={loss_type!r} needs chosen_lengths_B and rejected_lengths_B"
        )
    check_same_shape(
        "dpo_loss", policy_chosen_logps_B=pc, chosen_lengths_B=chosen_lengths_B, rejected_lengths_B=rejected_lengths_B
    )
    return s_c / jnp.maximum(chosen_lengths_B.astype(dtype), 1.0) - s_r / jnp.maximum(
        rejected_lengths_B.astype(dtype), 1.0
    )


def dpo_loss(
    policy_chosen_logps_B: jax.Array,
    policy_rejected_logps_B: jax.Array,
    ref_chosen_logps_B: jax.Array,
    ref_rejected_logps_B: jax.Array,
    *,
    beta: float,
    loss_type: str | Sequence[str] = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths_B: jax.Array | None = None,
    rejected_lengths_B: jax.Array | None = None,
    f_divergence: str = "reverse_kl",
    alpha: float = 0.5,
    discopop_tau: float = 0.05,
    bco_delta: float | jax.Array = 0.0,
    loss_weights: Sequence[float] | None = None,
    sft_nll: jax.Array | None = None,
    weights_B: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""Per-pair losses of the DPO family and the implicit rewards, as TRL ``DPOTrainer``.

    With :math:`\Delta = s_c - s_r` (module docstring), ε = ``label_smoothing``, x = βΔ:

    - sigmoid (Rafailov et al. 2023): :math:`-(1-\epsilon)\log\sigma(x) - \epsilon\log\sigma(-x)`
      (ε > 0 is cDPO; ε = 0 is TRL 1.x's sigmoid exactly).
    - hinge (SLiC, Zhao et al. 2023): :math:`\mathrm{relu}(1 - x)`.
    - ipo (Azar et al. 2023, Eq. 17, length-normalised as TRL): :math:`(s_c/|y_c| - s_r/|y_r| - 1/(2\beta))^2`.
    - exo_pair (Ji et al. 2024, Eq. 16): :math:`\sigma(x)(\log\sigma(x) - \log(1-\epsilon)) +
      \sigma(-x)(\log\sigma(-x) - \log\epsilon)`; needs 0 < ε < 1 (TRL 1.16 raises at ε = 0; the paper uses 1e-3).
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

    Several loss types at once (TRL ``loss_type=[...]``, ``loss_weights``; e.g. MPO: sigmoid + bco_pair +
    sft): :math:`\ell_i = \sum_k w_k\,\ell^{(k)}_i` (weights default 1), where ``sft`` is the batch scalar
    ``sft_nll`` (``ops.dpo_options.sft_nll``) broadcast to every pair, as TRL. ``weights_B`` (WPO,
    ``ops.dpo_options.wpo_weights``) multiplies every term per pair, as TRL ``use_weighting``.

    Each loss is a small function in ``_DPO_LOSSES`` (its docstring: equation and source).
    Lengths (completion token counts, clamped at ≥ 1) are required by ``ipo`` and ``sigmoid_norm``.

    Args:
      policy_chosen_logps_B, policy_rejected_logps_B: policy log-prob sums.
      ref_chosen_logps_B, ref_rejected_logps_B: reference log-prob sums.
      beta: β (IPO's τ).
      loss_type: one of ``DPO_LOSS_TYPES``, or a sequence of ``DPO_COMBINABLE_LOSS_TYPES``.
      label_smoothing: ε for sigmoid/robust/exo_pair/aot/aot_unpaired.
      chosen_lengths_B, rejected_lengths_B: completion lengths (ipo, sigmoid_norm).
      f_divergence: one of ``F_DIVERGENCES`` (TRL ``f_divergence_type``).
      alpha: α of the alpha divergence (TRL ``f_alpha_divergence_coef``).
      discopop_tau: τ of DiscoPOP (TRL default 0.05).
      bco_delta: δ of bco_pair (see above).
      loss_weights: one weight per loss type (TRL ``loss_weights``); None = all 1.
      sft_nll: scalar token-mean NLL of the chosen completions (needed when ``sft`` is listed).
      weights_B: per-pair WPO weights (stop-gradient); None = no weighting.

    Returns:
      ``(losses_B, chosen_rewards_B, rejected_rewards_B)``; the trainer's loss is ``mean(losses_B)``.
    """
    name = "dpo_loss"
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError("rlhf_jax.ops.dpo_loss: loss_type lists no loss")
    for lt in types:
        _check_loss_args(lt, f_divergence)
    if loss_weights is not None and len(loss_weights) != len(types):
        raise ValueError(f"rlhf_jax.ops.dpo_loss: loss_weights has {len(loss_weights)} entries for loss types {types}")
    if "sft" in types and sft_nll is None:
        raise ValueError("rlhf_jax.ops.dpo_loss: loss_type 'sft' needs sft_nll")
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
    x = beta * (s_c - s_r)
    avg_delta = None
    normed = [lt for lt in types if lt in _LENGTH_NORMALISED]
    if normed:
        avg_delta = _avg_delta(normed[0], pc, s_c, s_r, chosen_lengths_B, rejected_lengths_B, dtype)
    terms = _Terms(pc, pr, rc, rr, u_c, u_r, x, avg_delta, beta, label_smoothing, discopop_tau, bco_delta, dtype)
    if isinstance(loss_type, str) and loss_weights is None and weights_B is None:
        losses = _DPO_LOSSES[loss_type](terms)  # the single-loss path, unchanged
    else:
        if weights_B is not None:
            check_same_shape(name, policy_chosen_logps_B=pc, weights_B=weights_B)
        losses = jnp.zeros_like(pc)
        for k, lt in enumerate(types):
            term = jnp.broadcast_to(jnp.asarray(sft_nll, dtype), pc.shape) if lt == "sft" else _DPO_LOSSES[lt](terms)
            if weights_B is not None:
                term = term * jax.lax.stop_gradient(weights_B.astype(dtype))
            losses = losses + term * (1.0 if loss_weights is None else loss_weights[k])

    chosen_rewards = jax.lax.stop_gradient(beta * u_c)
    rejected_rewards = jax.lax.stop_gradient(beta * u_r)
    return losses, chosen_rewards, rejected_rewards
