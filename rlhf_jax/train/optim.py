"""The optimizer every trainer uses: global-norm clipping + AdamW with a warmup/decay schedule and a
weight-decay mask (no decay on biases, norm scales and embeddings), and LoRA+ (a larger learning rate for the
adapters' B matrices) when asked.

Follows the GPT-2/nanoGPT recipe: decay only weight matrices (rank ≥ 2) that are not embeddings.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax

from rlhf_jax.models.lora import SUFFIX_B
from rlhf_jax.run_config import OptimConfig

__all__ = ["decay_mask", "lora_plus", "lora_plus_mask", "make_optimizer", "make_schedule"]


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the optimizer step (0-based).

    lr(t) = η·t/W for t < W (linear warmup from 0), then
      constant: η;
      linear:   η·[r + (1 − r)·(1 − u)];   cosine: η·[r + (1 − r)·½(1 + cos πu)],
    with u = (t − W)/(N − W) clipped to [0, 1], W = warmup_steps, N = total_steps, r = min_lr_ratio.
    (Loshchilov & Hutter 2017 for cosine; optax.warmup_cosine_decay_schedule.)

    Raises:
      ValueError: `total_steps` < 1, or a decaying schedule with `warmup_steps >= total_steps`.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    peak, warmup = cfg.learning_rate, cfg.warmup_steps
    end = cfg.learning_rate * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        if warmup >= total_steps:
            raise ValueError(
                f"optim.warmup_steps ({warmup}) must be < total_steps ({total_steps}) for schedule '{cfg.schedule}'"
            )
        decay_steps = total_steps - warmup
        if cfg.schedule == "linear":
            after = optax.linear_schedule(peak, end, decay_steps)
        else:
            after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], boundaries=[warmup])


def _path_str(path: tuple) -> str:
    """'params/layer_0/kernel' for a pytree key path (dict keys, attributes and indices alike)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def decay_mask(params: Any, *, no_decay_patterns: tuple[str, ...]) -> Any:
    """Pytree of bools like `params`: True where weight decay applies.

    A leaf decays iff its rank is ≥ 2 (not a bias or norm scale) and its '/'-joined path matches none of
    `no_decay_patterns` (case-insensitive regex search; e.g. "embed" keeps embedding tables undecayed).
    Works on arrays and on `jax.ShapeDtypeStruct`s.
    """
    regexes = [re.compile(p, re.IGNORECASE) for p in no_decay_patterns]

    def leaf(path, x):
        name = _path_str(path)
        return len(x.shape) >= 2 and not any(r.search(name) for r in regexes)

    return jax.tree_util.tree_map_with_path(leaf, params)


def lora_plus_mask(params: Any) -> Any:
    """Pytree of bools like `params`: True on LoRA B leaves (names ending in ``_lora_b``, `rlhf_jax.models.lora`).
    Works on arrays and on `jax.ShapeDtypeStruct`s."""
    return jax.tree_util.tree_map_with_path(lambda path, x: _path_str(path).endswith(SUFFIX_B), params)


def lora_plus(ratio: float) -> optax.GradientTransformation:
    """LoRA+ (Hayou, Ghosh & Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", arXiv:2402.12354;
    PEFT `create_loraplus_optimizer`): multiply the update of every B leaf by ``ratio`` after AdamW, so

        η_B = ratio · η_A   (the weight decay of B scales with its learning rate, as in PEFT's param groups)

    A, the heads and every non-adapter leaf keep their update. Stateless (no optimizer-state leaves)."""

    def scale(updates, params=None):
        del params
        return jax.tree.map(lambda u, b: u * ratio if b else u, updates, lora_plus_mask(updates))

    return optax.stateless(scale)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """`optax.chain(clip_by_global_norm(max_grad_norm), adamw(schedule, b1, b2, eps, weight_decay, mask))`,
    then `lora_plus(lora_plus_ratio)` when the ratio is not 1.

    AdamW: Loshchilov & Hutter 2019 (decoupled decay, scaled by the scheduled learning rate as in optax).
    Clipping is skipped when `cfg.max_grad_norm` is None. With ``lora_plus_ratio == 1`` the chain is exactly
    the one without LoRA+ (same transforms, same optimizer state).
    """
    schedule = make_schedule(cfg, total_steps)
    adamw = optax.adamw(
        schedule,
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=lambda p: decay_mask(p, no_decay_patterns=cfg.no_decay_patterns),
    )
    if cfg.lora_plus_ratio != 1.0:
        adamw = optax.chain(adamw, lora_plus(cfg.lora_plus_ratio))
    if cfg.max_grad_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
