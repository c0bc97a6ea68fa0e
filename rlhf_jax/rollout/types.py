"""The `Rollout` pytree returned by the sampler (see README, "Contracts between layers")."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Rollout(NamedTuple):
    """Sampled responses for a batch of LEFT-padded prompts. Crosses `jit` as a plain pytree.

    Notation: B batch, P prompt length (a bucket), T = `max_new_tokens` (always, static), S = P + T.

    Attributes:
      prompt_ids_BxP: int32 prompt ids, left-padded exactly as given to `generate`.
      prompt_mask_BxP: int32, 1 on real prompt tokens, 0 on the left padding.
      response_ids_BxT: int32 sampled ids; `pad_token_id` after the first EOS (and after an early stop).
      response_mask_BxT: int32, 1 up to AND including the first EOS, 0 after it.
      logp_BxT: float32 log π(y_t | x, y_<t) of each sampled token under the temperature-scaled,
        untruncated distribution `log_softmax(logits / temperature)` (temperature 1 when greedy);
        0 where `response_mask_BxT` is 0. This is what the trainer recomputes with
        `ops.token_logprobs(logits / temperature, tokens)`, so the importance ratio
        π_θ / π_old compares the same distribution (see `rlhf_jax.rollout.sampling`).
      sampling_logp_BxT: float32 log-prob of each token under the distribution actually sampled from
        (after top-k / top-p truncation and EOS suppression); equals `logp_BxT` when nothing truncates;
        0 when greedy (a point mass) and on padding.
      lengths_B: int32 number of response tokens per row (= `response_mask_BxT.sum(-1)`, EOS included).
    """

    prompt_ids_BxP: jax.Array
    prompt_mask_BxP: jax.Array
    response_ids_BxT: jax.Array
    response_mask_BxT: jax.Array
    logp_BxT: jax.Array
    sampling_logp_BxT: jax.Array
    lengths_B: jax.Array

    @property
    def ids_BxS(self) -> jax.Array:
        """Prompt then response, `[B, P + T]`: what the trainer feeds back to the model."""
        return jnp.concatenate([self.prompt_ids_BxP, self.response_ids_BxT], axis=1)

    @property
    def mask_BxS(self) -> jax.Array:
        """Attention mask for `ids_BxS`: left padding and post-EOS padding are 0.

        The model's default positions `max(cumsum(mask) - 1, 0)` then give response token t the
        position `prompt_length + t`, the same position it had during sampling.
        """
        return jnp.concatenate([self.prompt_mask_BxP, self.response_mask_BxT], axis=1)

    @property
    def loss_mask_BxS(self) -> jax.Array:
        """1 on response tokens (targets), 0 on the prompt and padding; aligned with `ids_BxS`."""
        return jnp.concatenate([jnp.zeros_like(self.prompt_mask_BxP), self.response_mask_BxT], axis=1)

    @property
    def prompt_length(self) -> int:
        """P, the (static) padded prompt length."""
        return self.prompt_ids_BxP.shape[1]


def logprob_temperature(temperature: float) -> float:
    """The temperature the trainer divides logits by to recompute `Rollout.logp_BxT` (1 when greedy)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    return 1.0 if temperature == 0 else float(temperature)
