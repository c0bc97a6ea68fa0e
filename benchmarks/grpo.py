"""One GRPO iteration: rlhf_jax's trainer vs TRL's `GRPOTrainer`, same CPU, same run, same weights.

Workload (/work/shared/peers/README.md): 8 prompts × 4 generations, prompts of exactly 64 tokens, exactly
64 new tokens (EOS suppressed: `min_new_tokens` = 64), temperature 1, a Python reward (fraction of
completion tokens that are digits), group-normalised advantages, KL to a frozen reference with β = 0.04
(k3 in the loss), token-mean loss (TRL `loss_type="dapo"`), one AdamW step (lr 1e-5, clip 1.0).
Models: Llama-style `tiny` (hidden 256 × 4 layers, 7M) and `small` (~100M), random weights written once
with our `save_pretrained` plus the fixture BPE tokenizer (8,192 tokens), loaded by both sides.

TRL runs in its own virtualenv (`--trl-python`, default /work/main/.venv-trl/bin/python) as a subprocess
of this file (`--trl-worker`), BEFORE our side, so the two never compete for the cores. Each side reports
the median seconds per iteration after `--warmup` iterations and its time split:
  * ours: generate (sampling + decode + reward) / score (actor + reference log-probs, advantages) / train;
  * TRL: generation (`_generate_single_turn`) / the rest of `_generate_and_score_completions` (reward,
    reference log-probs, advantages) / train (the remainder of the Trainer step).

Usage: python benchmarks/grpo.py [--model tiny|small|both] [--iters 3] [--warmup 1]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
N_PROMPTS, G, P, C, BETA, LR = 8, 4, 64, 64, 0.04, 1e-5


# ------------------------------------------------------------------------------------------ both sides
def word_prompts(tok, n: int, length: int, seed: int) -> list[str]:
    """`n` texts of exactly `length` tokens made of word tokens (" word"), which re-tokenise identically."""
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    words = [i for i, t in enumerate(vocab) if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 2]
    out = []
    while len(out) < n:
        text = tok.decode(rng.choice(words, size=length).tolist())
        if len(tok(text, add_special_tokens=False)["input_ids"]) == length:
            out.append(text)
    return out


def digit_fraction(prompts, responses, **columns):
    """Python reward: fraction of the response's characters (non-space) that are digits."""
    out = []
    for r in responses:
        chars = [c for c in r if not c.isspace()]
        out.append(sum(c.isdigit() for c in chars) / max(len(chars), 1))
    return out


