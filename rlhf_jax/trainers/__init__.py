"""One short driver per algorithm (`sft`, `rm`, ...) over the shared pieces in `trainers.common`.

Each module defines a frozen config dataclass and `train(cfg) -> dict`; `rlhf_jax.cli.TRAINERS` registers it.
"""
