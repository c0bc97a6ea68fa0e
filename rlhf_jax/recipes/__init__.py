"""One readable driver per command: its config dataclass and ``train(cfg) -> dict``.

:data:`REGISTRY` maps a command to ``(module, config class, help)``; the CLI and the demo both read it.
Recipes import the engine (``rlhf_jax.online``), the plug-ins (``rlhf_jax.algos``) and the run plumbing
(``rlhf_jax.train``), never each other.
"""

from __future__ import annotations

import importlib
from typing import Optional, Sequence

#: command -> (module defining `train(cfg)`, its config dataclass, one-line help). Add a recipe with one line.
REGISTRY: dict[str, tuple[str, str, str]] = {
    "sft": ("rlhf_jax.recipes.sft", "SFTConfig", "supervised fine-tuning (completion-only loss, packing)"),
    "rm": ("rlhf_jax.recipes.rm", "RMConfig", "reward model: scalar head + Bradley-Terry loss"),
    "dpo": ("rlhf_jax.recipes.dpo", "DPOConfig", "offline preferences: DPO (all TRL loss types), SimPO, ORPO, KTO"),
    "ppo": ("rlhf_jax.recipes.ppo", "PPOConfig", "online RLHF: PPO (+ptx, adaptive KL) with a reward model and/or Python rewards"),
    "grpo": ("rlhf_jax.recipes.grpo", "GRPOConfig", "critic-free online RL: GRPO (algo.preset grpo | dapo | dr_grpo)"),
    "rloo": ("rlhf_jax.recipes.grpo", "RLOOConfig", "critic-free online RL: RLOO (leave-one-out baseline)"),
    "reinforce_pp": ("rlhf_jax.recipes.grpo", "ReinforcePPConfig", "critic-free online RL: REINFORCE++ (whitened KL-shaped returns)"),
    "remax": ("rlhf_jax.recipes.grpo", "ReMaxConfig", "critic-free online RL: ReMax (greedy-response baseline)"),
    "raft": ("rlhf_jax.recipes.raft", "RAFTConfig", "RAFT / best-of-n: sample, keep the best, SFT on them, repeat"),
    "online_dpo": ("rlhf_jax.recipes.online_dpo", "OnlineDPOConfig", "online DPO on best-vs-worst pairs of the policy's own samples"),
    "ilql": ("rlhf_jax.recipes.ilql", "ILQLConfig", "offline RL: ILQL (Q/V heads, CQL, AWAC) on prompt/completion/reward rows"),
    "label": ("rlhf_jax.recipes.label", "LabelConfig", "write prompt/chosen/rejected JSONL ranked by an RM, a function or a judge LM"),
    "critique": ("rlhf_jax.recipes.critique", "CritiqueConfig", "Constitutional AI SL data: critique -> revision rounds under principles, prompt/completion JSONL"),
}


def trainer_config_class(name: str) -> type:
    """The config dataclass of a registered recipe."""
    module, cls, _ = REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def load_trainer_config(name: str, path: Optional[str], overrides: Sequence[str] = ()):
    """``load_config(<recipe config class>, path, overrides)``."""
    from rlhf_jax.config import load_config

    return load_config(trainer_config_class(name), path, tuple(overrides))


def recipe(name: str):
    """The module of a registered recipe (imported on demand)."""
    return importlib.import_module(REGISTRY[name][0])
