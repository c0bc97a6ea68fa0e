"""``rlhf-jax label``: AI-feedback preference data from a model's own samples.

For every prompt of ``data.path`` (one ordered pass), sample k = ``num_samples`` responses from
``model.path``, score them, and write the best and the worst as one JSONL row
``{"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}`` (prompts whose k scores are all
equal are skipped and counted). The file loads with ``rlhf_jax.data`` (``format: preference``) and feeds
``rlhf-jax rm`` / ``rlhf-jax dpo`` directly. Rankers (``ranker``):

* ``reward_model`` / ``function``: ``reward.model_path`` and/or ``reward.functions`` (as the RL trainers).
* ``judge``: a language model scores each response by the log-probability of a verdict token after a
  prompt template (RLAIF, Lee et al. 2023; "LLM-as-a-judge", Zheng et al. 2023)::

      s(x, y) = log p_judge(verdict | template(prompt=x, response=y))

  e.g. template ``"{prompt}{response}\\nIs this response good? Answer:"`` and verdict ``" Yes"``.
* ``pairwise_judge`` (Constitutional AI's RL-CAI labels, Bai et al. 2022 §4.1): ``num_samples: 2``; a judge LM
  sees both responses as (A) and (B) under each principle of ``pairwise_judge.principles``, in both orders,
  and ``p = P(y_1 ≻ y_2)`` is read from its log-probs of the two option tokens
  (:mod:`rlhf_jax.online.judge`, :func:`rlhf_jax.ops.ai_feedback.pairwise_preference_prob`). The row holds
  the hard pair (the more probable response as ``chosen``) and the soft label ``chosen_prob`` = max(p, 1 − p)
  (``score_chosen`` / ``score_rejected`` = the two probabilities), on which ``rlhf-jax rm`` trains with the
  soft-label loss. Pairs of two identical responses are ties.

Conversational prompts (message lists) are written back as message lists, responses as one assistant turn.

Usage: ``rlhf-jax label configs/label_tiny_cpu.yaml model.path=runs/demo/sft/model output_path=pairs.jsonl``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
from typing import Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import ops
from rlhf_jax.runtime import distributed
from rlhf_jax import sharding as shd
from rlhf_jax.config import require
from rlhf_jax.data import BatchIterator, DataConfig, PromptBatch, build_data, pad_id_of
from rlhf_jax.online import batches as rows_of
from rlhf_jax.online.config import RewardConfig, RolloutConfig
from rlhf_jax.online.judge import PairwiseJudge, PairwiseJudgeConfig
from rlhf_jax.online.sampler import Sampler
from rlhf_jax.online.scoring import local_texts, make_scorer
from rlhf_jax.train import run as common


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """A judge LM scoring responses by the log-probability of a verdict token."""

    model_path: Optional[str] = None  # HF folder of the judge (null = the sampling model itself)
    template: str = "{prompt}{response}\nIs this response good? Answer:"  # fields {prompt}, {response}
    verdict: str = " Yes"  # must be ONE token of the judge's tokenizer
    max_len: int = 256  # judge inputs are left-truncated to this many tokens

    def __post_init__(self):
        require("{response}" in self.template, "judge.template", "must contain {response}")
        require(self.max_len >= 2, "judge.max_len", f"must be >= 2, got {self.max_len}")


@dataclasses.dataclass(frozen=True)
class LabelConfig:
    """One labelling pass over a prompt file."""

    model: common.ModelLoadConfig  # the model that samples responses
    data: DataConfig  # prompt rows (plain strings or message lists)
    output_path: str  # JSONL to write (prompt / chosen / rejected)
    ranker: Literal["reward_model", "function", "judge", "pairwise_judge"] = "function"
    reward: RewardConfig = RewardConfig(functions=("rlhf_jax.tasks:gold_score",))  # reward_model / function
    judge: JudgeConfig = JudgeConfig()
    pairwise_judge: PairwiseJudgeConfig = PairwiseJudgeConfig()
    num_samples: int = 4  # k responses per prompt
    rollout: RolloutConfig = RolloutConfig(batch_size=8)  # batch_size = prompts per generate call
    seed: int = 0
    mesh: shd.MeshConfig = shd.MeshConfig()

    def __post_init__(self):
        require(self.num_samples >= 2, "num_samples", f"must be >= 2, got {self.num_samples}")
        require(bool(self.output_path), "output_path", "must name the JSONL file to write")
        require(self.ranker != "reward_model" or self.reward.model_path is not None, "reward.model_path",
                "ranker=reward_model needs a reward model path")
        require(self.ranker != "function" or len(self.reward.functions) > 0, "reward.functions",
                "ranker=function needs at least one reward function")
        require(self.ranker != "pairwise_judge" or self.num_samples == 2, "num_samples",
                f"ranker=pairwise_judge compares two responses per prompt; set 2, got {self.num_samples}")


def verdict_logprob(logits_BxSxV: jax.Array, mask_BxS: jax.Array, verdict_id: int) -> jax.Array:
    """``log softmax(z_last)[verdict]`` at each row's last real position (the judge's score)."""
    logp_BxSxV = jax.nn.log_softmax(logits_BxSxV.astype(jnp.float32), axis=-1)
    return ops.last_token(logp_BxSxV[..., verdict_id], mask_BxS)


def last_positions(mask_BxS: jax.Array) -> jax.Array:
    """``[B, 1]`` int32 index of each row's last real position (0 for an empty row, as ``ops.last_token``)."""
    B, S = mask_BxS.shape
    return ops.last_token(jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S)), mask_BxS)[:, None]


