"""rlhf_jax: JAX-native RLHF (SFT, reward models, PPO and its critic-free cousins, the DPO family)."""

__version__ = "0.1.0"
