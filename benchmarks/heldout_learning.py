"""GRPO vs online DPO vs ReMax at equal sample budgets on two verifiable tasks (issue #22, item 5).

    python benchmarks/heldout_learning.py [OUT] [--task arith|maxdigit|both] [--algos grpo,online_dpo,remax]
        [--iters 40] [--prompts 8] [--samples 8] [--seeds 0,1] [--sft-steps 30] [--set ALGO:key=value ...]

1. tokenizer + tiny Llama (hidden 64, 2 layers, as the recipe tests) and a SHORT SFT on noisy rows of the task
   (so the start is partly right, ~30-60 % greedy);
2. from that same start, each algorithm for ``--iters`` iterations of ``--prompts`` prompts x ``--samples``
   sampled responses (the same number of sampled, scored responses for every algorithm: GRPO's group size, online
   DPO's n, and ReMax's prompts per iteration at group size 1 = prompts x samples; ReMax also decodes one greedy
   response per prompt for its baseline, not counted);
3. prints greedy exact-match accuracy on every prompt of the task and the mean of 4 temperature-1 samples per
   prompt, before -> after, with the fraction of empty greedy responses.

Tasks (exact-match reward 1 / 0, EOS required by the tiny configs' ``no_eos_penalty``):

* ``arith``: ``rlhf_jax.verifiable``'s "a+b=" with 0 <= a, b <= 4 (25 prompts), the one the recipe tests use;
* ``maxdigit`` (not in the repository's tests; written for this check): "max 3 1 4=" -> "4", digits 0-5
  (216 prompts), SFT rows wrong on purpose 50 % of the time.

``--set ALGO:key=value`` overrides one algorithm's config (e.g. ``remax:actor_optim.learning_rate=3e-4``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pathlib
import random
import sys
import time
from typing import Sequence

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_jax import fixtures, models, tasks, verifiable  # noqa: E402
from rlhf_jax.online.scoring import decode  # noqa: E402
from rlhf_jax.recipes import load_trainer_config, recipe  # noqa: E402
from rlhf_jax.train.run import load_tokenizer  # noqa: E402


# ------------------------------------------------------------------------------------------ the second task
def max_prompts() -> list[str]:
    """Every "max a b c=" with digits 0-5, in a fixed order."""
    return [f"max {a} {b} {c}=" for a, b, c in itertools.product(range(6), repeat=3)]


def max_answer(prompt: str) -> str:
    digits = prompt.removeprefix("max ").removesuffix("=").split()
    if len(digits) != 3 or not all(d.isdigit() for d in digits):
        raise ValueError(f"max_answer: prompt {prompt!r} is not 'max a b c='")
    return str(max(int(d) for d in digits))


def max_reward(prompts: Sequence[str], responses: Sequence[str], **columns) -> list[float]:
    """Exact match of the stripped response with the largest digit of the prompt (1.0 / 0.0)."""
    return [float(r.strip() == max_answer(p)) for p, r in zip(prompts, responses)]


def max_sft_rows(n: int, *, seed: int, accuracy: float = 0.5) -> list[dict]:
    rng, prompts = random.Random(seed), max_prompts()
    rows = []
    for _ in range(n):
        p = rng.choice(prompts)
        right = max_answer(p)
        ans = right if rng.random() < accuracy else str(rng.choice([d for d in range(6) if str(d) != right]))
        rows.append({"prompt": p, "completion": ans})
    return rows


TASKS = {
    "arith": dict(prompts=lambda: verifiable.arith_prompts(max_operand=4),
                  sft=lambda n: verifiable.arith_sft_rows(n, seed=0, max_operand=4),
                  reward="rlhf_jax.verifiable:arith_reward", fn=verifiable.arith_reward),
    "maxdigit": dict(prompts=max_prompts, sft=lambda n: max_sft_rows(n, seed=0),
                     reward=f"{pathlib.Path(__file__).resolve()}:max_reward", fn=max_reward),
}


# ------------------------------------------------------------------------------------------------ helpers
def accuracy(model, params, tok, prompts: list[str], fn, *, temperature: float, seed: int = 0) -> tuple[float, float]:
    """(mean reward, fraction of empty responses) of one response per prompt (greedy when τ = 0)."""
    import jax
    import jax.numpy as jnp

    from rlhf_jax.online.sampler import eos_and_pad
    from rlhf_jax.rollout import generate

    enc = [tok(p)["input_ids"] for p in prompts]
    width = max(len(e) for e in enc)
    eos, pad = eos_and_pad(model, tok)
    ids = np.full((len(enc), width), pad, np.int32)
    mask = np.zeros((len(enc), width), np.int32)
    for i, e in enumerate(enc):
        ids[i, width - len(e):], mask[i, width - len(e):] = e, 1
    ro = generate(model, params, jnp.asarray(ids), jnp.asarray(mask), key=jax.random.key(seed), max_new_tokens=4,
                  temperature=temperature, eos_token_id=eos, pad_token_id=pad)
    texts = decode(tok, np.asarray(ro.response_ids_BxT), np.asarray(ro.response_mask_BxT))
    return float(np.mean(fn(prompts, texts))), float(np.mean([not t.strip() for t in texts]))


def evaluate(model, params, tok, prompts, fn) -> dict:
    greedy, empty = accuracy(model, params, tok, prompts, fn, temperature=0.0)
    sampled = float(np.mean([accuracy(model, params, tok, prompts, fn, temperature=1.0, seed=s)[0] for s in range(4)]))
    return {"greedy": round(greedy, 3), "sampled": round(sampled, 3), "greedy_empty": round(empty, 3)}


def sft_start(out: pathlib.Path, task: str, steps: int) -> tuple[pathlib.Path, pathlib.Path, object]:
    """(SFT export, prompt rows file, tokenizer) of ``task`` (cached under ``out``)."""
    spec = TASKS[task]
    export, root, base = out / task / f"sft{steps}" / "model", out / task, out / "base_model"
    prompts = root / "prompts.jsonl"
    if (export / "config.json").exists():  # built by an earlier (or a parallel) invocation
        return export, prompts, load_tokenizer(export)
    tok = fixtures.build_tokenizer(out / "tokenizer")
    fixtures.build_tiny_model(base, "llama", tokenizer=tok, hidden=64, layers=2, heads=4, kv_heads=2, max_positions=64)
    data = tasks.write_jsonl(root / "sft.jsonl", spec["sft"](2000))
    rows = [{"prompt": p} for p in spec["prompts"]()]
    tasks.write_jsonl(prompts, rows * -(-128 // len(rows)))  # >= 128 rows: ReMax's batch at group size 1
    recipe("sft").train(load_trainer_config("sft", None, (
        f"model.path={base}", f"data.path={data}", "data.max_seq_len=16", "data.max_prompt_len=8",
        f"run.total_steps={steps}", "optim.learning_rate=3e-3", "batch_size=32", f"run.output_dir={export.parent}",
        "run.resume=never", "run.tensorboard=false", "run.log_every=1000", "run.progress=off")))
    return export, prompts, tok


def overrides(algo: str, *, model, prompts, reward: str, out, iters: int, n_prompts: int, samples: int,
              seed: int) -> tuple[str, ...]:
    """Each algorithm's config at the same sample budget: ``n_prompts x samples`` scored responses per iteration,
    two optimizer steps per iteration, 3 new tokens, the tiny configs' other defaults."""
    common = (f"model.path={model}", f"data.path={prompts}", "data.max_prompt_len=8", f"reward.functions=[{reward}]",
              f"reward.gold_function={reward}", "rollout.max_new_tokens=3", f"run.total_steps={iters}",
              f"run.output_dir={out}", f"run.seed={seed}", "run.log_every=5", "run.tensorboard=false",
              "run.progress=off", "run.resume=never", "run.overwrite=true", "sample_every=0")
    if algo == "online_dpo":
        return (*common, f"rollout.batch_size={n_prompts}", f"online.num_samples={samples}")
    if algo == "remax":
        return (*common, f"rollout.batch_size={n_prompts * samples}", "algo.group_size=1")
    return (*common, f"rollout.batch_size={n_prompts}", f"algo.group_size={samples}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="runs/heldout_learning")
    ap.add_argument("--task", default="both", choices=("arith", "maxdigit", "both"))
    ap.add_argument("--algos", default="grpo,online_dpo,remax")
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--sft-steps", type=int, default=30)
    ap.add_argument("--tag", default="", help="suffix of the run folders (parallel invocations)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="ALGO:key=value (repeatable)")
    args = ap.parse_args()
    out = pathlib.Path(args.out).absolute()
    extra: dict[str, list[str]] = {}
    for e in args.extra:
        a, kv = e.split(":", 1)
        extra.setdefault(a, []).append(kv)
    results = []
    for task in (("arith", "maxdigit") if args.task == "both" else (args.task,)):
        model_dir, prompt_file, tok = sft_start(out, task, args.sft_steps)
        prompts, fn = TASKS[task]["prompts"](), TASKS[task]["fn"]
        model, params = models.load_pretrained(model_dir)
        before = evaluate(model, params, tok, prompts, fn)
        print(f"[{task}] SFT start: {before}", flush=True)
        for algo, seed in itertools.product(args.algos.split(","), [int(s) for s in args.seeds.split(",")]):
            t0 = time.perf_counter()
            cfg = load_trainer_config(algo, str(ROOT / "configs" / f"{algo}_tiny_cpu.yaml"), (
                *overrides(algo, model=model_dir, prompts=prompt_file, reward=TASKS[task]["reward"],
                           out=out / "runs" / f"{task}_{algo}_{seed}{args.tag}", iters=args.iters,
                           n_prompts=args.prompts,
                           samples=args.samples, seed=seed), *extra.get(algo, ())))
            res = recipe(algo).train(cfg)
            after = evaluate(res["model"], res["state"].params, tok, prompts, fn)
            row = {"task": task, "algo": algo, "seed": seed, "iters": args.iters,
                   "samples": args.iters * args.prompts * args.samples, "before": before, "after": after,
                   "seconds": round(time.perf_counter() - t0, 1), "overrides": extra.get(algo, [])}
            print(json.dumps(row), flush=True)
            results.append(row)
    (out / "summary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
