"""Jitted sampler: prefill + KV-cache decode in one `lax.while_loop`, temperature/top-k/top-p,
log-probs that match the trainer; the hybrid-engine inference layout of the actor. Prompts are left-padded
to a few bucketed widths by `rlhf_jax.data` (`data.batching.pad_prompts` for ragged token lists)."""

from rlhf_jax.rollout.decode import generate, lower_generate
from rlhf_jax.rollout.layout import (ROLLOUT_PARAM_RULES, bytes_per_device, inference_layout, inference_rules,
                                     reshard_for_inference)
from rlhf_jax.rollout.sampling import apply_top_k, apply_top_p, inverse_cdf_sample, sample_step
from rlhf_jax.rollout.types import Rollout, logprob_temperature

__all__ = [
    "ROLLOUT_PARAM_RULES",
    "Rollout",
    "apply_top_k",
    "apply_top_p",
    "bytes_per_device",
    "generate",
    "inference_layout",
    "inference_rules",
    "inverse_cdf_sample",
    "logprob_temperature",
    "lower_generate",
    "reshard_for_inference",
    "sample_step",
]

