"""Preference losses as plug-ins: DPO (every TRL loss type, f-divergences), SimPO, ORPO and KTO.

Pairs (prompt, chosen y_c, rejected y_r) are scored by ONE forward pass over the 2B rows chosen ++
rejected (``algos.preference_rows.completion_logps``: a row's log-prob is the sum of its completion tokens'
log-probs; each pair's prompt encoded once where ``prompt_width`` is given), then

* ``dpo``: ``ops.dpo_loss`` (Rafailov et al. 2023 and TRL 1.x's variants, ``loss_type``) on policy and
  reference sums; implicit rewards β(log π − log π_ref).
* ``simpo``: ``ops.simpo_loss`` on average log-probs, margin γ, no reference (Meng et al. 2024).
* ``orpo``: ``ops.orpo_loss``: chosen NLL (per-row token mean) + λ·odds-ratio term, no reference
  (Hong et al. 2024).
* ``kto``: ``ops.kto_loss`` on unpaired prompt/completion/label rows, with the reference point
  z₀ = max(0, mean over the (micro-)batch of log π − log π_ref on mismatched KL rows) (Ethayarajh et al.
  2024; TRL ``KTOTrainer``). Rows and KL rows share one forward pass.

TRL ``DPOConfig`` options (``dpo``): several loss types at once with ``loss_weights`` (e.g. MPO = sigmoid +
bco_pair + sft), ``rpo_alpha`` (+ α·token-mean NLL of the chosen completions), ``use_weighting`` (WPO),
``ld_alpha`` (LD-DPO; the reference gets the same weighting): the per-token forward
(:func:`completion_terms`) then ``ops.dpo_loss`` with ``ops.dpo_options``. The ``sft`` term is a token mean
over the (micro-)batch's chosen completions, as TRL per device step. ``kto_kl_pairs: batch`` (KTO) and
``orpo_sft: trl`` (ORPO) follow TRL's KL rows and NLL.

Each loss returns ``((loss_sum, count), PrefAux)``: the mean over real pairs (rows) is exact under
gradient accumulation and data parallelism (``train.step``). The reference log-probs travel in the batch
(:class:`PairBatch`, :class:`KTOBatch`), filled by ``rlhf_jax.train.reference``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from rlhf_jax import ops
from rlhf_jax.config import require
from rlhf_jax.algos.preference_rows import (CompletionTerms, KTOBatch, PairBatch, completion_logps, completion_terms,
                                            completion_token_logps, stacked_rows)
from rlhf_jax.models import lora


ALGORITHMS = ("dpo", "simpo", "orpo", "kto")


_WITH_REFERENCE = ("dpo", "kto")


@dataclasses.dataclass(frozen=True)
class PreferenceLossConfig:
    """Which preference loss and its hyperparameters (names as TRL's configs)."""

    algorithm: Literal["dpo", "simpo", "orpo", "kto"] = "dpo"
    # dpo: one of ops.DPO_LOSS_TYPES (null = sigmoid) or a list of ops.DPO_COMBINABLE_LOSS_TYPES (TRL: e.g. MPO =
    # [sigmoid, bco_pair, sft]); kto: kto | apo_zero_unpaired
    loss_type: Union[str, tuple[str, ...], None] = None
    loss_weights: Optional[tuple[float, ...]] = None  # dpo: one weight per loss_type entry (null = all 1), as TRL
    rpo_alpha: Optional[float] = None  # dpo: + rpo_alpha x token-mean NLL of the chosen completions (RPO; TRL 0.x)
    use_weighting: bool = False  # dpo: WPO per-pair weights (Zhou et al. 2024), as TRL
    ld_alpha: Optional[float] = None  # dpo: LD-DPO weight in [0, 1] of tokens past the pair's shared length, as TRL
    beta: float = 0.1  # β (DPO/KTO/SimPO temperature; IPO τ; ORPO λ)
    label_smoothing: float = 0.0  # ε: cDPO / robust / exo_pair / aot; SimPO's smoothing
    f_divergence: str = "reverse_kl"  # dpo: reverse_kl | forward_kl | js_divergence | alpha_divergence
    f_alpha: float = 0.5  # α of alpha_divergence
    discopop_tau: float = 0.05  # τ of discopop
    simpo_gamma: float = 0.5  # SimPO target margin γ (TRL CPOConfig.simpo_gamma)
    desirable_weight: float = 1.0  # KTO λ_D
    undesirable_weight: float = 1.0  # KTO λ_U
    # KTO's mismatched KL rows: "dataset" = row i with the completion of row i+1 (precomputable); "batch" = TRL's
    # rotation by one within the (global) batch, so the KL completions are the batch's own (live reference only)
    kto_kl_pairs: Literal["dataset", "batch"] = "dataset"
    # ORPO's SFT term: "row_mean" = per-row token mean of the chosen completion, averaged over pairs; "trl" = TRL
    # ORPOTrainer's: one token mean over every prompt AND completion token of the batch's chosen sequences
    orpo_sft: Literal["row_mean", "trl"] = "row_mean"

    def __post_init__(self):
        require(self.beta > 0, "loss.beta", f"must be > 0, got {self.beta}")
        if isinstance(self.loss_type, str) and ("," in self.loss_type or self.loss_type.startswith("[")):
            # a command-line list (loss.loss_type=[sigmoid,sft]) arrives as text
            object.__setattr__(self, "loss_type", tuple(t.strip() for t in self.loss_type.strip("[]").split(",")))
        self._check_dpo_options()
        require(self.kto_kl_pairs == "dataset" or self.algorithm == "kto", "loss.kto_kl_pairs",
                f"applies to algorithm=kto, not {self.algorithm}")
        require(self.orpo_sft == "row_mean" or self.algorithm == "orpo", "loss.orpo_sft",
                f"applies to algorithm=orpo, not {self.algorithm}")
        if self.algorithm == "dpo":
            require(self.loss_type is None or isinstance(self.loss_type, tuple)
                    or self.loss_type in ops.DPO_LOSS_TYPES, "loss.loss_type",
                    f"dpo loss_type must be one of {ops.DPO_LOSS_TYPES}, got {self.loss_type!r}")
        elif self.algorithm == "kto":
            require(self.loss_type is None or self.loss_type in ops.KTO_LOSS_TYPES, "loss.loss_type",
                    f"kto loss_type must be one of {ops.KTO_LOSS_TYPES}, got {self.loss_type!r}")
        else:
            require(self.loss_type is None, "loss.loss_type", f"{self.algorithm} has no loss_type; set null")
        require(self.f_divergence in ops.F_DIVERGENCES, "loss.f_divergence",
                f"must be one of {ops.F_DIVERGENCES}, got {self.f_divergence!r}")
        types = self.dpo_loss_types if self.algorithm == "dpo" else ()
        require(self.f_divergence == "reverse_kl" or (
            self.algorithm == "dpo" and set(types) <= {*ops.F_DIVERGENCE_LOSS_TYPES, "sft"}), "loss.f_divergence",
            f"applies to algorithm=dpo with loss_type in {ops.F_DIVERGENCE_LOSS_TYPES} only (as TRL 1.16)")
        require(0 <= self.label_smoothing < 1, "loss.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")
        require("exo_pair" not in types or self.label_smoothing > 0, "loss.label_smoothing",
                "exo_pair needs label_smoothing > 0 (the EXO paper uses 1e-3)")
        require("robust" not in types or self.label_smoothing < 0.5, "loss.label_smoothing",
                "robust needs label_smoothing < 0.5")

    def _check_dpo_options(self):
        listed = isinstance(self.loss_type, tuple)
        options = {"loss.loss_type": listed, "loss.loss_weights": self.loss_weights is not None,
                   "loss.rpo_alpha": self.rpo_alpha is not None, "loss.use_weighting": self.use_weighting,
                   "loss.ld_alpha": self.ld_alpha is not None}
        for key, used in options.items():
            require(not used or self.algorithm == "dpo", key,
                    f"(a list, or this option) is DPO-only (TRL DPOConfig); algorithm is {self.algorithm}")
        if listed:
            require(len(self.loss_type) >= 1, "loss.loss_type", "lists no loss")
            bad = [t for t in self.loss_type if t not in ops.DPO_COMBINABLE_LOSS_TYPES]
            require(not bad, "loss.loss_type", f"unknown {bad}; each must be one of {ops.DPO_COMBINABLE_LOSS_TYPES}")
        if self.loss_weights is not None:
            n = len(self.loss_type) if listed else 1
            require(len(self.loss_weights) == n, "loss.loss_weights",
                    f"needs one weight per loss_type entry ({n}), got {len(self.loss_weights)}")
        require(self.rpo_alpha is None or self.rpo_alpha >= 0, "loss.rpo_alpha", f"must be >= 0, got {self.rpo_alpha}")
        require(self.ld_alpha is None or 0 <= self.ld_alpha <= 1, "loss.ld_alpha",
                f"must be in [0, 1], got {self.ld_alpha}")
        require(not self.use_weighting or not {"aot", "aot_unpaired"} & set(self.dpo_loss_types), "loss.use_weighting",
                "WPO weights are not defined for aot/aot_unpaired (they sort the batch; TRL raises too)")

    @property
    def dpo_loss_types(self) -> tuple[str, ...]:
        """DPO loss types in effect, ``sft`` appended for ``rpo_alpha``."""
        lt = self.loss_type or "sigmoid"
        types = (lt,) if isinstance(lt, str) else tuple(lt)
        return types + (("sft",) if self.rpo_alpha is not None else ())

    @property
    def dpo_loss_weights(self) -> Optional[tuple[float, ...]]:
        """Weights matching :attr:`dpo_loss_types` (None: a single unweighted loss)."""
        if self.loss_weights is None and self.rpo_alpha is None:
            return None
        base = self.loss_weights or (1.0,) * (len(self.dpo_loss_types) - (self.rpo_alpha is not None))
        return tuple(base) + ((self.rpo_alpha,) if self.rpo_alpha is not None else ())

    @property
    def dpo_options(self) -> bool:
        """True when any TRL option beyond one loss type is on (the per-token forward path is needed)."""
        return self.algorithm == "dpo" and (isinstance(self.loss_type, tuple) or self.rpo_alpha is not None
                                            or self.loss_weights is not None or self.use_weighting
                                            or self.ld_alpha is not None)

    @property
    def resolved_loss_type(self) -> Optional[str]:
        """The loss type in effect (defaults: sigmoid for dpo, kto for kto, None otherwise)."""
        if isinstance(self.loss_type, tuple):
            return "+".join(self.loss_type)
        return self.loss_type or {"dpo": "sigmoid", "kto": "kto"}.get(self.algorithm)

    @property
    def needs_reference(self) -> bool:
        return self.algorithm in _WITH_REFERENCE


class PrefAux(NamedTuple):
    """Sums over the real pairs (KTO: rows; chosen = desirable, rejected = undesirable) of a batch."""

    pairs: jax.Array
    chosen_n: jax.Array
    rejected_n: jax.Array
    correct: jax.Array  # pairs with r_c > r_r (0 for KTO)
    chosen_reward: jax.Array
    rejected_reward: jax.Array
    chosen_logp: jax.Array
    rejected_logp: jax.Array
    kl: jax.Array  # KTO: z0 x rows (so the sum over micro-batches divides by rows)


def _sum_where(valid_B, x_B) -> jax.Array:
    return jnp.sum(jnp.where(valid_B, x_B, 0.0))


def _option_kwargs(loss: PreferenceLossConfig, terms: Optional[CompletionTerms], valid, nc, nr) -> dict:
    """`ops.dpo_loss` keyword arguments of the TRL options (several loss types, sft / rpo_alpha, WPO)."""
    if not loss.dpo_options:
        return {"loss_type": loss.resolved_loss_type}
    if terms is None:
        raise ValueError(f"pair_loss_from_logps: loss {loss.dpo_loss_types} needs the CompletionTerms (terms=)")
    b = nc.shape[0]
    kw = {"loss_type": loss.dpo_loss_types, "loss_weights": loss.dpo_loss_weights}
    if "sft" in loss.dpo_loss_types:  # token mean over the real chosen completions of this (micro-)batch
        kw["sft_nll"] = ops.sft_nll_from_sums(jnp.where(valid, terms.raw_logp_2B[:b], 0.0), jnp.where(valid, nc, 0.0))
    if loss.use_weighting:
        kw["weights_B"] = ops.wpo_weights(terms.aligned_2B[:b], terms.aligned_2B[b:], nc, nr)
    return kw


def pair_loss_from_logps(logp_2B, n_2B, batch: PairBatch, *, loss: PreferenceLossConfig,
                         terms: Optional[CompletionTerms] = None, sft_nll: Optional[jax.Array] = None):
    """`((loss_sum, pairs), PrefAux)` of a DPO-family / SimPO / ORPO loss given the policy's completion
    log-prob sums `logp_2B` and token counts `n_2B` of the rows chosen ++ rejected (`terms`: what the TRL
    options read, from :func:`completion_terms`; `sft_nll`: ORPO's batch NLL with ``orpo_sft: trl``)."""
    b = logp_2B.shape[0] // 2
    lc, lr, nc, nr = logp_2B[:b], logp_2B[b:], n_2B[:b], n_2B[b:]
    valid = (nc > 0) & (nr > 0)
    if loss.algorithm == "dpo":
        losses, rc, rr = ops.dpo_loss(
            lc, lr, batch.ref_chosen_logps_B, batch.ref_rejected_logps_B, beta=loss.beta,
            label_smoothing=loss.label_smoothing, chosen_lengths_B=nc,
            rejected_lengths_B=nr, f_divergence=loss.f_divergence, alpha=loss.f_alpha,
            discopop_tau=loss.discopop_tau, **_option_kwargs(loss, terms, valid, nc, nr))
    else:
        avg_c, avg_r = lc / jnp.maximum(nc, 1.0), lr / jnp.maximum(nr, 1.0)
        if loss.algorithm == "simpo":
            losses, rc, rr = ops.simpo_loss(avg_c, avg_r, beta=loss.beta, gamma=loss.simpo_gamma,
                                            label_smoothing=loss.label_smoothing)
        elif loss.algorithm == "orpo" and loss.orpo_sft == "trl":
            if sft_nll is None:
                raise ValueError("pair_loss_from_logps: loss.orpo_sft=trl needs sft_nll (see orpo_trl_nll)")
            losses, rc, rr = ops.orpo_loss(avg_c, avg_r, beta=loss.beta)
            losses = losses + sft_nll
        elif loss.algorithm == "orpo":
            losses, rc, rr = ops.orpo_loss(avg_c, avg_r, beta=loss.beta, chosen_nll_B=-avg_c)
        else:
            raise ValueError(f"pair_loss: algorithm {loss.algorithm!r} does not take pairs")
    v = valid.astype(jnp.float32)
    pairs = jnp.sum(v)
    aux = PrefAux(pairs=pairs, chosen_n=pairs, rejected_n=pairs, correct=jnp.sum(v * (rc > rr)),
                  chosen_reward=_sum_where(valid, rc), rejected_reward=_sum_where(valid, rr),
                  chosen_logp=_sum_where(valid, lc), rejected_logp=_sum_where(valid, lr), kl=jnp.zeros(()))
    return (_sum_where(valid, losses), pairs), aux


def kto_loss_from_logps(logp_2B, n_2B, batch: KTOBatch, *, loss: PreferenceLossConfig):
    """`((loss_sum, rows), PrefAux)` of KTO given the policy's sums/counts of the rows ++ KL rows."""
    b = logp_2B.shape[0] // 2
    lp, lp_kl, n, n_kl = logp_2B[:b], logp_2B[b:], n_2B[:b], n_2B[b:]
    valid = n > 0
    kl = jnp.zeros((), jnp.float32)
    if loss.resolved_loss_type == "kto":  # ops.kto_kl_baseline, restricted to real KL rows
        kl = jax.lax.stop_gradient(jnp.maximum(ops.masked_mean(lp_kl - batch.ref_kl_logps_B, n_kl > 0), 0.0))
    losses, rewards = ops.kto_loss(lp, batch.ref_logps_B, batch.rows.label_B, kl=kl, beta=loss.beta,
                                   desirable_weight=loss.desirable_weight,
                                   undesirable_weight=loss.undesirable_weight, loss_type=loss.resolved_loss_type)
    good, bad = valid & (batch.rows.label_B != 0), valid & (batch.rows.label_B == 0)
    rows = jnp.sum(valid.astype(jnp.float32))
    aux = PrefAux(pairs=rows, chosen_n=jnp.sum(good.astype(jnp.float32)), rejected_n=jnp.sum(bad.astype(jnp.float32)),
                  correct=jnp.zeros(()), chosen_reward=_sum_where(good, rewards),
                  rejected_reward=_sum_where(bad, rewards), chosen_logp=_sum_where(good, lp),
                  rejected_logp=_sum_where(bad, lp), kl=kl * rows)
    return (_sum_where(valid, losses), rows), aux


def orpo_trl_nll(logp_2BxT: jax.Array, target_mask_2BxT: jax.Array, n_2B: jax.Array) -> jax.Array:
    """TRL ``ORPOTrainer``'s NLL: one token mean over every attended (prompt and completion) next token of the
    chosen sequences of real pairs (``ops.sft_nll``; the first half of the rows is chosen)."""
    b = logp_2BxT.shape[0] // 2
    valid = (n_2B[:b] > 0) & (n_2B[b:] > 0)
    return ops.sft_nll(logp_2BxT[:b], target_mask_2BxT[:b] * valid[:, None].astype(target_mask_2BxT.dtype))


def make_loss_fn(model, loss: PreferenceLossConfig, *, completion_width: Optional[int] = None,
                 prompt_width: Optional[int | str] = None):
    """`(params, batch, key) -> ((loss_sum, count), PrefAux)` for `loss.algorithm`: one forward pass over
    the 2B stacked rows, then `pair_loss_from_logps` / `kto_loss_from_logps`. ``completion_width``: the LM
    head runs on that many positions per row (:func:`completion_logps`); ``prompt_width``: pairs encode their
    prompt once (:func:`completion_token_logps`; KTO's rows with their KL rows, which share it)."""
    from_logps = kto_loss_from_logps if loss.algorithm == "kto" else pair_loss_from_logps

    def loss_fn(params, batch, key):
        net = lora.training(model, key)  # LoRA dropout in training forwards; key None (evaluation): none
        if loss.algorithm == "orpo" and loss.orpo_sft == "trl":  # every position: the prompt is in TRL's NLL
            ids, mask, lmask = stacked_rows(batch)
            logp_BxT, m_BxT, _ = completion_token_logps(net, params, ids, mask, lmask)
            n_2B = jnp.sum(m_BxT, axis=1).astype(jnp.float32)
            return pair_loss_from_logps(ops.sequence_logprobs(logp_BxT, m_BxT), n_2B, batch, loss=loss,
                                        sft_nll=orpo_trl_nll(logp_BxT, mask[:, 1:], n_2B))
        if loss.dpo_options:
            terms = completion_terms(net, params, *stacked_rows(batch), completion_width=completion_width,
                                     ld_alpha=loss.ld_alpha, use_weighting=loss.use_weighting,
                                     prompt_width=prompt_width)
            return pair_loss_from_logps(terms.logp_2B, terms.n_2B, batch, loss=loss, terms=terms)
        logp_2B, n_2B = completion_logps(net, params, *stacked_rows(batch), completion_width=completion_width,
                                         prompt_width=prompt_width)
        return from_logps(logp_2B, n_2B, batch, loss=loss)

    return loss_fn


def preference_metrics(loss_sum: float, aux: PrefAux, *, kto: bool) -> dict[str, float]:
    """Host metrics from summed `PrefAux` (TRL names without the slash prefixes)."""
    n = max(float(aux.pairs), 1.0)
    nc, nr = max(float(aux.chosen_n), 1.0), max(float(aux.rejected_n), 1.0)
    chosen, rejected = float(aux.chosen_reward) / nc, float(aux.rejected_reward) / nr
    out = {"loss": float(loss_sum) / n, "rewards_chosen": chosen, "rewards_rejected": rejected,
           "rewards_margin": chosen - rejected, "logps_chosen": float(aux.chosen_logp) / nc,
           "logps_rejected": float(aux.rejected_logp) / nr, "pairs": float(aux.pairs)}
    if kto:
        out["kl"] = float(aux.kl) / n
    else:
        out["rewards_accuracy"] = float(aux.correct) / n
    return out
