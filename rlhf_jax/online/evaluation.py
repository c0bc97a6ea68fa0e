"""What the ``eval``, ``generate`` and ``chat`` commands share: the policy on a mesh, every prompt of a file
in order, the training sampler over them, and the statistics of scored samples.

* :func:`load_policy`: the model (LM head) on the default ``(data, fsdp, tensor)`` mesh, one process.
* :func:`prompt_iterator` / :func:`open_prompts`: every prompt of a JSONL/Parquet/... file (plain strings or chat messages through
  the tokenizer's chat template), in file order, one ordered pass; the last batch is padded.
* :func:`sample_all`: the online engine's :class:`~rlhf_jax.online.sampler.Sampler` (``rollout.generate``,
  greedy when τ = 0, K samples per prompt in contiguous groups) over every batch; the padding rows of the
  last batch become copies of a real prompt (every row must hold a token) and are flagged, so the caller
  drops them.
* :func:`sequence_kl`: the k1 estimate of KL(π‖π_ref) of each sample, from teacher-forced log-probs
  (``online.experience.policy_forward``) of the policy and the reference.
* :func:`summarize`: mean/std of the scores, accuracy and pass@k for 0/1 scores, mean@k / best@k, lengths,
  EOS rate, gold score, KL.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models
from rlhf_jax import sharding as shd
from rlhf_jax.data import BatchIterator, DataConfig, PromptBatch, load_encoded, pad_id_of
from rlhf_jax.online.config import RolloutConfig
from rlhf_jax.online.experience import policy_forward
from rlhf_jax.online.sampler import Sampler
from rlhf_jax.online.scoring import has_eos
from rlhf_jax.rollout.types import Rollout, logprob_temperature
from rlhf_jax.train import run as common


def load_policy(path: str, *, dtype: str = "float32", tokenizer_path: Optional[str] = None):
    """``(mesh, LoadedModel)``: an HF folder with an LM head on the default mesh (all local devices), its
    weights in the layout decoding reads fastest (``models.for_decoding``: ``[out, in]`` on CPU)."""
    mesh = common.make_mesh(shd.MeshConfig())
    cfg = common.ModelLoadConfig(path=path, tokenizer_path=tokenizer_path, dtype=dtype)
    loaded = common.load_model(cfg, mesh=mesh, head="lm")
    model, params = models.for_decoding(loaded.model, loaded.params,
                                        shardings=lambda m: shd.param_shardings(m, mesh))
    if model is loaded.model:
        return mesh, loaded
    shardings = jax.tree.map(lambda x: x.sharding, params)
    return mesh, dataclasses.replace(loaded, model=model, params=params, shardings=shardings)


def default_max_prompt_len(model, max_new_tokens: int) -> int:
    """The room a prompt has in the model's positions next to ``max_new_tokens`` new tokens."""
    room = int(model.config.max_position_embeddings) - int(max_new_tokens)
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                         f"{model.config.max_position_embeddings} positions")
    return room


def prompt_iterator(path: str, tokenizer, *, batch_size: int, max_prompt_len: int,
                    prompt_field: str = "prompt") -> BatchIterator:
    """Every prompt of ``path`` in file order (one pass, no shuffle, last batch padded with ``index_B = -1``).

    Rows may hold a plain string (tokenised with the tokenizer's special tokens) or a chat message list
    (rendered with the chat template and ``add_generation_prompt``), as the trainers read prompts. Prompts
    longer than ``max_prompt_len`` keep their last tokens (counted in ``.data.stats.prompt_truncated``).
    Malformed rows raise (nothing is skipped: every prompt is evaluated).
    """
    cfg = DataConfig(path=path, format="prompt", prompt_field=prompt_field, max_prompt_len=max_prompt_len,
                     max_seq_len=max_prompt_len, shuffle=False, drop_last=False)
    data = load_encoded(cfg, tokenizer, task="prompt")
    if len(data) == 0:
        raise ValueError(f"{path}: no prompts")
    return BatchIterator(data, cfg, batch_size=batch_size, pad_id=pad_id_of(tokenizer), shuffle=False,
                         drop_last=False, num_epochs=1)


