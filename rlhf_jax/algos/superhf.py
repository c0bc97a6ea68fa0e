"""SuperHF's update (Mukobi et al. 2023): RAFT's SFT step on the reward-filtered samples plus a KL prior.

The fine-tuning loss per kept token is ``ops.kl_regularised_nll``: −log π_θ(y_t) + c·k_t(π_θ, π_ref),
aggregated like RAFT's SFT loss (``raft.loss_aggregation``), so exact under gradient accumulation and
data parallelism. The reference log-prob of each kept token is computed once per iteration by a frozen
copy of the starting policy (:func:`make_ref_scorer`, its params a `jit` argument) and travels in the
batch (:class:`SuperHFBatch`). Used by ``rlhf_jax.recipes.raft`` when ``raft.kl_coef`` > 0
(``algo.preset: superhf``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax import ops
from rlhf_jax import sharding as shd
from rlhf_jax.data import SFTBatch
from rlhf_jax.models import lora

#: SuperHF's published defaults (openfeedback/superhf, experiments/superhf/shf_iterative_v1/configs/default.yaml)
SUPERHF_KL_COEF = 0.35


class SuperHFBatch(NamedTuple):
    """Kept rows and the reference log-prob of each of their next tokens (``[B, S-1]``, 0 off the loss mask)."""

    sft: SFTBatch
    ref_logp_BxT: jax.Array


class SuperHFAux(NamedTuple):
    """Extra sums of one batch: rows, kept tokens, their NLL and KL-estimate sums."""

    sequences: jax.Array
    tokens: jax.Array
    nll: jax.Array
    kl: jax.Array


def _token_logps(model, params, sft: SFTBatch) -> tuple[jax.Array, jax.Array]:
    logits = model.apply({"params": params}, sft.input_ids_BxS, sft.attention_mask_BxS,
                         positions_BxS=sft.positions_BxS, segment_ids_BxS=sft.segment_ids_BxS)
    return ops.token_logprobs(logits[:, :-1], sft.input_ids_BxS[:, 1:]), sft.loss_mask_BxS[:, 1:]


def superhf_loss(model, params, batch: SuperHFBatch, key: jax.Array, *, kl_coef: float, kl_estimator: str = "k3",
                 mode: str = "token-mean"):
    """`((loss_sum, count), SuperHFAux)` of ``ops.kl_regularised_nll`` on the kept rows, aggregated by `mode`."""
    model = lora.training(model, key)  # LoRA dropout in this training forward (none for key None)
    logp, mask = _token_logps(model, params, batch.sft)
    loss_BxT, kl_BxT = ops.kl_regularised_nll(logp, batch.ref_logp_BxT, mask, kl_coef=kl_coef, kind=kl_estimator)
    loss_sum, count = ops.aggregate(loss_BxT, mask, mode=mode)
    m = mask > 0
    aux = SuperHFAux(sequences=jnp.sum(jnp.any(m, axis=1)).astype(jnp.float32),
                     tokens=jnp.sum(m).astype(jnp.float32), nll=-jnp.sum(jnp.where(m, logp, 0.0)),
                     kl=jnp.sum(kl_BxT))
    return (loss_sum, count), aux


def make_ref_scorer(model, *, mesh, params_shardings, compiler_options=None):
    """Jitted ``(ref_params, sft) -> SuperHFBatch``: the reference log-prob of every kept token (no gradient).
    ``compiler_options``: `runtime.xla.compiler_options`."""
    def attach(ref_params, sft: SFTBatch) -> SuperHFBatch:
        logp, mask = _token_logps(model, ref_params, sft)
        return SuperHFBatch(sft, jax.lax.stop_gradient(jnp.where(mask > 0, logp, 0.0)))

    bsh = shd.batch_sharding(mesh)
    return shd.jit_sharded(attach, mesh, in_shardings=(params_shardings, bsh), out_shardings=bsh,
                           compiler_options=compiler_options)


def superhf_metrics(aux: SuperHFAux, kl_coef: float) -> dict[str, float]:
    """Host metrics: token-mean NLL and KL estimate of the kept rows, and the KL term c·KL."""
    n = max(float(aux.tokens), 1.0)
    kl = float(aux.kl) / n
    return {"nll": float(aux.nll) / n, "kl": kl, "kl_term": kl_coef * kl}
