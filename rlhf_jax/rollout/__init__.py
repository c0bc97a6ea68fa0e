"""Jitted sampler: prefill + KV-cache decode in one `lax.while_loop`, temperature/top-k/top-p,
log-probs that match the trainer, bucketed prompt lengths."""

from rlhf_jax.rollout.bucketing import DEFAULT_BUCKETS, bucket_length, pad_prompts
from rlhf_jax.rollout.decode import generate
from rlhf_jax.rollout.sampling import apply_top_k, apply_top_p, inverse_cdf_sample, sample_step
from rlhf_jax.rollout.types import Rollout, logprob_temperature, response_logits

__all__ = [
    "DEFAULT_BUCKETS",
    "Rollout",
    "apply_top_k",
    "apply_top_p",
    "bucket_length",
    "generate",
    "inverse_cdf_sample",
    "logprob_temperature",
    "pad_prompts",
    "response_logits",
    "sample_step",
]

