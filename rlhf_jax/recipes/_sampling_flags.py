"""The flags ``rlhf-jax eval`` and ``rlhf-jax generate`` share (argparse only: ``--help`` imports no jax)."""

from __future__ import annotations

import argparse


def add_sampling_arguments(p: argparse.ArgumentParser, *, temperature: float, samples_help: str) -> None:
    """The flags ``eval`` and ``generate`` share."""
    p.add_argument("--model", required=True, help="Hugging Face model folder (with its tokenizer)")
    p.add_argument("--data", required=True, help="prompt file (.jsonl/.json/.parquet/...): plain or chat-message prompts")
    p.add_argument("--prompt-field", default="prompt", help="column holding the prompt (default: prompt)")
    p.add_argument("--samples", type=int, default=1, metavar="K", help=samples_help)
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"sampling temperature; 0 = greedy (default {temperature:g})")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default: off)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: off)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="response length limit (default 128)")
    p.add_argument("--max-prompt-len", type=int, default=None,
                   help="longer prompts keep their last tokens (default: the model's positions minus --max-new-tokens)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype (default float32)")


def validate_sampling(args: argparse.Namespace) -> None:
    """One-line errors (ValueError) for flag values the sampler cannot take."""
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.samples > 1 and args.temperature == 0:
        raise ValueError("--samples > 1 with --temperature 0 gives K identical greedy samples; set --temperature > 0")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_prompt_len is not None and args.max_prompt_len < 1:
        raise ValueError(f"--max-prompt-len must be >= 1, got {args.max_prompt_len}")
