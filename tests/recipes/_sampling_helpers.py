"""Helpers shared by the sampling-trainer tests: a briefly SFT'd tiny model on the demo or arithmetic task
(built once per pytest session under the session's base temp folder) and sampled-score evaluation."""

from __future__ import annotations

import pathlib

from rlhf_jax import fixtures, models, tasks, verifiable
from rlhf_jax.config import load_config
from rlhf_jax.online import scoring
from rlhf_jax.recipes import sft


def tiny_model(root: pathlib.Path) -> tuple[pathlib.Path, object]:
    """Random Llama (hidden 64, 2 layers) with the fixture tokenizer; (folder, tokenizer)."""
    tok = fixtures.build_tokenizer(root / "tokenizer")
    return fixtures.build_tiny_model(root / "model", "llama", tokenizer=tok, hidden=64, layers=2, heads=4,
                                     kv_heads=2, max_positions=64), tok


def sft_export(base: pathlib.Path, task: str) -> dict:
    """SFT a tiny model briefly on ``task`` ("demo" or "arith"); returns paths (cached per session)."""
    root = base / f"sft_{task}"
    model_dir, tok = tiny_model(base / "tiny")
    if task == "arith":  # a short SFT: partly right (~40 % sampled, ~75 % greedy exact match)
        data = tasks.write_jsonl(root / "sft.jsonl", verifiable.arith_sft_rows(2000, seed=0, max_operand=4))
        prompts = tasks.write_jsonl(root / "prompts.jsonl", verifiable.arith_prompt_rows(max_operand=4))
        steps, seq, plen = 45, 16, 8
    else:
        paths = tasks.write_task_data(root / "data", n_sft=512, n_pref=64, n_eval=32, n_prompts=64, seed=0)
        data, prompts = paths["sft_train"], paths["prompts_train"]
        steps, seq, plen = 80, 32, 16
    export = root / "run" / "model"
    if not (export / "config.json").exists():
        cfg = load_config(sft.SFTConfig, None, (
            f"model.path={model_dir}", f"data.path={data}", f"data.max_seq_len={seq}", f"data.max_prompt_len={plen}",
            f"run.total_steps={steps}", "optim.learning_rate=3e-3", "batch_size=32", f"run.output_dir={root / 'run'}",
            "run.resume=never", "run.tensorboard=false", "run.log_every=1000"))
        sft.train(cfg)
    return {"model": export, "prompts": prompts, "tokenizer": tok, "prompt_len": plen}


def sampled_accuracy(model_dir_or_pair, tok, prompts: list[str], fn, *, max_new_tokens: int, seed: int = 1,
                     temperature: float = 1.0) -> float:
    """Mean reward of one sample per prompt at ``temperature`` (fixed key; greedy at 0)."""
    if isinstance(model_dir_or_pair, (str, pathlib.Path)):
        model, params = models.load_pretrained(model_dir_or_pair)
    else:
        model, params = model_dir_or_pair
    return scoring.sampled_score(model, params, tok, prompts, fn, max_new_tokens=max_new_tokens,
                                 temperature=temperature, seed=seed)
