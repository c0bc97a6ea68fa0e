"""Step 2 of an online iteration: responses → one score per response, for every online command.

    score = clip(w_RM·norm(s_RM) + Σ_i w_i·f_i(prompt, response, columns)) − p·[no EOS]

:class:`RewardScorer` is the one scoring path: the reward model (if any) runs jitted over the global
batch; each host decodes and scores ONLY its own rows with the Python reward functions (a function that
costs 1 ms per row costs 1/N per host) and the function scores are assembled into the global array
(``sharding.shard_batch``); :func:`final_scores` (jitted) combines, clips and penalises. Logged statistics
(per-function means, the gold score) are over every host's rows: each host contributes its per-row values
through one small all-gather of floats (``distributed.allgather_rows``), never the rollout.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import ops, rewards
from rlhf_jax.runtime import distributed, xla
from rlhf_jax import sharding as shd
from rlhf_jax.online.config import RewardConfig
from rlhf_jax.rollout.types import Rollout


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


def has_eos(response_ids_BxT: jax.Array, response_mask_BxT: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    """Whether each response contains an EOS among its real tokens."""
    is_eos = jnp.isin(response_ids_BxT, jnp.asarray(eos_ids, response_ids_BxT.dtype))
    return jnp.any(is_eos & (response_mask_BxT > 0), axis=-1)


def final_scores(rm_score_B: jax.Array, fn_score_B: jax.Array, response_ids_BxT: jax.Array,
                 response_mask_BxT: jax.Array, *, settings: ScoreSettings) -> jax.Array:
    """``clip(w·norm(s_RM) + Σ_i w_i f_i) − p·[no EOS]`` (see ``rlhf_jax.rewards``)."""
    s = settings
    score = fn_score_B.astype(jnp.float32)
    if s.has_reward_model:
        rm = rm_score_B
        if s.normalize:
            rm = rewards.normalize_scores(rm, mean=s.rm_mean, std=s.rm_std)
        score = score + s.rm_weight * rm
    score = rewards.clip_scores(score, clip=s.clip)
    if s.no_eos_penalty is not None:
        score = rewards.no_eos_penalty(score, has_eos(response_ids_BxT, response_mask_BxT, s.eos_ids),
                                       penalty=s.no_eos_penalty)
    return score


def reward_model_scores(model, params, ids_BxS, mask_BxS) -> jax.Array:
    """Sequence score: the scalar head at each row's last real token (prompt + response)."""
    return ops.last_token(model.apply({"params": params}, ids_BxS, mask_BxS), mask_BxS).astype(jnp.float32)


def decode(tokenizer, ids_BxS: np.ndarray, mask_BxS: np.ndarray) -> list[str]:
    """The real tokens of each row as text (special tokens dropped)."""
    return [tokenizer.decode([int(t) for t, m in zip(row, mrow) if m], skip_special_tokens=True)
            for row, mrow in zip(ids_BxS, mask_BxS)]


def local_texts(tokenizer, rollout: Rollout) -> tuple[list[str], list[str]]:
    """(prompts, responses) of THIS host's rows of a rollout."""
    p_ids, p_mask, r_ids, r_mask = shd.local_rows((rollout.prompt_ids_BxP, rollout.prompt_mask_BxP,
                                                   rollout.response_ids_BxT, rollout.response_mask_BxT))
    return decode(tokenizer, p_ids, p_mask), decode(tokenizer, r_ids, r_mask)


class Scores(NamedTuple):
    """What scoring a rollout gives.

    Attributes:
      score_B: final scores, a global array sharded like the rollout.
      rm_score_B: raw reward-model scores (zeros without a reward model), global.
      local_score_B: this host's rows of ``score_B`` (numpy; group selection works on these).
      metrics: host floats over every host's rows (``reward/<fn>``, ``gold_score``, ``gold_score_std``).
      texts: this host's ``{"prompts", "responses", "gold"}`` (sample tables, labelling).
    """

    score_B: jax.Array
    rm_score_B: jax.Array
    local_score_B: np.ndarray
    metrics: dict
    texts: dict


