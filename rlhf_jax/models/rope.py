"""Rotary position embeddings (RoPE), as in Hugging Face Llama/Mistral/Qwen.

Su et al. 2021, "RoFormer" (arXiv:2104.09864), in the "rotate_half" layout of
transformers `models/llama/modeling_llama.py` (`rotate_half`, `apply_rotary_pos_emb`): the head dimension
is split in two halves, not interleaved pairs.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """inv_freq_i = theta^(-2i/hd), i = 0..hd/2-1, then the configured scaling (float32, like HF).

    Scalings (transformers `modeling_rope_utils.py`):
      linear: inv_freq / factor (`_compute_linear_scaling_rope_parameters`).
      llama3: with wavelen = 2π / inv_freq, L = original_max_position_embeddings,
        wavelen > L / low_freq_factor  → inv_freq / factor;
        wavelen < L / high_freq_factor → inv_freq;
        otherwise (1 − s)·inv_freq/factor + s·inv_freq, s = (L / wavelen − low) / (high − low)
        (`_compute_llama3_parameters`, Llama 3.1 report).
    """
    hd = config.head_dim
    inv = (1.0 / (np.float32(config.rope_theta) ** (np.arange(0, hd, 2, dtype=np.int64).astype(np.float32) / hd)))
    inv = inv.astype(np.float32)
    s = config.rope_scaling_dict
    if config.rope_type == "linear":
        inv = inv / np.float32(s["factor"])
    elif config.rope_type == "llama3":
        factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_len = float(s["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def rope_tables(positions_BxS: jnp.ndarray, inv_freq: np.ndarray, dtype, *, bound: int | None = None
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape [B, S, hd]: angle = position · inv_freq, duplicated over the two halves.

    ``bound``: a static N with every position in [0, N) (positions the model derived from the attention mask
    are < S). Then cos and sin are computed once per position 0..N−1, ``table[n] = cos(n · inv_freq)``, and
    each row gathered: the same float32 angles, so the same values. Why: XLA:CPU fuses ``cos(angles)`` into
    every consumer, so it recomputed the transcendentals per layer, for q and k, in the forward and the
    backward, and once per head (``benchmarks/README.md``: the tiny PPO update's RoPE backward fusions took
    ~6 ms each). A gather's table operand is not fused, so it is computed once.
    """
    inv = jnp.asarray(inv_freq)
    if bound is None:
        angles_BxSxh = positions_BxS.astype(jnp.float32)[..., None] * inv
        angles_BxSxhd = jnp.concatenate([angles_BxSxh, angles_BxSxh], axis=-1)
        return jnp.cos(angles_BxSxhd).astype(dtype), jnp.sin(angles_BxSxhd).astype(dtype)
    angles_Nxh = jnp.arange(bound, dtype=jnp.float32)[:, None] * inv
    angles_Nxhd = jnp.concatenate([angles_Nxh, angles_Nxh], axis=-1)
    cos_Nxhd, sin_Nxhd = jnp.cos(angles_Nxhd).astype(dtype), jnp.sin(angles_Nxhd).astype(dtype)
    return (jnp.take(cos_Nxhd, positions_BxS, axis=0, mode="clip"),
            jnp.take(sin_Nxhd, positions_BxS, axis=0, mode="clip"))


def apply_rope(x_BxSxNxhd: jnp.ndarray, cos_BxSxhd: jnp.ndarray, sin_BxSxhd: jnp.ndarray) -> jnp.ndarray:
    """x·cos + rotate_half(x)·sin with rotate_half([a, b]) = [−b, a] (HF `apply_rotary_pos_emb`)."""
    half = x_BxSxNxhd.shape[-1] // 2
    x1, x2 = x_BxSxNxhd[..., :half], x_BxSxNxhd[..., half:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_BxSxNxhd * cos_BxSxhd[:, :, None, :] + rotated * sin_BxSxhd[:, :, None, :]