# ------------------------------------------------------------------------------------------- TRL side
def trl_worker(model_dir: str, prompts_file: str, iters: int, warmup: int) -> dict:
    """Runs inside the TRL virtualenv: `GRPOTrainer` for warmup + iters steps; one JSON line on stdout."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = json.loads(pathlib.Path(prompts_file).read_text())
    steps = warmup + iters
    digit_ids = {i for i in range(len(tok)) if (s := tok.decode([i]).strip()) and s.isdigit()}

    def reward(completions, completion_ids, **kw):
        return [sum(t in digit_ids for t in ids) / max(len(ids), 1) for ids in completion_ids]

    class Timer(TrainerCallback):
        times: list = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-grpo-"), max_steps=steps, learning_rate=LR,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=10_000,
                     save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, bf16=False, fp16=False,
                     seed=0, data_seed=0, dataloader_num_workers=0, gradient_accumulation_steps=1, max_grad_norm=1.0,
                     gradient_checkpointing=False, dataloader_pin_memory=False,
                     per_device_train_batch_size=N_PROMPTS * G, num_generations=G, max_completion_length=C,
                     temperature=1.0, top_p=1.0, top_k=0, generation_kwargs={"min_new_tokens": C}, beta=BETA,
                     loss_type="dapo", scale_rewards="group", num_iterations=1, shuffle_dataset=False,
                     log_completions=False)
    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=cfg,
                          train_dataset=Dataset.from_dict({"prompt": prompts[: N_PROMPTS * steps]}),
                          processing_class=tok, callbacks=[timer])
    gen, gas = [], []
    for name, bucket in (("_generate_single_turn", gen), ("_generate_and_score_completions", gas)):
        fn = getattr(trainer, name)

        def wrapped(*a, _fn=fn, _b=bucket, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                _b.append(time.perf_counter() - t0)

        setattr(trainer, name, wrapped)
    trainer.train()
    t, g, s = timer.times[warmup:], gen[warmup:], gas[warmup:]
    return {"s_per_iter": statistics.median(t), "times": t, "generate": statistics.median(g),
            "score": statistics.median(s) - statistics.median(g),
            "train": statistics.median(t) - statistics.median(s), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------- our side
def ours(model_dir: pathlib.Path, prompts: list[str], work: pathlib.Path, iters: int, warmup: int) -> dict:
    from rlhf_jax import tasks
    from rlhf_jax.config import load_config
    from rlhf_jax.recipes import grpo

    import shutil

    steps = warmup + iters
    shutil.rmtree(work / "run", ignore_errors=True)  # a fresh run folder (a reused --work holds checkpoints)
    data = tasks.write_jsonl(work / "prompts.jsonl", [{"prompt": p} for p in prompts[: N_PROMPTS * steps]])
    cfg = load_config(grpo.GRPOConfig, None, (
        f"model.path={model_dir}", f"data.path={data}", f"data.max_prompt_len={P}", "data.shuffle=false",
        f"reward.functions=[{pathlib.Path(__file__).resolve()}:digit_fraction]", "algo.preset=grpo",
        f"algo.group_size={G}", "algo.loss_agg_mode=token-mean", f"algo.kl_coef={BETA}", "algo.kl_kind=k3",
        "algo.kl_placement=loss", f"rollout.batch_size={N_PROMPTS}", f"rollout.max_new_tokens={C}",
        f"rollout.min_new_tokens={C}", f"actor_optim.learning_rate={LR}", f"run.total_steps={steps}",
        f"run.output_dir={work / 'run'}", "run.resume=never", "run.tensorboard=false", "run.progress=off",
        "run.log_every=1000"))
    res = grpo.train(cfg)
    hist = res["history"][warmup:]
    split = {k: statistics.median(h[f"time/{k}"] for h in hist) for k in ("generate", "score", "train")}
    times = [sum(h[f"time/{k}"] for k in ("generate", "score", "train")) for h in hist]
    first = res["history"][0]
    return {"s_per_iter": statistics.median(times), "times": times, **split,
            "first_iter_s": sum(first[f"time/{k}"] for k in ("generate", "score", "train"))}


def prepare(size: str, root: pathlib.Path) -> pathlib.Path:
    """Model folder with weights (our save_pretrained) and the fixture tokenizer (8,192 tokens)."""
    from benchmarks import _common as C_
    from rlhf_jax import fixtures

    model_dir = C_.build_llama(root / size, size)
    if not (model_dir / "tokenizer.json").exists():
        fixtures.build_tokenizer(root / "tokenizer", vocab_size=8192).save_pretrained(model_dir)
    return model_dir


def run_one(size: str, args, root: pathlib.Path) -> dict:
    from benchmarks import _common as C_
    from rlhf_jax.train.run import load_tokenizer

    model_dir = prepare(size, root)
    tok = load_tokenizer(str(model_dir))
    steps = args.warmup + args.iters
    prompts = word_prompts(tok, N_PROMPTS * steps, P, seed=0)
    pfile = root / f"prompts_{size}.json"
    pfile.write_text(json.dumps(prompts))
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run([args.trl_python, __file__, "--trl-worker", str(model_dir), str(pfile), str(args.iters),
                           str(args.warmup)], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"TRL worker failed:\n{proc.stderr[-4000:]}")
    trl = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    trl["wall_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        mine = ours(model_dir, prompts, pathlib.Path(tmp), args.iters, args.warmup)
        mine["wall_s"] = time.perf_counter() - t0
    ratio = trl["s_per_iter"] / mine["s_per_iter"]
    rows = [("rlhf_jax s/iter (median)", f"{mine['s_per_iter']:.3f}  {[round(t, 3) for t in mine['times']]}"),
            ("  generate / score / train", " / ".join(f"{mine[k]:.3f}" for k in ("generate", "score", "train"))),
            ("  first iteration (compile)", f"{mine['first_iter_s']:.1f}"),
            ("TRL s/iter (median)", f"{trl['s_per_iter']:.3f}  {[round(t, 3) for t in trl['times']]}"),
            ("  generate / score / train", " / ".join(f"{trl[k]:.3f}" for k in ("generate", "score", "train"))),
            ("speed-up (TRL / rlhf_jax)", f"{ratio:.2f}x"),
            ("load average (1 min) before / after", f"{load0:.2f} / {os.getloadavg()[0]:.2f}")]
    C_.print_table(rows, title=f"GRPO iteration, {size}: {N_PROMPTS} prompts x {G} generations, {C} new tokens")
    return {"model": size, "ours": mine, "trl": trl, "speedup": ratio, "loadavg_before": load0,
            "loadavg_after": os.getloadavg()[0]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--trl-worker":
        print(json.dumps(trl_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("tiny", "small", "both"), default="both")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--trl-python", default=str(REPO / ".venv-trl" / "bin" / "python"))
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "rlhf_jax_bench_models"))
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from rlhf_jax.runtime.host_memory import reexec_with_host_tunables

    reexec_with_host_tunables(sys.argv)  # same allocator tunable for both sides (the TRL worker inherits it)
    from benchmarks import _common as C_

    root = pathlib.Path(args.cache)
    root.mkdir(parents=True, exist_ok=True)
    sizes = ("tiny", "small") if args.model == "both" else (args.model,)
    results = [run_one(s, args, root) for s in sizes]
    C_.emit_json({"bench": "grpo", "results": results, "machine": C_.machine_info()})


if __name__ == "__main__":
    main()
