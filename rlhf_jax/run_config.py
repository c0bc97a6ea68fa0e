"""The two configs every trainer shares: the optimizer (`OptimConfig`) and the run (`RunConfig`).

Loaded, checked and dumped by the generic machinery in `rlhf_jax.config`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Literal, Optional

from rlhf_jax.config import ConfigError, require

__all__ = ["OptimConfig", "RunConfig"]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with global-norm clipping and a warmup + decay schedule (see `rlhf_jax.train.optim`)."""

    learning_rate: float = 1e-5  # peak learning rate, reached after `warmup_steps`
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # shape after warmup
    warmup_steps: int = 0  # linear warmup from 0 to `learning_rate` (optimizer steps)
    min_lr_ratio: float = 0.0  # linear/cosine decay ends at `min_lr_ratio * learning_rate`
    weight_decay: float = 0.0  # decoupled (AdamW) decay, applied only where the decay mask is True
    b1: float = 0.9  # Adam first-moment decay
    b2: float = 0.999  # Adam second-moment decay
    eps: float = 1e-8  # Adam denominator epsilon
    max_grad_norm: Optional[float] = 1.0  # clip by global norm before the update; null disables
    # Weight-decay mask policy: params of rank < 2 (biases, norm scales) never decay; params whose
    # '/'-joined path matches any of these regexes (case-insensitive) do not decay either (embeddings).
    no_decay_patterns: tuple[str, ...] = ("embed", "wte", "wpe", "norm", "bias")
    # LoRA+ (Hayou et al. 2024): with model.lora, every adapter B (`*_lora_b`) learns at lora_plus_ratio x
    # learning_rate, A and the heads at learning_rate. 1.0 = plain LoRA (the same optimizer, bit for bit); the
    # paper (and our measurement, README "Results") recommend 16. No effect on a full fine-tune (no B leaves).
    lora_plus_ratio: float = 1.0

    def __post_init__(self):
        require(math.isfinite(self.learning_rate) and self.learning_rate >= 0, "learning_rate",
                f"must be a finite number >= 0, got {self.learning_rate}")
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(0.0 <= self.b1 < 1.0, "b1", f"must be in [0, 1), got {self.b1}")
        require(0.0 <= self.b2 < 1.0, "b2", f"must be in [0, 1), got {self.b2}")
        require(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        require(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "max_grad_norm",
            f"must be > 0 or null, got {self.max_grad_norm}",
        )
        require(math.isfinite(self.lora_plus_ratio) and self.lora_plus_ratio > 0, "lora_plus_ratio",
                f"must be a finite number > 0, got {self.lora_plus_ratio}")
        for p in self.no_decay_patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError("no_decay_patterns", f"bad regex {p!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where a run writes, how long it lasts, and how it logs, checkpoints and resumes."""

    output_dir: str = "runs/default"  # metrics.jsonl, TensorBoard events, checkpoints/, config.yaml, plots
    seed: int = 0  # seeds params init, data shuffling and sampling
    total_steps: Optional[int] = None  # optimizer steps; null = run `epochs` passes over the data
    epochs: int = 1  # passes over the data (ignored when `total_steps` is set)
    log_every: int = 10  # log metrics every N steps
    eval_every: int = 0  # evaluate every N steps; 0 = only at the end
    save_every: int = 0  # checkpoint every N steps; 0 = only at the end
    keep_last_n: Optional[int] = 3  # keep the N most recent checkpoints; null keeps all
    keep_best_metric: Optional[str] = None  # also keep the best checkpoint by this logged metric
    keep_best_mode: Literal["min", "max"] = "min"  # whether smaller or larger `keep_best_metric` is better
    nan_policy: Literal["stop", "skip"] = "stop"  # on a non-finite loss/grad: stop, or skip the update
    max_nan_skips: int = 10  # with nan_policy=skip, stop after this many consecutive skipped steps
    resume: str = "auto"  # "auto": latest checkpoint in output_dir if any; "never"; or a checkpoint path
    progress: Literal["auto", "on", "off"] = "auto"  # tqdm bar; auto = only on a TTY and not under CI
    tensorboard: bool = True  # write TensorBoard event files under output_dir/tensorboard
    wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb`)
    wandb_project: str = "rlhf_jax"  # W&B project name
    preempt_grace_s: float = 30.0  # on SIGTERM/SIGINT: finish the step and checkpoint; exit unsaved past this
    allow_config_change: bool = False  # resume even if the saved config.yaml differs in a key that changes the math
    overwrite: bool = False  # with resume=never: clear a non-empty output_dir's run files instead of refusing

    def __post_init__(self):
        require(self.total_steps is None or self.total_steps >= 1, "total_steps", f"must be >= 1, got {self.total_steps}")
        require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        require(self.log_every >= 1, "log_every", f"must be >= 1, got {self.log_every}")
        require(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        require(self.save_every >= 0, "save_every", f"must be >= 0, got {self.save_every}")
        require(self.keep_last_n is None or self.keep_last_n >= 1, "keep_last_n", f"must be >= 1 or null, got {self.keep_last_n}")
        require(self.max_nan_skips >= 1, "max_nan_skips", f"must be >= 1, got {self.max_nan_skips}")
        require(bool(self.output_dir), "output_dir", "must not be empty")
        require(self.preempt_grace_s > 0, "preempt_grace_s", f"must be > 0, got {self.preempt_grace_s}")
        require(bool(self.resume), "resume", "must be 'auto', 'never' or a checkpoint path")