class RewardScorer:
    """The one scoring path (module docstring): reward model + reward functions + gold function.

    Args:
      tokenizer: the policy's tokenizer.
      reward: the ``reward`` config section.
      mesh: device mesh.
      eos_ids: EOS ids (no-EOS penalty).
      dataset: this host's prompt ``EncodedDataset`` (extra columns for the functions); None = no columns.
      prompt_field: the prompt column (not passed as an extra column).
      reward_model: optional ``(module, params, shardings)`` of a scalar-head reward model.
      rm_stats: ``(mean, std)`` of the reward model's train-set scores (normalisation).
    """

    def __init__(self, tokenizer, reward: RewardConfig, *, mesh, eos_ids: tuple[int, ...], dataset=None,
                 prompt_field: str = "prompt", reward_model: Optional[tuple[Any, Any, Any]] = None,
                 rm_stats: tuple[float, float] = (0.0, 1.0)):
        self.tokenizer, self.mesh, self.dataset = tokenizer, mesh, dataset
        self.fns = rewards.WeightedRewards.from_specs(reward.functions, reward.weights or None)
        self.gold = rewards.load_function(reward.gold_function) if reward.gold_function else None
        self.columns = () if dataset is None else tuple(c for c in dataset.rows.column_names if c != prompt_field)
        self.settings = ScoreSettings(
            rm_weight=reward.model_weight, rm_mean=rm_stats[0], rm_std=rm_stats[1], normalize=reward.normalize,
            clip=reward.clip, no_eos_penalty=reward.no_eos_penalty, eos_ids=tuple(eos_ids),
            has_reward_model=reward_model is not None)
        bsh = shd.batch_sharding(mesh)
        self.reward_model = reward_model
        self._rm = None
        if reward_model is not None:
            module, rm_params, shardings = reward_model
            self._rm = shd.jit_sharded(functools.partial(reward_model_scores, module), mesh,
                                       in_shardings=(shardings, bsh, bsh), out_shardings=bsh,
                                       compiler_options=xla.compiler_options(
                                           compute_dtype=module.config.dtype, stored_dtypes=xla.leaf_dtypes(rm_params)))
        self._final = shd.jit_sharded(functools.partial(final_scores, settings=self.settings), mesh,
                                      in_shardings=(bsh, bsh, bsh, bsh), out_shardings=bsh)

    def extra_columns(self, index_B) -> dict[str, list]:
        if self.dataset is None:
            return {}
        return {c: self.dataset.extra(c, index_B) for c in self.columns}

    def __call__(self, rollout: Rollout, index_B: np.ndarray) -> Scores:
        """Score a rollout; ``index_B`` are the dataset rows of THIS host's rows of it."""
        prompts, responses = local_texts(self.tokenizer, rollout)
        columns = self.extra_columns(index_B)
        error, gold = None, None
        try:
            fn_local, parts = self.fns(prompts, responses, columns)
            if self.gold is not None:
                gold = rewards.call_reward_fn(self.gold, prompts, responses, columns, name="gold function")
        except rewards.RewardFunctionError as e:
            error = e
        _raise_on_every_host(error)
        metrics = {f"reward/{n}": float(np.nanmean(distributed.allgather_rows(v))) for n, v in parts.items()}
        if self.gold is not None:
            every = distributed.allgather_rows(np.asarray(gold, np.float64))
            metrics.update(gold_score=float(np.mean(every)), gold_score_std=float(np.std(every)))
        fn_B = shd.shard_batch(np.asarray(fn_local, np.float32), self.mesh)
        if self._rm is not None:
            rm_B = self._rm(self.reward_model[1], rollout.ids_BxS, rollout.mask_BxS)
        else:
            rm_B = shd.shard_batch(np.zeros(len(prompts), np.float32), self.mesh)
        score_B = self._final(rm_B, fn_B, rollout.response_ids_BxT, rollout.response_mask_BxT)
        texts = {"prompts": prompts, "responses": responses, "gold": gold}
        return Scores(score_B, rm_B, shd.local_rows(score_B), metrics, texts)


