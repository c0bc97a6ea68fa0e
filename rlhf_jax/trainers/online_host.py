"""Host-side pieces of online RL shared by PPO and the critic-free family: text scoring, rollout metrics,
sample tables, and the jitted score post-processing.

Nothing here is differentiated. :class:`Scorer` decodes a rollout, calls the Python reward functions
(``rlhf_jax.rewards``) with the prompts' extra dataset columns, and optionally a gold function used only
for reporting. :func:`final_scores` (jittable) combines the reward-model score and the function scores,
then clips and applies the no-EOS penalty.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import ops, rewards
from rlhf_jax.rollout.types import Rollout
from rlhf_jax.trainers.online import Experience, RolloutEval, has_eos, value_metrics


@dataclasses.dataclass(frozen=True)
class ScoreSettings:
    """Static settings of :func:`final_scores` (hashable; part of the jit key)."""

    rm_weight: float = 1.0  # weight of the (normalised) reward-model score; ignored without a reward model
    rm_mean: float = 0.0  # RM statistics for normalisation (identity when mean 0, std 1)
    rm_std: float = 1.0
    normalize: bool = False
    clip: Optional[float] = None
    no_eos_penalty: Optional[float] = None
    eos_ids: tuple[int, ...] = ()
    has_reward_model: bool = True


def final_scores(ev: RolloutEval, fn_score_B: jax.Array, response_ids_BxT: jax.Array, response_mask_BxT: jax.Array,
                 *, settings: ScoreSettings) -> jax.Array:
    """``clip(w·norm(s_RM) + Σ_i w_i f_i) − p·[no EOS]`` (see ``rlhf_jax.rewards``)."""
    s = settings
    score = fn_score_B.astype(jnp.float32)
    if s.has_reward_model:
        rm = ev.rm_score_B
        if s.normalize:
            rm = rewards.normalize_scores(rm, mean=s.rm_mean, std=s.rm_std)
        score = score + s.rm_weight * rm
    score = rewards.clip_scores(score, clip=s.clip)
    if s.no_eos_penalty is not None:
        score = rewards.no_eos_penalty(score, has_eos(response_ids_BxT, response_mask_BxT, s.eos_ids),
                                       penalty=s.no_eos_penalty)
    return score


class Scorer:
    """Decode rollouts and run Python reward functions (and an optional gold function) on them.

    Args:
      tokenizer: Hugging Face tokenizer of the policy.
      fns: weighted reward functions (may be empty when only a reward model scores).
      gold: optional ``fn(prompts, responses, **columns) -> list[float]`` reported as ``gold_score``.
      dataset: the prompt ``EncodedDataset`` (for extra columns); None passes no columns.
      prompt_field: the prompt column (not passed as an extra column).
    """

    def __init__(self, tokenizer, fns: rewards.WeightedRewards, *, gold=None, dataset=None,
                 prompt_field: str = "prompt"):
        self.tokenizer, self.fns, self.gold, self.dataset = tokenizer, fns, gold, dataset
        cols = [] if dataset is None else [c for c in dataset.rows.column_names if c != prompt_field]
        self.columns = tuple(cols)

    def decode(self, ids_BxL: np.ndarray, mask_BxL: np.ndarray) -> list[str]:
        return [self.tokenizer.decode([int(t) for t, m in zip(row, mrow) if m], skip_special_tokens=True)
                for row, mrow in zip(ids_BxL, mask_BxL)]

    def texts(self, rollout: Rollout) -> tuple[list[str], list[str]]:
        host = jax.device_get((rollout.prompt_ids_BxP, rollout.prompt_mask_BxP,
                               rollout.response_ids_BxT, rollout.response_mask_BxT))
        return self.decode(host[0], host[1]), self.decode(host[2], host[3])

    def extra_columns(self, index_B) -> dict[str, list]:
        if self.dataset is None:
            return {}
        return {c: self.dataset.extra(c, index_B) for c in self.columns}

    def __call__(self, rollout: Rollout, index_B) -> tuple[np.ndarray, dict[str, float], dict]:
        """(function score [B] float32, metrics, {"prompts", "responses", "gold"}) for one rollout."""
        prompts, responses = self.texts(rollout)
        columns = self.extra_columns(index_B)
        total, parts = self.fns(prompts, responses, columns)
        metrics = {f"reward/{n}": float(np.nanmean(v)) for n, v in parts.items()}
        gold = None
        if self.gold is not None:
            gold = rewards.call_reward_fn(self.gold, prompts, responses, columns, name="gold function")
            metrics.update(gold_score=float(np.mean(gold)), gold_score_std=float(np.std(gold)))
        return total, metrics, {"prompts": prompts, "responses": responses, "gold": gold}


def rollout_metrics(exp: Experience, rewards_BxT: jax.Array, ev: RolloutEval, *, eos_ids: Sequence[int],
                    with_critic: bool = True) -> dict:
    """Per-iteration statistics of a batch of experience (jittable; device scalars).

    ``with_critic=False`` (critic-free algorithms) leaves out returns, values and explained variance: there
    are no value estimates (the variance ratio would be 0/0 = NaN)."""
    m = exp.response_mask_BxT
    lengths = jnp.sum(m, axis=-1).astype(jnp.float32)
    kl_B = jnp.sum(jnp.where(m > 0, exp.old_logp_BxT - exp.ref_logp_BxT, 0.0), axis=-1)  # k1 summed per sequence
    out = {
        "score": jnp.mean(exp.score_B), "score_std": jnp.std(exp.score_B),
        "rm_score": jnp.mean(ev.rm_score_B),
        "kl": jnp.mean(kl_B), "kl_k3_per_token": ops.masked_mean(ops.kl_estimate(exp.old_logp_BxT, exp.ref_logp_BxT,
                                                                                  kind="k3"), m),
        "non_score_reward": jnp.mean(jnp.sum(rewards_BxT, -1) - exp.score_B),
        "response_length": jnp.mean(lengths),
        "eos_rate": jnp.mean(has_eos(exp.response_ids_BxT, m, tuple(eos_ids)).astype(jnp.float32)),
        "rollout_entropy_proxy": -ops.masked_mean(exp.old_logp_BxT, m),
        "advantages_mean": ops.masked_mean(exp.advantages_BxT, m),
    }
    if with_critic:
        out.update(value_metrics(exp))
    return out


def sample_rows(texts: dict, score_B: np.ndarray, n: int) -> list[dict[str, Any]]:
    """First ``n`` samples as table rows: prompt, response, score (and gold score if any)."""
    rows = []
    for i in range(min(n, len(texts["prompts"]))):
        row = {"prompt": texts["prompts"][i], "response": texts["responses"][i], "score": float(score_B[i])}
        if texts.get("gold") is not None:
            row["gold_score"] = float(texts["gold"][i])
        rows.append(row)
    return rows