def judge_program(model, verdict_id: int):
    """Jitted ``(params, ids_BxS, mask_BxS) -> [B]`` verdict log-probs (batch-sharded in → out). Also what
    ``rlhf-jax plan`` compiles.

    The final norm, the LM head and the log-softmax run on each row's last real position only
    (``head_positions_BxW``): :func:`verdict_logprob` of the full ``[B, S, V]`` logits, without forming them
    (a 70B judge, 64 rows × 1024 tokens: 31.3 GiB of f32 logits)."""

    def fn(params, ids_BxS, mask_BxS):
        last_Bx1 = last_positions(mask_BxS)
        logits_Bx1xV = model.apply({"params": params}, ids_BxS, mask_BxS, head_positions_BxW=last_Bx1)
        return verdict_logprob(logits_Bx1xV, jnp.ones_like(last_Bx1), verdict_id)

    return jax.jit(fn)


class Judge:
    """Scores (prompt, response) texts with :func:`verdict_logprob` of a judge LM (one jit per width)."""

    def __init__(self, loaded: common.LoadedModel, cfg: JudgeConfig):
        tok = loaded.tokenizer
        ids = tok(cfg.verdict, add_special_tokens=False)["input_ids"]
        require(len(ids) == 1, "judge.verdict", f"{cfg.verdict!r} is {len(ids)} tokens of the judge tokenizer; "
                "use a single-token verdict")
        self.loaded, self.cfg, self.verdict_id, self.pad = loaded, cfg, int(ids[0]), pad_id_of(tok)
        self._fn = judge_program(loaded.model, self.verdict_id)

    def __call__(self, prompts: list[str], responses: list[str], *, mesh) -> np.ndarray:
        """Scores of THIS host's (prompt, response) rows; every host calls it with the same number of rows."""
        texts = [self.cfg.template.format(prompt=p, response=r) for p, r in zip(prompts, responses)]
        enc = [self.loaded.tokenizer(t)["input_ids"][-self.cfg.max_len:] for t in texts]
        width = int(max(distributed.allgather_rows(np.array([max(len(e) for e in enc)]))))  # one shape on all hosts
        ids = np.full((len(enc), width), self.pad, np.int32)
        mask = np.zeros((len(enc), width), np.int32)
        for i, e in enumerate(enc):  # left padding: the verdict position is the last column
            ids[i, width - len(e):], mask[i, width - len(e):] = e, 1
        ids, mask = shd.shard_batch((ids, mask), mesh)
        return shd.local_rows(self._fn(self.loaded.params, ids, mask)).astype(np.float32)


def _full_batches(it: BatchIterator):
    """This host's slice of each ordered global batch; padding rows (index −1, no prompt token) become copies
    of the first real row (or, on a host whose whole slice is padding, a one-token prompt: every host must
    sample every batch) and are dropped later."""
    for b in it:
        idx = np.asarray(b.index_B)
        pad = idx < 0
        if pad.all():
            mask = np.zeros_like(b.prompt_mask_BxP)
            mask[:, -1] = 1
            yield PromptBatch(b.prompt_ids_BxP, mask, np.zeros_like(idx)), ~pad
            continue
        if pad.any():
            first = int(np.flatnonzero(~pad)[0])
            b = PromptBatch(*(np.where(pad.reshape(-1, *[1] * (np.ndim(x) - 1)), np.asarray(x)[first], x) for x in b))
        yield b, ~pad


def pair_row(prompt, chosen: str, rejected: str, s_c: float, s_r: float, chosen_prob: Optional[float] = None) -> dict:
    """One output row (with the soft label ``chosen_prob`` when given); message-list prompts get assistant-turn
    completions."""
    if isinstance(prompt, list):
        chosen, rejected = ([{"role": "assistant", "content": t}] for t in (chosen, rejected))
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "score_chosen": s_c, "score_rejected": s_r}
    return row if chosen_prob is None else {**row, "chosen_prob": chosen_prob}