def _raise_on_every_host(error: Optional[Exception]) -> None:
    """Raise a reward-function error on every process (the first host's), so that none waits in a collective."""
    if jax.process_count() > 1:
        errors = distributed.allgather_objects(None if error is None else f"process {jax.process_index()}: {error}")
        first = next((e for e in errors if e), None)
        if first is not None:
            raise rewards.RewardFunctionError(first) from error
    elif error is not None:
        raise error


def sample_rows(texts: dict, score_B: np.ndarray, n: int) -> list[dict[str, Any]]:
    """First ``n`` samples as table rows: prompt, response, score (and gold score if any)."""
    rows = []
    for i in range(min(n, len(texts["prompts"]))):
        row = {"prompt": texts["prompts"][i], "response": texts["responses"][i], "score": float(score_B[i])}
        if texts.get("gold") is not None:
            row["gold_score"] = float(texts["gold"][i])
        rows.append(row)
    return rows


def sampled_score(model, params, tokenizer, prompts: list[str], fn: rewards.RewardFn, *, max_new_tokens: int,
                  temperature: float, seed: int = 0, columns: Optional[dict] = None) -> float:
    """Mean reward of one response per prompt (plain-string prompts, left-padded; greedy when τ = 0).
    Single-host helper for quick evaluations (tests, notebooks)."""
    from rlhf_jax.online.sampler import eos_and_pad
    from rlhf_jax.rollout import generate

    enc = [tokenizer(p)["input_ids"] for p in prompts]
    width = max(len(e) for e in enc)
    eos, pad = eos_and_pad(model, tokenizer)
    ids = np.full((len(enc), width), pad, np.int32)
    mask = np.zeros((len(enc), width), np.int32)
    for i, e in enumerate(enc):
        ids[i, width - len(e):], mask[i, width - len(e):] = e, 1
    ro = generate(model, params, jnp.asarray(ids), jnp.asarray(mask), key=jax.random.key(seed),
                  max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=eos, pad_token_id=pad)
    responses = decode(tokenizer, np.asarray(ro.response_ids_BxT), np.asarray(ro.response_mask_BxT))
    return float(np.mean(rewards.call_reward_fn(fn, prompts, responses, columns)))


def _stored_as(params, dtype: str) -> bool:
    """Whether every floating leaf of ``params`` is stored in ``dtype``."""
    return all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating))


def make_scorer(reward: RewardConfig, *, model_cfg, actor, mesh, dataset=None, prompt_field: str = "prompt",
                frozen_dtype: str = "float32") -> RewardScorer:
    """The :class:`RewardScorer` of a ``reward`` config: loads the reward model (if any) as a frozen copy in
    ``frozen_dtype`` with the inference layout, and its train-set statistics when ``reward.normalize``."""
    from rlhf_jax.online.sampler import eos_and_pad, frozen_copy
    from rlhf_jax.train.run import load_model

    reward_model, stats = None, (0.0, 1.0)
    if reward.model_path is not None:
        load_cfg = dataclasses.replace(model_cfg, path=reward.model_path, tokenizer_path=None, lora=None)
        if jnp.dtype(model_cfg.param_dtype or model_cfg.dtype) in (jnp.dtype(jnp.float32), jnp.dtype(frozen_dtype)):
            # read straight into frozen_dtype (the same values as loading, then casting): the freshly loaded
            # params are the frozen model, no second copy (it was one more model in the peak host memory)
            load_cfg = dataclasses.replace(load_cfg, param_dtype=frozen_dtype)
        rm = load_model(load_cfg, mesh=mesh, head="scalar", rules=shd.INFERENCE_RULES)
        params = rm.params if _stored_as(rm.params, frozen_dtype) else frozen_copy(rm.params, rm.shardings,
                                                                                    frozen_dtype)
        reward_model = (rm.model, params, rm.shardings)
        if reward.normalize:
            stats = rewards.load_reward_stats(reward.model_path)
    eos, _ = eos_and_pad(actor.model, actor.tokenizer)
    return RewardScorer(actor.tokenizer, reward, mesh=mesh, eos_ids=eos, dataset=dataset, prompt_field=prompt_field,
                        reward_model=reward_model, rm_stats=stats)
