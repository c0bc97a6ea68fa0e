"""Jitted sampler: prefill + KV-cache decode in one `lax.while_loop`, temperature/top-k/top-p,
log-probs that match the trainer, bucketed prompt lengths; the hybrid-engine inference layout of the actor."""

from rlhf_jax.rollout.bucketing import DEFAULT_BUCKETS, bucket_length, pad_prompts
from rlhf_jax.rollout.decode import generate, lower_generate
from rlhf_jax.rollout.layout import (ROLLOUT_PARAM_RULES, bytes_per_device, inference_layout, inference_rules,
                                     reshard_for_inference)
from rlhf_jax.rollout.sampling import apply_top_k, apply_top_p, inverse_cdf_sample, sample_step
from rlhf_jax.rollout.types import Rollout, logprob_temperature, response_logits

__all__ = [
    "DEFAULT_BUCKETS",
    "ROLLOUT_PARAM_RULES",
    "Rollout",
    "apply_top_k",
    "apply_top_p",
    "bucket_length",
    "bytes_per_device",
    "generate",
    "inference_layout",
    "inference_rules",
    "inverse_cdf_sample",
    "logprob_temperature",
    "lower_generate",
    "pad_prompts",
    "reshard_for_inference",
    "response_logits",
    "sample_step",
]

