"""The online engine's configs, shared by every command that samples from the policy
(``ppo``, the critic-free family, ``raft``, ``online_dpo``, ``label``): how responses are sampled and
where their score comes from."""

from __future__ import annotations

import dataclasses
from typing import Optional

from rlhf_jax.config import require


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling of responses."""

    batch_size: int = 16  # GLOBAL prompts per iteration (one response each)
    max_new_tokens: int = 16  # T, static response length
    temperature: float = 1.0  # τ (log-probs in the loss use logits / τ, as the sampler)
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    min_new_tokens: int = 0
    # Mesh axes the actor's weights stay split over while sampling (the hybrid engine): ["tensor"] reshards
    # them once per iteration to tensor-parallel, replicated over data and fsdp, so the decode loop gathers no
    # weights (a copy of params/tensor bytes per device while sampling); ["fsdp", "tensor"] samples from the
    # training layout (no copy; weights gathered by the sampler). Nothing to do when mesh.fsdp = 1.
    param_axes: tuple[str, ...] = ("tensor",)
    # "out_in" samples from a copy of the actor with its projection weights stored [out, in] (made once per
    # iteration, one more copy of those weights alive while sampling), which XLA:CPU's small-batch decode
    # products read faster (`models.weight_layout`); "in_out" samples from the training layout; "auto" is
    # out_in on CPU for a full (not LoRA) actor with >= 64 MiB of projection weights, else in_out.
    weight_layout: str = "auto"

    def __post_init__(self):
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(set(self.param_axes) <= {"data", "fsdp", "tensor"}, "param_axes",
                f"must name mesh axes among data, fsdp, tensor; got {list(self.param_axes)}")
        require(self.weight_layout in ("auto", "in_out", "out_in"), "weight_layout",
                f"must be auto, in_out or out_in, got {self.weight_layout!r}")
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(self.temperature > 0, "temperature", f"must be > 0 for PPO sampling, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Where the score comes from."""

    model_path: Optional[str] = None  # reward model export (scalar head); null = functions only
    model_weight: float = 1.0
    normalize: bool = True  # (r − mean) / std with the RM's stored statistics (rlhf_jax_reward_mean/std)
    functions: tuple[str, ...] = ()  # "package.module:function" or "file.py:function"
    weights: tuple[float, ...] = ()  # one per function; empty = 1 each
    clip: Optional[float] = None  # clip the final score to ±clip
    no_eos_penalty: Optional[float] = None  # subtract this from responses without EOS
    gold_function: Optional[str] = None  # reported only (e.g. "rlhf_jax.tasks:gold_score")

    def __post_init__(self):
        require(self.model_path is not None or len(self.functions) > 0, "model_path",
                "set a reward model path and/or reward.functions")


def online_eval_checks(run, data, reward: RewardConfig, *, ema: bool = False) -> None:
    """The held-out evaluation keys of an online command (``online.heldout``), checked together:
    ``run.eval_every`` and an ``eval/`` keep-best metric need held-out prompts (``data.eval_path`` or
    ``data.eval_fraction``); ``eval/*gold_score`` needs ``reward.gold_function``; a score or accuracy ranks
    checkpoints only with ``keep_best_mode: max``."""
    held_out = data.eval_path is not None or data.eval_fraction > 0
    require(run.eval_every == 0 or held_out, "run.eval_every",
            f"={run.eval_every} evaluates held-out prompts: set data.eval_path or data.eval_fraction")
    metric = run.keep_best_metric
    if metric is None:
        return
    require(metric.startswith(("train/", "eval/")), "run.keep_best_metric",
            f"must name a logged train/<metric> or eval/<metric>, got {metric!r}")
    require(not metric.startswith("eval/") or held_out, "run.keep_best_metric",
            f"{metric!r} needs held-out prompts: set data.eval_path or data.eval_fraction")
    require(not metric.endswith("gold_score") or reward.gold_function is not None, "run.keep_best_metric",
            f"{metric!r} needs reward.gold_function")
    require(not metric.startswith("eval/ema_") or ema, "run.keep_best_metric",
            f"{metric!r} is the EMA actor's: set ppo.ema_decay / algo.ema_decay (on ppo and the critic-free family)")
    name = metric.split("/", 1)[-1]
    larger = any(w in name for w in ("score", "accuracy", "reward")) and not name.endswith("_std")
    require(not larger or run.keep_best_mode == "max", "run.keep_best_mode",
            f"{metric} is better when larger: set run.keep_best_mode=max")
