"""``rlhf-jax eval``: sample a model on every prompt of a file and score it as the online trainers do.

    rlhf-jax eval --model runs/demo/ppo/model --data prompts.jsonl --reward rlhf_jax.verifiable:exact_match \\
        [--reward-model DIR] [--gold rlhf_jax.tasks:gold_score] [--ref runs/demo/sft/model] \\
        [--samples K] [--temperature T] [--max-new-tokens N] [--batch-size B] [--output out.jsonl]

Sampling is the trainers' jitted sampler (``online.sampler.Sampler``; greedy argmax when ``--temperature 0``,
the default), K samples per prompt. Scores come from the trainers' one scoring path
(``online.scoring.make_scorer``): the ``--reward`` functions (called with the prompt file's extra columns),
the ``--reward-model`` (normalised with the statistics an ``rlhf-jax rm`` export stores, when it has them),
and the ``--gold`` function (reported only). ``--ref``: the KL of each sample to a reference model, k1
summed over the response, from teacher-forced log-probs of both models.

Prints a JSON summary (mean/std reward, accuracy and pass@k when rewards are 0/1, mean@K/best@K, gold score,
response length, EOS rate, KL) on stdout; with ``--output`` writes one JSONL row per prompt
(``prompt``, ``completions``, ``scores``, ``gold``, ``kl``) and the summary as ``<output stem>.summary.json``.
One process (all its local devices).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any

from rlhf_jax.recipes._sampling_flags import add_sampling_arguments, validate_sampling

HELP = "sample a model on a prompt file and score it (rewards, reward model, gold, pass@k, KL to a reference)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_sampling_arguments(p, temperature=0.0, samples_help="samples per prompt (pass@k, mean@k); >1 needs --temperature > 0")
    p.add_argument("--reward", action="extend", nargs="+", default=[], metavar="MODULE:FUNCTION",
                   help="reward function(s) 'package.module:function' or 'file.py:function' (summed, weight 1)")
    p.add_argument("--reward-model", default=None, metavar="DIR", help="reward model folder (scalar head)")
    p.add_argument("--gold", default=None, metavar="MODULE:FUNCTION", help="gold score function (reported only)")
    p.add_argument("--ref", default=None, metavar="DIR", help="reference model folder: report the KL to it")
    p.add_argument("--output", default=None, help="per-prompt JSONL; the summary goes next to it (.summary.json)")


def summary_path(output: str) -> pathlib.Path:
    """``out.jsonl`` → ``out.summary.json``."""
    return pathlib.Path(output).with_suffix(".summary.json")


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate; returns ``(summary, rows)``. Rows also hold ``prompt_ids`` / ``completion_ids`` (not written)."""
    import numpy as np

    from rlhf_jax import rewards
    from rlhf_jax.online import evaluation as ev
    from rlhf_jax.online.config import RewardConfig
    from rlhf_jax.online.sampler import eos_and_pad
    from rlhf_jax.online.scoring import make_scorer
    from rlhf_jax.train import run as common

    validate_sampling(args)
    for spec in (*args.reward, *([args.gold] if args.gold else [])):
        rewards.load_function(spec)  # a bad spec fails before any model is loaded
    mesh, actor = ev.load_policy(args.model, dtype=args.dtype)
    tok = actor.tokenizer
    batches, sampler = ev.open_prompts(args, actor, mesh)
    eos_ids, _ = eos_and_pad(actor.model, tok)
    scorer = None
    if args.reward or args.reward_model:
        normalize = args.reward_model is not None and _has_reward_stats(args.reward_model)
        reward_cfg = RewardConfig(model_path=args.reward_model, functions=tuple(args.reward), normalize=normalize)
        model_cfg = common.ModelLoadConfig(path=args.model, dtype=args.dtype)
        scorer = make_scorer(reward_cfg, model_cfg=model_cfg, actor=actor, mesh=mesh, dataset=batches.data,
                             prompt_field=args.prompt_field)
    gold_fn = rewards.load_function(args.gold) if args.gold else None
    kl = None
    if args.ref:
        _, ref = ev.load_policy(args.ref, dtype=args.dtype, tokenizer_path=args.model)
        kl = ev.SequenceKL(actor, ref, mesh, temperature=args.temperature, samples=args.samples,
                           batch_size=batches.batch_size)

    K = args.samples
    acc = ev.Accumulator(K)
    rows: list[dict[str, Any]] = []
    for sb in ev.sample_all(sampler, actor.params, batches, samples=K, temperature=args.temperature,
                            seed=args.seed, progress=True):
        recs = ev.per_prompt(sb, tok)
        index_BK = np.repeat(sb.index_B, K)
        acc.add("lengths", sb, np.asarray(sb.rollout.lengths_B))
        acc.add("eos", sb, ev.eos_flags(sb, eos_ids))
        per_sample: dict[str, np.ndarray] = {}
        if scorer is not None:
            sc = scorer(sb.rollout, index_BK)
            per_sample["scores"] = acc.add("scores", sb, sc.local_score_B)
            if args.reward_model:
                acc.add("rm", sb, np.asarray(sc.rm_score_B))
        if gold_fn is not None:
            from rlhf_jax.online.scoring import local_texts

            prompts, responses = local_texts(tok, sb.rollout)
            columns = {c: batches.data.extra(c, index_BK) for c in batches.data.rows.column_names
                       if c != args.prompt_field}
            gold = rewards.call_reward_fn(gold_fn, prompts, responses, columns, name="gold function")
            per_sample["gold"] = acc.add("gold", sb, gold)
        if kl is not None:
            per_sample["kl"] = acc.add("kl", sb, kl(sb.rollout))
        for j, rec in enumerate(recs):
            row = {"prompt": ev.dataset_value(batches, args.prompt_field, rec["index"]),
                   "completions": rec["completions"]}
            for name, values in per_sample.items():
                row[name] = [None if np.isnan(v) else float(v) for v in np.asarray(values[j], np.float64)]
            row.update(prompt_ids=rec["prompt_ids"], completion_ids=rec["completion_ids"])
            rows.append(row)

    summary = ev.summarize(lengths_NxK=acc.get("lengths"), eos_NxK=acc.get("eos"), scores_NxK=acc.get("scores"),
                           rm_NxK=acc.get("rm"), gold_NxK=acc.get("gold"), kl_NxK=acc.get("kl"))
    summary.update(model=args.model, data=args.data, temperature=args.temperature, greedy=args.temperature == 0,
                   max_new_tokens=args.max_new_tokens)
    if args.reward:
        summary["reward_functions"] = list(args.reward)
    if args.reward_model:
        summary.update(reward_model=args.reward_model, reward_model_normalized=scorer.settings.normalize)
    if args.ref:
        summary.update(ref=args.ref, kl_temperature=kl.temperature)
    return summary, rows


def _has_reward_stats(path: str) -> bool:
    from rlhf_jax import rewards

    try:
        rewards.load_reward_stats(path)
    except KeyError:
        return False
    return True


def write_rows(path: str, rows: list[dict[str, Any]]) -> None:
    """Per-prompt JSONL without the token ids."""
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if k not in ("prompt_ids", "completion_ids")}) + "\n")


def main(args: argparse.Namespace) -> int:
    summary, rows = run(args)
    if args.output:
        write_rows(args.output, rows)
        summary_path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
        print(f"[rlhf_jax] eval: {len(rows)} prompts -> {args.output}, summary -> {summary_path(args.output)}",
              file=sys.stderr)
    print(json.dumps(summary, indent=2), flush=True)
    return 0
