"""Held-out evaluation inside the online commands (``ppo``, the GRPO family, ``raft``, ``online_dpo``).

``data.eval_path`` (a prompt file) or ``data.eval_fraction`` (prompts held out of ``data.path``) gives the
held-out prompts; the host loop (``train.loop``) calls :class:`HeldoutEval` every ``run.eval_every``
iterations and at the end, and logs what it returns under ``eval/``; ``run.keep_best_metric`` may name any of
them (e.g. ``eval/gold_score`` with ``keep_best_mode: max``).

Every held-out prompt is sampled with the training :class:`~rlhf_jax.online.sampler.Sampler` and scored with
the training reward (``online.scoring.RewardScorer``: reward model, functions with the file's extra columns,
clip, no-EOS penalty; gold function reported only), as ``rlhf-jax eval`` does (``online.evaluation``):

* greedy (τ = 0): ``score``, ``score_std``, ``accuracy`` (0/1 scores), ``gold_score``, ``gold_score_std``,
  ``rm_score`` (raw reward model), ``response_length``, ``eos_rate``;
* one sample per prompt at ``rollout.temperature``: ``sampled_score``, ``sampled_gold_score``,
  ``sampled_response_length``, ``sampled_eos_rate``. Its key is fixed (``fold_in(key(seed), EVAL_STREAM)``,
  batch n folded in), so two evaluations differ only by the params, and the training keys are untouched.

Several processes: each host samples and scores its slice of every prompt batch (the prompt iterator's
per-host rows); the per-prompt values are all-gathered batch by batch in global order, so every statistic is
over all prompts and equals the one-process value. Evaluation reads no training iterator and no training
key, so a run with evaluation trains exactly as one without, and resumes exactly.

With an EMA of the actor (``ppo.ema_decay`` / ``algo.ema_decay``), :func:`policy_metrics` evaluates the EMA
actor alongside, with the same keys, and logs its values as ``ema_<name>`` (``eval/ema_gold_score``, ...),
which ``run.keep_best_metric`` may name too.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np

from rlhf_jax import sharding as shd
from rlhf_jax.data import BatchIterator, DataSplits, PromptBatch
from rlhf_jax.online import evaluation as ev
from rlhf_jax.online.sampler import Sampler
from rlhf_jax.online.scoring import RewardScorer, has_eos
from rlhf_jax.runtime import distributed

#: folded into the run's key for the sampled held-out responses (training iterations fold in 0, 1, 2, ...)
EVAL_STREAM = 2**31 - 1


def fill_rows(batch: PromptBatch) -> tuple[PromptBatch, np.ndarray]:
    """``(batch, real_B)``: padding rows made sampleable (``evaluation.fill_padding``); a host whose slice of
    the last batch is all padding gets one-token dummy prompts (the sampler needs a token per row)."""
    real = np.asarray(batch.index_B) >= 0
    if real.any():
        return ev.fill_padding(batch)
    mask = np.zeros_like(np.asarray(batch.prompt_mask_BxP))
    mask[:, -1] = 1
    return PromptBatch(np.asarray(batch.prompt_ids_BxP), mask, np.zeros_like(np.asarray(batch.index_B))), real


def eval_scorer(train_scorer: RewardScorer, reward, *, dataset, prompt_field: str) -> RewardScorer:
    """The training scorer's settings and reward model (shared, not reloaded) over the held-out prompts'
    extra columns."""
    s = train_scorer.settings
    return RewardScorer(train_scorer.tokenizer, reward, mesh=train_scorer.mesh, eos_ids=s.eos_ids, dataset=dataset,
                        prompt_field=prompt_field, reward_model=train_scorer.reward_model,
                        rm_stats=(s.rm_mean, s.rm_std))


class HeldoutEval:
    """``params -> {name: float}`` over every held-out prompt (module docstring).

    Args:
      batches: the held-out prompt iterator (one ordered pass, last batch padded; ``sampler.prompt_splits(...).eval``).
      sampler: the training sampler (its temperature is the sampled score's).
      scorer: :func:`eval_scorer`.
      seed: the run's seed.
      sampled: also sample one response per prompt at the rollout temperature.
    """

    def __init__(self, batches: BatchIterator, sampler: Sampler, scorer: RewardScorer, *, seed: int,
                 sampled: bool = True):
        self.batches, self.sampler, self.scorer, self.sampled = batches, sampler, scorer, sampled
        self.key = jax.random.fold_in(jax.random.key(seed), EVAL_STREAM)

    def _score(self, params, batch: PromptBatch, real: np.ndarray, key, temperature: Optional[float]) -> dict:
        """Per-prompt values of this batch's real rows, gathered over hosts in global order."""
        ro = self.sampler(params, batch, key, temperature=temperature)
        sc = self.scorer(ro, np.asarray(batch.index_B))
        eos = has_eos(ro.response_ids_BxT, ro.response_mask_BxT, self.scorer.settings.eos_ids)
        local = {"scores": sc.local_score_B, "lengths": shd.local_rows(ro.lengths_B), "eos": shd.local_rows(eos)}
        if self.scorer.reward_model is not None:
            local["rm"] = shd.local_rows(sc.rm_score_B)
        if sc.texts.get("gold") is not None:
            local["gold"] = sc.texts["gold"]
        keep = distributed.allgather_rows(real)  # every host gathers its whole slice (equal shapes), then filters
        return {k: distributed.allgather_rows(np.asarray(v, np.float64))[keep] for k, v in local.items()}

    def __call__(self, params) -> dict[str, float]:
        runs = {"": 0.0, "sampled_": None} if self.sampled else {"": 0.0}
        parts: dict[str, dict[str, list]] = {prefix: {} for prefix in runs}
        for n in range(self.batches.batches_per_epoch):
            batch, real = fill_rows(self.batches.batch(0, n))
            for prefix, temperature in runs.items():
                got = self._score(params, batch, real, jax.random.fold_in(self.key, n), temperature)
                for k, v in got.items():
                    parts[prefix].setdefault(k, []).append(v)
        out: dict[str, float] = {}
        for prefix, p in parts.items():
            col = lambda k: np.concatenate(p[k])[:, None] if k in p else None  # noqa: E731 (N x K=1)
            s = ev.summarize(lengths_NxK=col("lengths"), eos_NxK=col("eos"), scores_NxK=col("scores"),
                             rm_NxK=col("rm"), gold_NxK=col("gold"))
            out.update(_named(s, prefix))
        return out


#: ``evaluation.summarize`` key → logged name
_NAMES = {"reward_mean": "score", "reward_std": "score_std", "accuracy": "accuracy", "gold_score": "gold_score",
          "gold_score_std": "gold_score_std", "rm_score_mean": "rm_score", "response_length": "response_length",
          "eos_rate": "eos_rate"}
_SAMPLED = ("score", "accuracy", "gold_score", "response_length", "eos_rate")


def _named(summary: dict, prefix: str) -> dict[str, float]:
    named = {_NAMES[k]: float(v) for k, v in summary.items() if k in _NAMES}
    if prefix:
        named = {prefix + k: v for k, v in named.items() if k in _SAMPLED}
    return named


def policy_metrics(heldout: HeldoutEval, state) -> dict[str, float]:
    """The held-out metrics of a train state's actor and, when it keeps an EMA, of the EMA actor (``ema_*``)."""
    from rlhf_jax.train.state import ema_params

    out = heldout(state.params)
    if state.ema is not None:
        out.update({"ema_" + k: v for k, v in heldout(ema_params(state)).items()})
    return out


def make_heldout(splits: DataSplits, *, sampler: Sampler, scorer: RewardScorer, reward, prompt_field: str,
                 seed: int) -> Optional[HeldoutEval]:
    """The held-out evaluator of an online run, or None without held-out prompts."""
    if splits.eval is None:
        return None
    scorer = eval_scorer(scorer, reward, dataset=splits.eval.data, prompt_field=prompt_field)
    if distributed.is_main_process():
        print(f"[rlhf_jax] held-out evaluation: {len(splits.eval.data)} prompts from {splits.eval_stats.source}",
              flush=True)
    return HeldoutEval(splits.eval, sampler, scorer, seed=seed)
