"""Host pieces shared by the sampling-based trainers (GRPO family, RAFT, online DPO, labelling).

* :func:`repeat_prompts`: G contiguous copies of each prompt (a group), ``index_B`` repeated with them.
* :class:`Sampler`: ``rollout.generate`` + scoring (Python reward functions on decoded text via
  ``online_host.Scorer``, an optional reward model, ``online_host.final_scores``'s clip / no-EOS penalty).
* :func:`rollout_sft_batch` / :func:`rollout_pair_batch`: sampled rows as the ``SFTBatch`` of the SFT step
  (RAFT) or the ``PreferenceBatch`` of the DPO step (online DPO); left-padded prompts keep their real
  positions because the model's default positions are ``cumsum(mask) − 1``.
* :func:`run_iterations`: the one host loop (resume, progress, metrics, sample tables, checkpoints) that
  the three drivers share; each supplies only ``step(iteration, state) -> (state, metrics, table rows)``.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import distributed, rewards
from rlhf_jax import sharding as shd
from rlhf_jax.checkpoint import Checkpointer, abstract_like, resolve_resume
from rlhf_jax.run_config import RunConfig
from rlhf_jax.data import DataConfig, PreferenceBatch, PromptBatch, SFTBatch, build_data
from rlhf_jax.rollout import generate
from rlhf_jax.rollout.types import Rollout
from rlhf_jax.train.metrics import MetricsLogger, Progress
from rlhf_jax.trainers import common, online, online_host


def repeat_prompts(batch: PromptBatch, n: int) -> PromptBatch:
    """Each prompt row repeated ``n`` times in contiguous rows (``[B, ...]`` → ``[B·n, ...]``)."""
    if n < 1:
        raise ValueError(f"repeat_prompts: n must be >= 1, got {n}")
    return PromptBatch(*(np.repeat(np.asarray(x), n, axis=0) for x in batch))


def take_rows(tree: Any, rows: np.ndarray) -> Any:
    """Rows ``rows`` of every ``[B, ...]`` leaf (host or device arrays)."""
    return jax.tree.map(lambda x: np.asarray(x)[rows], tree)


def concat_rows(trees: list) -> Any:
    """Concatenate pytrees of ``[B_i, ...]`` leaves along the batch axis (host numpy)."""
    return jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs], axis=0), *trees)


def prompt_data(data: DataConfig, tokenizer, host_bs: int):
    """The training prompts at ONE static width ``data.max_prompt_len`` (nothing recompiles)."""
    cfg = dataclasses.replace(data, format="prompt" if data.format == "auto" else data.format,
                              buckets=(data.max_prompt_len,))
    return build_data(cfg, tokenizer, task="prompt", batch_size=host_bs,
                      process_index=jax.process_index(), process_count=jax.process_count()).train


def frozen_copy(params, dtype: str):
    """A frozen copy of params (never donated, never in an optimizer), floats cast to ``dtype``."""
    dt = jnp.dtype(dtype)
    return jax.tree.map(lambda x: jnp.array(x, dtype=dt if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype),
                        params)


def eos_and_pad(model, tokenizer) -> tuple[tuple[int, ...], int]:
    """EOS ids (model config, else tokenizer) and the pad id."""
    eos = tuple(np.atleast_1d(model.config.eos_token_id or tokenizer.eos_token_id).tolist())
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return eos, int(pad)


class Sampler:
    """Sample responses and score them: ``(rollout, score_B, host metrics, texts)``.

    Args:
      model: the policy's Flax module (LM head).
      tokenizer: its tokenizer.
      rollout: a ``ppo.RolloutConfig``-like object (max_new_tokens, temperature, top_k, top_p, min_new_tokens).
      scorer: ``online_host.Scorer`` (Python reward functions, gold function, extra columns).
      score_settings: ``online_host.ScoreSettings`` (RM weight/normalisation, clip, no-EOS penalty).
      mesh: device mesh.
      reward: optional ``common.LoadedModel`` of a scalar-head reward model.
    """

    def __init__(self, model, tokenizer, rollout, scorer: online_host.Scorer,
                 score_settings: online_host.ScoreSettings, mesh, reward: Optional[common.LoadedModel] = None):
        self.model, self.rollout, self.scorer, self.mesh, self.reward = model, rollout, scorer, mesh, reward
        self.eos_ids, self.pad_id = eos_and_pad(model, tokenizer)
        self.settings = score_settings
        bsh = shd.batch_sharding(mesh)
        self._rm = None
        if reward is not None:
            self._rm = shd.jit_sharded(functools.partial(online.reward_model_scores, reward.model), mesh,
                                       in_shardings=(reward.shardings, bsh, bsh), out_shardings=bsh)

        def final(rm_B, fn_B, ids, mask):
            ev = online.RolloutEval(jnp.zeros(ids.shape), jnp.zeros(ids.shape), jnp.zeros(ids.shape), rm_B)
            return online_host.final_scores(ev, fn_B, ids, mask, settings=score_settings)

        self._final = jax.jit(final)

    def generate(self, params, batch: PromptBatch, key: jax.Array, *, temperature: Optional[float] = None,
                 repeats: int = 1) -> Rollout:
        """Sample ``repeats`` responses per prompt of ``batch`` (rows in :func:`repeat_prompts` order).

        The prompt is prefilled once per group and its KV cache shared (``generate(prompt_repeats=)``)
        whenever the distinct prompts split evenly over the batch shards; otherwise the prompts are
        repeated on the host first. Both give the same rollout.
        """
        r = self.rollout
        shared = repeats > 1 and len(batch.prompt_ids_BxP) % shd.local_batch_divisor(self.mesh) == 0
        if repeats > 1 and not shared:
            batch = repeat_prompts(batch, repeats)
        b = shd.shard_batch(batch, self.mesh)
        with shd.mesh_context(self.mesh):
            ro = generate(self.model, params, b.prompt_ids_BxP, b.prompt_mask_BxP, key=key,
                          max_new_tokens=r.max_new_tokens,
                          temperature=r.temperature if temperature is None else temperature,
                          top_k=r.top_k, top_p=r.top_p, eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                          min_new_tokens=r.min_new_tokens, prompt_repeats=repeats if shared else 1)
        return jax.block_until_ready(ro)

    def score(self, ro: Rollout, index_B) -> tuple[np.ndarray, dict, dict]:
        """Final scores ``[B]`` (host float32), host metrics, decoded texts."""
        fn_score, mets, texts = self.scorer(ro, index_B)
        if self._rm is not None:
            rm = self._rm(self.reward.params, ro.ids_BxS, ro.mask_BxS)
        else:
            rm = jnp.zeros(fn_score.shape, jnp.float32)
        score = np.asarray(self._final(rm, jnp.asarray(fn_score), ro.response_ids_BxT, ro.response_mask_BxT))
        return score, mets, texts

    def __call__(self, params, batch: PromptBatch, key, *, temperature: Optional[float] = None, repeats: int = 1):
        """``(rollout, score_B, metrics, texts)`` for ``repeats`` samples of each prompt of ``batch``."""
        ro = self.generate(params, batch, key, temperature=temperature, repeats=repeats)
        return (ro, *self.score(ro, np.repeat(np.asarray(batch.index_B), repeats)))


def make_sampler(model_cfg, reward_cfg, rollout_cfg, data_cfg, actor: common.LoadedModel, mesh, dataset):
    """A :class:`Sampler` from a ``ppo.RewardConfig`` (reward model and/or weighted functions)."""
    rm = None
    if reward_cfg.model_path is not None:
        from rlhf_jax import sharding as _shd

        rm = common.load_model(dataclasses.replace(model_cfg, path=reward_cfg.model_path, tokenizer_path=None),
                               mesh=mesh, head="scalar", rules=_shd.INFERENCE_RULES)
    rm_mean, rm_std = 0.0, 1.0
    if rm is not None and reward_cfg.normalize:
        from rlhf_jax.trainers.rm import load_reward_stats
        rm_mean, rm_std = load_reward_stats(reward_cfg.model_path)
    eos, _ = eos_and_pad(actor.model, actor.tokenizer)
    settings = online_host.ScoreSettings(
        rm_weight=reward_cfg.model_weight, rm_mean=rm_mean, rm_std=rm_std, normalize=reward_cfg.normalize,
        clip=reward_cfg.clip, no_eos_penalty=reward_cfg.no_eos_penalty, eos_ids=eos, has_reward_model=rm is not None)
    scorer = online_host.Scorer(
        actor.tokenizer, rewards.WeightedRewards.from_specs(reward_cfg.functions, reward_cfg.weights or None),
        gold=rewards.load_function(reward_cfg.gold_function) if reward_cfg.gold_function else None,
        dataset=dataset, prompt_field=data_cfg.prompt_field)
    return Sampler(actor.model, actor.tokenizer, rollout_cfg, scorer, settings, mesh, reward=rm)


# --------------------------------------------------------------------------------- rollouts → batches
def _positions_and_segments(mask_BxS: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.maximum(np.cumsum(mask_BxS, axis=1) - 1, 0).astype(np.int32), mask_BxS.astype(np.int32)


def rollout_sft_batch(ro: Rollout) -> SFTBatch:
    """Sampled rows as an :class:`SFTBatch`: loss on the response tokens (EOS included) only."""
    ids = np.concatenate([np.asarray(ro.prompt_ids_BxP), np.asarray(ro.response_ids_BxT)], axis=1).astype(np.int32)
    mask = np.concatenate([np.asarray(ro.prompt_mask_BxP), np.asarray(ro.response_mask_BxT)], axis=1).astype(np.int32)
    loss = np.concatenate([np.zeros_like(np.asarray(ro.prompt_mask_BxP)), np.asarray(ro.response_mask_BxT)],
                          axis=1).astype(np.int32)
    pos, seg = _positions_and_segments(mask)
    return SFTBatch(ids, mask, loss, pos, seg)


def rollout_pair_batch(ro: Rollout, chosen: np.ndarray, rejected: np.ndarray, valid: np.ndarray) -> PreferenceBatch:
    """Pairs (row ``chosen[i]`` ≻ row ``rejected[i]``) as a :class:`PreferenceBatch`; invalid pairs get empty
    loss masks, so the DPO loss counts them as no pair (``pair_loss``: valid = both completions non-empty)."""
    sft = rollout_sft_batch(ro)
    keep = np.asarray(valid, bool)[:, None]
    c, r = take_rows(sft, chosen), take_rows(sft, rejected)
    return PreferenceBatch(c.input_ids_BxS, c.attention_mask_BxS, np.where(keep, c.loss_mask_BxS, 0).astype(np.int32),
                           r.input_ids_BxS, r.attention_mask_BxS, np.where(keep, r.loss_mask_BxS, 0).astype(np.int32))


def best_worst(score_B: np.ndarray, *, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group of G contiguous rows: (row of the best score, row of the worst, whether they differ).

    Ties go to the first row (``argmax``/``argmin``); a group whose scores are all equal is not a pair.
    """
    s = np.asarray(score_B, np.float64).reshape(-1, group_size)
    base = np.arange(s.shape[0]) * group_size
    best, worst = base + s.argmax(axis=1), base + s.argmin(axis=1)
    return best, worst, s.max(axis=1) > s.min(axis=1)