def fill_padding(batch: PromptBatch) -> tuple[PromptBatch, np.ndarray]:
    """``(batch, real_B)``: padding rows (``index_B`` = −1, no token) replaced by copies of the first real row,
    which the sampler accepts; ``real_B`` flags the rows to keep."""
    idx = np.asarray(batch.index_B)
    real = idx >= 0
    if not real.any():
        raise ValueError("fill_padding: a batch with no real prompt")
    if not real.all():
        first = int(np.flatnonzero(real)[0])
        batch = PromptBatch(*(np.where((~real).reshape(-1, *[1] * (np.ndim(x) - 1)), np.asarray(x)[first], x)
                              for x in batch))
    return batch, real


def open_prompts(args, loaded, mesh) -> tuple[BatchIterator, Sampler]:
    """The prompt iterator and the sampler of the ``eval`` / ``generate`` flags (``recipes/_sampling_flags.py``):
    ``--data``, ``--prompt-field``, ``--max-prompt-len`` (default :func:`default_max_prompt_len`; a warning
    counts truncated prompts), ``--batch-size``, ``--max-new-tokens``, ``--temperature``, ``--top-k``, ``--top-p``."""
    max_prompt_len = args.max_prompt_len or default_max_prompt_len(loaded.model, args.max_new_tokens)
    batches = prompt_iterator(args.data, loaded.tokenizer, batch_size=common.host_batch_size(args.batch_size, mesh),
                              max_prompt_len=max_prompt_len, prompt_field=args.prompt_field)
    stats = batches.data.stats
    if stats.prompt_truncated:
        print(f"[rlhf_jax] warning: {stats.prompt_truncated} of {stats.examples} prompts were longer than "
              f"{max_prompt_len} tokens and keep their last {max_prompt_len} (--max-prompt-len)", file=sys.stderr)
    sampler = make_sampler(loaded, mesh, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return batches, sampler


class SampledBatch(NamedTuple):
    """One batch of samples: ``rollout`` rows u·K … u·K + K − 1 are the K samples of prompt u."""

    rollout: Rollout
    index_B: np.ndarray  # dataset row of each prompt (padding rows: a copy of a real row's)
    real_B: np.ndarray  # bool per prompt: False on the padding rows of the last batch
    samples: int  # K


def make_sampler(loaded, mesh, *, batch_size: int, max_new_tokens: int, temperature: float,
                 top_k: Optional[int] = None, top_p: Optional[float] = None) -> Sampler:
    """The training sampler with these settings (τ = 0 is passed per call: greedy argmax)."""
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {temperature}")
    rollout = RolloutConfig(batch_size=batch_size, max_new_tokens=max_new_tokens,
                            temperature=temperature if temperature > 0 else 1.0, top_k=top_k, top_p=top_p,
                            weight_layout="in_out")  # the weights are already as `load_policy` laid them out
    return Sampler(loaded.model, loaded.tokenizer, rollout, mesh)


def sample_all(sampler: Sampler, params, batches: BatchIterator, *, samples: int, temperature: float,
               seed: int = 0, progress: bool = False) -> Iterator[SampledBatch]:
    """K samples of every prompt, batch by batch (batch n draws with ``fold_in(key(seed), n)``).

    ``progress``: a tqdm bar on stderr when stderr is a terminal.
    """
    key = jax.random.key(seed)
    bar = progress_bar(total=len(batches.data), enabled=progress)
    try:
        for n in range(batches.batches_per_epoch):
            batch, real = fill_padding(batches.batch(0, n))
            ro = sampler(params, batch, jax.random.fold_in(key, n), temperature=temperature, repeats=samples)
            yield SampledBatch(ro, np.asarray(batch.index_B), real, samples)
            bar.update(int(real.sum()))
    finally:
        bar.close()


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(*, total: int, enabled: bool, stream=None):
    """A tqdm bar over prompts on ``stream`` (stderr) when enabled and the stream is a terminal."""
    stream = sys.stderr if stream is None else stream
    if not enabled or not getattr(stream, "isatty", lambda: False)():
        return _NoBar()
    import shutil

    from tqdm import tqdm

    size = shutil.get_terminal_size((80, 24))  # 80x24 when the terminal reports no size (a bare pseudo-terminal)
    return tqdm(total=total, unit="prompt", file=stream, ncols=size.columns, nrows=size.lines)


def per_prompt(sb: SampledBatch, tokenizer) -> list[dict[str, Any]]:
    """The real prompts of a batch: ``{"index", "prompt_ids", "completions", "completion_ids", "lengths",
    "eos"}`` (K each), from this host's rows (one process)."""
    from rlhf_jax.online.scoring import decode

    ro, K = sb.rollout, sb.samples
    p_ids, p_mask, r_ids, r_mask = (np.asarray(x) for x in (ro.prompt_ids_BxP, ro.prompt_mask_BxP,
                                                            ro.response_ids_BxT, ro.response_mask_BxT))
    texts = decode(tokenizer, r_ids, r_mask)
    out = []
    for u in np.flatnonzero(sb.real_B):
        rows = range(u * K, u * K + K)
        out.append({
            "index": int(sb.index_B[u]),
            "prompt_ids": p_ids[u * K][p_mask[u * K] > 0].tolist(),
            "completions": [texts[r] for r in rows],
            "completion_ids": [r_ids[r][r_mask[r] > 0].tolist() for r in rows],
            "lengths": [int(r_mask[r].sum()) for r in rows],
        })
    return out


def eos_flags(sb: SampledBatch, eos_ids: tuple[int, ...]) -> np.ndarray:
    """Whether each sample of the batch ended with an EOS, ``[B·K]``."""
    ro = sb.rollout
    return np.asarray(has_eos(ro.response_ids_BxT, ro.response_mask_BxT, tuple(eos_ids)))


def real_rows(sb: SampledBatch, values_BK) -> np.ndarray:
    """``values`` of the samples of the real prompts, ``[N_real, K]``."""
    v = np.asarray(values_BK).reshape(len(sb.real_B), sb.samples)
    return v[sb.real_B]


# --------------------------------------------------------------------------------------------- KL
def _sequence_kl(policy_model, ref_model, params, ref_params, rollout: Rollout, *, temperature: float,
                 prompt_repeats: int) -> jax.Array:
    fwd = dict(prompt_length=rollout.prompt_length, temperature=temperature, with_entropy=False,
               prompt_repeats=prompt_repeats)
    ids, mask, resp = rollout.ids_BxS, rollout.mask_BxS, rollout.response_ids_BxT
    logp, _ = policy_forward(policy_model, params, ids, mask, resp, **fwd)
    ref_logp, _ = policy_forward(ref_model, ref_params, ids, mask, resp, **fwd)
    return jnp.sum(jnp.where(rollout.response_mask_BxT > 0, logp - ref_logp, 0.0), axis=-1)


class SequenceKL:
    """``Σ_t log π(y_t|·) − log π_ref(y_t|·)`` per sample (k1, summed over the response), teacher-forced under
    ``softmax(logits / τ)`` (τ = 1 for greedy samples), each prompt encoded once per group of K."""

    def __init__(self, policy, ref, mesh, *, temperature: float, samples: int, batch_size: int):
        repeats = samples if samples > 1 and batch_size % shd.local_batch_divisor(mesh) == 0 else 1
        bsh = shd.batch_sharding(mesh)
        self.temperature = logprob_temperature(temperature)
        self._fn = shd.jit_sharded(
            lambda p, rp, ro: _sequence_kl(policy.model, ref.model, p, rp, ro, temperature=self.temperature,
                                           prompt_repeats=repeats),
            mesh, in_shardings=(policy.shardings, ref.shardings, bsh), out_shardings=bsh)
        self.policy, self.ref = policy, ref

    def __call__(self, rollout: Rollout) -> np.ndarray:
        return np.asarray(self._fn(self.policy.params, self.ref.params, rollout))


# ---------------------------------------------------------------------------------------- summary
def pass_at(correct_NxK: np.ndarray, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021) from n = K samples per prompt with c correct:
    mean over prompts of ``1 − C(n − c, k) / C(n, k)``."""
    n = correct_NxK.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= {n}")
    c = correct_NxK.sum(axis=1)
    return float(np.mean([1.0 - (math.comb(n - int(ci), k) / math.comb(n, k)) for ci in c]))


def pass_ks(samples: int) -> list[int]:
    """1, the powers of two below K, and K."""
    ks, k = {1, samples}, 2
    while k < samples:
        ks.add(k)
        k *= 2
    return sorted(ks)


def is_binary(x: np.ndarray) -> bool:
    x = np.asarray(x, np.float64)
    return x.size > 0 and bool(np.all((x == 0.0) | (x == 1.0)))


def summarize(*, lengths_NxK: np.ndarray, eos_NxK: np.ndarray, scores_NxK: Optional[np.ndarray] = None,
              rm_NxK: Optional[np.ndarray] = None, gold_NxK: Optional[np.ndarray] = None,
              kl_NxK: Optional[np.ndarray] = None) -> dict[str, Any]:
    """The statistics of N prompts × K samples (floats; keys present only for what was measured).

    ``reward_mean``/``reward_std`` over all samples; for 0/1 rewards ``accuracy`` (the mean; with greedy
    decoding, the greedy accuracy) and ``pass@k``; with K > 1 ``mean@K`` (mean over prompts of the mean of
    the K rewards) and ``best@K`` (of their max).
    """
    N, K = lengths_NxK.shape
    out: dict[str, Any] = {"prompts": int(N), "samples_per_prompt": int(K)}
    if scores_NxK is not None:
        s = np.asarray(scores_NxK, np.float64)
        out.update(reward_mean=float(s.mean()), reward_std=float(s.std()))
        if K > 1:
            out[f"mean@{K}"] = float(s.mean(axis=1).mean())
            out[f"best@{K}"] = float(s.max(axis=1).mean())
        if is_binary(s):
            out["accuracy"] = float(s.mean())
            if K > 1:
                out.update({f"pass@{k}": pass_at(s > 0.5, k) for k in pass_ks(K)})
    if rm_NxK is not None:
        out["rm_score_mean"] = float(np.mean(rm_NxK))
    if gold_NxK is not None:
        g = np.asarray(gold_NxK, np.float64)
        out.update(gold_score=float(np.nanmean(g)), gold_score_std=float(np.nanstd(g)))
    out.update(response_length=float(np.mean(lengths_NxK)), eos_rate=float(np.mean(eos_NxK)))
    if kl_NxK is not None:
        out.update(kl=float(np.mean(kl_NxK)), kl_std=float(np.std(kl_NxK)))
    return out


def concat_rows(parts: list[np.ndarray], samples: int) -> np.ndarray:
    return np.concatenate(parts, axis=0) if parts else np.zeros((0, samples))


def dataset_value(batches: BatchIterator, column: str, index: int):
    """One cell of the prompt file (e.g. the raw prompt string or message list)."""
    return batches.data.rows[int(index)][column]


@dataclasses.dataclass
class Accumulator:
    """Per-sample arrays of the real prompts, batch after batch."""

    samples: int
    parts: dict[str, list[np.ndarray]] = dataclasses.field(default_factory=dict)

    def add(self, name: str, sb: SampledBatch, values_BK) -> np.ndarray:
        v = real_rows(sb, values_BK)
        self.parts.setdefault(name, []).append(v)
        return v

    def get(self, name: str) -> Optional[np.ndarray]:
        return concat_rows(self.parts[name], self.samples) if name in self.parts else None
