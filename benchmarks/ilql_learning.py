"""ILQL learns on the demo task from scored samples of the SFT model (issue #22, item 3).

    python benchmarks/ilql_learning.py [OUT] [--sft-steps 150] [--samples 4] [--ilql-steps 300]

1. tokenizer + tiny Llama (hidden 64, 2 layers, as `rlhf-jax demo`) and the task corpora (`rlhf_jax.tasks`);
2. SFT on the mixed-quality corpus (`configs/sft_tiny_cpu.yaml`);
3. offline data: `--samples` responses per training prompt sampled from the SFT model at τ = 1, each scored by
   the gold function (`rlhf_jax.tasks.gold_score`) -> prompt/completion/reward JSONL;
4. `rlhf-jax ilql` from the SFT export on those rows (`configs/ilql_tiny_cpu.yaml`);
5. prints the gold score of greedy decoding on the held-out prompts: the SFT model, then the ILQL model with
   β-perturbed scores (gen_kwargs.beta) and with β = 0 (its LM alone), and sampled as trlx (top-k 20, τ = 1).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_jax import fixtures, models, rewards, tasks  # noqa: E402
from rlhf_jax.data.batching import pad_prompts  # noqa: E402
from rlhf_jax.online.sampler import eos_and_pad  # noqa: E402
from rlhf_jax.online.scoring import decode  # noqa: E402
from rlhf_jax.recipes import load_trainer_config, recipe  # noqa: E402
from rlhf_jax.rollout import generate  # noqa: E402
from rlhf_jax.train.run import load_tokenizer  # noqa: E402


def scored_rows(model_dir: str, prompts: list[str], *, samples: int, max_new_tokens: int, temperature: float,
                seed: int, batch: int = 64) -> list[dict]:
    """`samples` responses per prompt from the model at `temperature`, each with its gold score."""
    model, params = models.load_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    eos, pad = eos_and_pad(model, tok)
    rows = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        ids, mask = pad_prompts([tok(p)["input_ids"] for p in chunk], pad_token_id=pad, buckets=(16, 32))
        ro = generate(model, params, jnp.asarray(ids), jnp.asarray(mask), key=jax.random.key(seed + start),
                      max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=eos, pad_token_id=pad,
                      prompt_repeats=samples)
        texts = decode(tok, np.asarray(ro.response_ids_BxT), np.asarray(ro.response_mask_BxT))
        for i, text in enumerate(texts):
            prompt = chunk[i // samples]
            rows.append({"prompt": prompt, "completion": text, "reward": tasks.response_score(text)})
    return rows


def greedy_gold(model_dir: str, prompts: list[str], *, max_new_tokens: int) -> float:
    from rlhf_jax.online.scoring import sampled_score

    model, params = models.load_pretrained(model_dir)
    return sampled_score(model, params, load_tokenizer(model_dir), prompts, rewards.load_function(
        "rlhf_jax.tasks:gold_score"), max_new_tokens=max_new_tokens, temperature=0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="runs/ilql_learning")
    ap.add_argument("--sft-steps", type=int, default=150)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--ilql-steps", type=int, default=300)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("ilql_overrides", nargs="*", help="extra dotted overrides of configs/ilql_tiny_cpu.yaml")
    args = ap.parse_args()
    out = pathlib.Path(args.out).absolute()
    t0 = time.perf_counter()
    tok = fixtures.build_tokenizer(out / "tokenizer")
    base = fixtures.build_tiny_model(out / "base_model", "llama", tokenizer=tok, hidden=64, layers=2, heads=4,
                                     kv_heads=2, max_positions=128)
    data = tasks.write_task_data(out / "data", n_sft=3000, n_pref=8, n_eval=256, n_prompts=args.prompts, seed=0)
    sft_dir = out / "sft"
    if not (sft_dir / "model" / "config.json").exists():
        recipe("sft").train(load_trainer_config("sft", str(ROOT / "configs" / "sft_tiny_cpu.yaml"), [
            f"model.path={base}", f"data.path={data['sft_train']}", f"data.eval_path={data['sft_eval']}",
            f"run.output_dir={sft_dir}", f"run.total_steps={args.sft_steps}", "run.resume=auto",
            "run.progress=off"]))
    prompts = [json.loads(ln)["prompt"] for ln in data["prompts_train"].read_text().splitlines()]
    eval_prompts = [json.loads(ln)["prompt"] for ln in data["prompts_eval"].read_text().splitlines()]
    rows = scored_rows(str(sft_dir / "model"), prompts, samples=args.samples, max_new_tokens=args.max_new_tokens,
                       temperature=1.0, seed=0)
    scored = tasks.write_jsonl(out / "data" / "ilql_train.jsonl", rows)
    reward_mean = float(np.mean([r["reward"] for r in rows]))
    t_data = time.perf_counter()
    res = recipe("ilql").train(load_trainer_config("ilql", str(ROOT / "configs" / "ilql_tiny_cpu.yaml"), [
        f"model.path={sft_dir / 'model'}", f"data.path={scored}", f"eval.prompts={data['prompts_eval']}",
        f"run.output_dir={out / 'ilql'}", f"run.total_steps={args.ilql_steps}", "run.resume=never",
        "run.overwrite=true", "run.progress=off", f"run.eval_every={args.ilql_steps}",
        f"gen_kwargs.max_new_tokens={args.max_new_tokens}", *args.ilql_overrides]))
    sft_gold = greedy_gold(str(sft_dir / "model"), eval_prompts, max_new_tokens=args.max_new_tokens)
    summary = {"offline_rows": len(rows), "offline_reward_mean": reward_mean,
               "sft_greedy_gold": sft_gold, "ilql_greedy_gold_beta": res["eval/gold_score"],
               "ilql_greedy_gold_beta0": res["eval/gold_score_beta0"],
               "ilql_sampled_gold": res["eval/gold_score_sampled"], "eval_prompts": len(eval_prompts),
               "ilql_steps": res["steps"], "data_seconds": t_data - t0,
               "ilql_seconds": time.perf_counter() - t_data}
    print(json.dumps(summary, indent=2))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
