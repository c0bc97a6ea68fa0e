"""``rlhf-jax generate``: batch generation from a prompt file to JSONL.

    rlhf-jax generate --model runs/demo/sft/model --data prompts.jsonl --output out.jsonl \\
        [--samples K] [--temperature T] [--top-p P] [--top-k K] [--max-new-tokens N] [--batch-size B]

Every prompt of ``--data`` (plain strings, or chat message lists rendered with the tokenizer's chat template and
the generation prompt), in file order; the output has one row per prompt: the input row's columns plus
``completions`` (K texts). Same prompts, sampler and seeds as ``rlhf-jax eval`` (greedy at ``--temperature 0``
gives the same completions). A progress bar on stderr when it is a terminal. One process.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

from rlhf_jax.recipes._sampling_flags import add_sampling_arguments, validate_sampling

HELP = "generate completions for every prompt of a file into JSONL (plain or chat prompts, K samples each)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_sampling_arguments(p, temperature=1.0, samples_help="completions per prompt (default 1)")
    p.add_argument("--output", required=True, help="JSONL to write: each input row plus 'completions'")


def run(args: argparse.Namespace) -> list[dict]:
    """Generate; returns the written rows (with ``completion_ids`` as well, not written)."""
    from rlhf_jax.online import evaluation as ev

    validate_sampling(args)
    mesh, loaded = ev.load_policy(args.model, dtype=args.dtype)
    batches, sampler = ev.open_prompts(args, loaded, mesh)
    out = pathlib.Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(out, "w") as f:
        for sb in ev.sample_all(sampler, loaded.params, batches, samples=args.samples, temperature=args.temperature,
                                seed=args.seed, progress=True):
            for rec in ev.per_prompt(sb, loaded.tokenizer):
                row = {**batches.data.rows[rec["index"]], "completions": rec["completions"]}
                f.write(json.dumps(row) + "\n")
                rows.append({**row, "completion_ids": rec["completion_ids"]})
            f.flush()
    return rows


def main(args: argparse.Namespace) -> int:
    rows = run(args)
    print(f"[rlhf_jax] generate: {len(rows)} prompts x {args.samples} -> {args.output}", file=sys.stderr)
    return 0