def pairwise_rows(raw_prompts: list, responses: list[str], prob: np.ndarray, real: np.ndarray) -> list:
    """Rows of the real prompts from pairs (responses 2g, 2g + 1) with p = P(first ≻ second); None = a tie."""
    rows = []
    for g in np.flatnonzero(real):
        y1, y2, p = responses[2 * g], responses[2 * g + 1], float(prob[g])
        if y1 == y2:
            rows.append(None)
            continue
        (c, r, pc) = (y1, y2, p) if p >= 0.5 else (y2, y1, 1.0 - p)
        rows.append(pair_row(raw_prompts[g], c, r, pc, 1.0 - pc, chosen_prob=pc))
    return rows


def train(cfg: LabelConfig) -> dict:
    """Write the labelled pairs; returns counts and the output path (``train`` so the CLI can call it)."""
    mesh = common.make_mesh(cfg.mesh)
    actor = common.load_model(cfg.model, mesh=mesh, head="lm")
    tok = actor.tokenizer
    data_cfg = dataclasses.replace(cfg.data, format="prompt" if cfg.data.format == "auto" else cfg.data.format,
                                   buckets=(cfg.data.max_prompt_len,), shuffle=False, drop_last=False)
    host_bs = common.host_batch_size(cfg.rollout.batch_size, mesh)  # each host labels its slice of every batch
    it = build_data(data_cfg, tok, task="prompt", batch_size=host_bs).train
    it = BatchIterator(it.data, data_cfg, batch_size=host_bs, pad_id=pad_id_of(tok), shuffle=False, drop_last=False,
                       num_epochs=1, process_index=jax.process_index(), process_count=jax.process_count())
    if cfg.ranker in ("judge", "pairwise_judge"):
        judge_path = cfg.judge.model_path if cfg.ranker == "judge" else cfg.pairwise_judge.model_path
        judge_loaded = actor if judge_path is None else common.load_model(
            dataclasses.replace(cfg.model, path=judge_path, tokenizer_path=None), mesh=mesh, head="lm")
        judge = Judge(judge_loaded, cfg.judge) if cfg.ranker == "judge" else PairwiseJudge(judge_loaded, cfg.pairwise_judge)
        scorer = None
    else:
        judge = None
        scorer = make_scorer(cfg.reward, model_cfg=cfg.model, actor=actor, mesh=mesh, dataset=it.data,
                             prompt_field=cfg.data.prompt_field)
    sampler = Sampler(actor.model, tok, cfg.rollout, mesh)
    out = pathlib.Path(cfg.output_path)
    main = distributed.is_main_process()
    if main:
        out.parent.mkdir(parents=True, exist_ok=True)
    k, key = cfg.num_samples, jax.random.key(cfg.seed)
    counts = {"prompts": 0, "pairs": 0, "ties": 0}
    with open(out, "w") if main else contextlib.nullcontext() as f:
        for n, (batch, real) in enumerate(_full_batches(it)):
            ro = sampler(actor.params, batch, jax.random.fold_in(key, n), repeats=k)
            raw = it.data.rows.select([int(i) for i in np.asarray(batch.index_B)])[cfg.data.prompt_field]
            if cfg.ranker == "pairwise_judge":
                prompts, responses = local_texts(tok, ro)
                prob = judge(prompts[::2], responses[::2], responses[1::2], mesh=mesh)
                rows = pairwise_rows(raw, responses, prob, real)
            else:
                if judge is not None:
                    prompts, responses = local_texts(tok, ro)
                    score = judge(prompts, responses, mesh=mesh)
                else:
                    sc = scorer(ro, np.repeat(np.asarray(batch.index_B), k))
                    score, responses = sc.local_score_B, sc.texts["responses"]
                best, worst, differ = rows_of.best_worst(score, group_size=k)
                rows = [None if not differ[g] else pair_row(raw[g], responses[best[g]], responses[worst[g]],
                                                            float(score[best[g]]), float(score[worst[g]]))
                        for g in np.flatnonzero(real)]
            for host_rows in distributed.allgather_objects(rows):  # prompt order: hosts hold consecutive slices
                for row in host_rows:
                    counts["prompts"] += 1
                    counts["ties" if row is None else "pairs"] += 1
                    if main and row is not None:
                        f.write(json.dumps(row) + "\n")
    if main:
        print(f"[rlhf_jax] label: {counts['pairs']} pairs from {counts['prompts']} prompts "
              f"({counts['ties']} all-tied prompts skipped) -> {out}", flush=True)
    return {**counts, "output_dir": str(out.parent), "output_path": str(out)}