def top_k_rows(score_B: np.ndarray, *, group_size: int, k: int) -> np.ndarray:
    """Row indices of the ``k`` best-scored responses of each group (RAFT / best-of-n), group order kept."""
    if not 1 <= k <= group_size:
        raise ValueError(f"top_k_rows: need 1 <= k <= group_size={group_size}, got {k}")
    s = np.asarray(score_B, np.float64).reshape(-1, group_size)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return (np.arange(s.shape[0])[:, None] * group_size + order).reshape(-1)


# -------------------------------------------------------------------------------------------- host loop
StepFn = Callable[[int, Any], tuple[Any, dict, list]]


def run_iterations(name: str, *, run: RunConfig, output_dir: pathlib.Path, state: Any, prompts, step: StepFn,
                   iterations: int, sample_every: int = 0, stop_at_step: Optional[int] = None,
                   progress_keys: tuple[str, ...] = ("score",)) -> tuple[Any, list[dict]]:
    """Resume from ``run.resume``, then ``step`` each iteration: log, sample tables, checkpoint.

    Randomness must come from ``fold_in(seed, iteration)`` inside ``step``, so a resumed run equals the
    uninterrupted one. ``state`` is a pytree of arrays (checkpointed with the prompt iterator's position).
    Returns the final state and the per-iteration metric history.
    """
    ckpt = Checkpointer(output_dir / "checkpoints", keep_last_n=run.keep_last_n)
    start = 0
    found = resolve_resume(run.resume, ckpt.directory)
    if found is not None:
        source = ckpt if found[0] == ckpt.directory else Checkpointer(found[0], read_only=True)
        state, meta = source.restore(found[1], target=abstract_like(state))
        prompts.restore(meta["data"])
        start = int(meta["iteration"])
        print(f"[rlhf_jax] {name} resumed from {found[0]}/{found[1]} (iteration {start})", flush=True)
    common.truncate_metrics(output_dir / "metrics.jsonl", after_step=start)
    main = distributed.is_main_process()
    logger = MetricsLogger(output_dir, tensorboard=run.tensorboard, wandb=run.wandb,
                           wandb_project=run.wandb_project, is_main=main)
    progress = Progress(iterations, desc=name, enabled=run.progress, is_main=main, initial=start)
    last = min(iterations, stop_at_step or iterations)
    history: list[dict] = []
    try:
        for it in range(start, last):
            state, values, table = step(it, state)
            done = it + 1
            if values.get("finite", 1.0) < 1 and run.nan_policy == "stop":
                raise RuntimeError(f"non-finite {name} loss/gradient at iteration {done}; the update was skipped")
            history.append(values)
            progress.update(1, **{k: values[k] for k in progress_keys if k in values})
            if done % run.log_every == 0 or done == last:
                logger.log(done, values)
            if sample_every and table and (done % sample_every == 0 or it == start):
                logger.log_table(done, table)
            if done == last or (run.save_every and done % run.save_every == 0):
                ckpt.save(done, state, meta={"data": prompts.state(), "iteration": done},
                          metrics={k: values[k] for k in progress_keys if k in values})
    finally:
        progress.close()
        logger.close()
        ckpt.close()
    return state, history


# ---------------------------------------------------------------------------------------- evaluation
def sampled_score(model, params, tokenizer, prompts: list[str], fn: rewards.RewardFn, *, max_new_tokens: int,
                  temperature: float, seed: int = 0, columns: Optional[dict] = None) -> float:
    """Mean reward of one response per prompt (plain-string prompts, left-padded; greedy when τ = 0)."""
    enc = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(e) for e in enc)
    eos, pad = eos_and_pad(model, tokenizer)
    ids = np.full((len(enc), width), pad, np.int32)
    mask = np.zeros((len(enc), width), np.int32)
    for i, e in enumerate(enc):
        ids[i, width - len(e):], mask[i, width - len(e):] = e, 1
    ro = generate(model, params, jnp.asarray(ids), jnp.asarray(mask), key=jax.random.key(seed),
                  max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=eos, pad_token_id=pad)
    resp = online_host.Scorer(tokenizer, rewards.WeightedRewards((), (), ())).texts(ro)[1]
    return float(np.mean(rewards.call_reward_fn(fn, prompts, resp, columns)))
