"""Peak host memory of one PPO iteration: full fine-tuning vs LoRA vs LoRA with a bf16 base (same run).

Workload: `benchmarks/ppo.py`'s (prompts of exactly 64 tokens, 64 sampled new tokens, actor + critic +
reward model, k1 KL, 1 epoch × 1 minibatch, f32 compute) with `--batch` rollouts. Each configuration runs in
its own fresh subprocess (one at a time) for `--iters` iterations (the first compiles); the number reported
is that process's resident-set high-water mark (`getrusage(RUSAGE_SELF).ru_maxrss`), i.e. everything: the
Python runtime, XLA's compiled programs and temporaries, the params, optimizer state and activations.

    full       every param trained: actor + Adam moments, critic + Adam moments, frozen reference copy, reward model
    lora       model.lora rank 16 on q k v o gate up down (actor and critic each with their own adapters), the
               reference = the actor's base with adapters off (no copy), Adam moments of the adapters only
    lora_bf16  the same with model.base_dtype=bfloat16 (frozen bases stored in bf16; compute stays f32)

Usage: python benchmarks/memory.py [--model small|tiny] [--batch 32] [--iters 2] [--modes full,lora,lora_bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {
    "full": [],
    "lora": ["model.lora.rank=16", "model.lora.alpha=32", "model.lora.targets=[all]"],
    "lora_bf16": ["model.lora.rank=16", "model.lora.alpha=32", "model.lora.targets=[all]", "model.base_dtype=bfloat16"],
}


def child(mode: str, model_dir: str, prompts: str, out: str, *, batch: int, iters: int) -> dict:
    """One PPO run of `iters` iterations in this process; returns its peak RSS and iteration times."""
    from rlhf_jax.config import load_config
    from rlhf_jax.recipes import ppo
    from benchmarks.ppo import P, T

    cfg = load_config(ppo.PPOConfig, None, [
        f"model.path={model_dir}", f"data.path={prompts}", "data.format=prompt", f"data.max_prompt_len={P}",
        "data.shuffle=false", f"reward.model_path={model_dir}", "reward.normalize=false", "reward.functions=[]",
        f"rollout.batch_size={batch}", f"rollout.max_new_tokens={T}", f"rollout.min_new_tokens={T}",
        "rollout.temperature=1.0", "ppo.epochs=1", "ppo.num_minibatches=1", "kl.coef=0.05", "kl.kind=k1",
        "actor_optim.learning_rate=1e-5", "critic_optim.learning_rate=1e-5", f"run.output_dir={out}",
        f"run.total_steps={iters}", "run.resume=never", "run.overwrite=true", "run.tensorboard=false",
        "run.progress=off", "run.save_every=0", "run.keep_last_n=1", *MODES[mode]])
    hist = ppo.train(cfg)["history"]
    return {"mode": mode, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "iteration_s": [round(h["time/iteration"], 2) for h in hist]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small", choices=["tiny", "small"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--modes", default="full,lora,lora_bf16")
    ap.add_argument("--work", default=None)
    ap.add_argument("--child", nargs=4, metavar=("MODE", "MODEL_DIR", "PROMPTS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    from rlhf_jax.runtime.host_memory import reexec_with_host_tunables

    reexec_with_host_tunables(sys.argv)  # the same allocator settings as the CLI (runtime/host_memory.py)
    if args.child:
        mode, model_dir, prompts, out = args.child
        print("MEM_JSON " + json.dumps(child(mode, model_dir, prompts, out, batch=args.batch, iters=args.iters)),
              flush=True)
        return
    from benchmarks import _common as C
    from benchmarks.ppo import build_models

    root = pathlib.Path(args.work or tempfile.mkdtemp(prefix="bench-mem-"))
    model_dir, prompts = build_models(root, args.model)
    results = []
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--batch", str(args.batch), "--iters", str(args.iters),
                               "--child", mode, str(model_dir), str(prompts), str(root / f"run-{mode}")],
                              capture_output=True, text=True, env=dict(os.environ))
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEM_JSON ")]
        if proc.returncode or not line:
            raise RuntimeError(f"{mode} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
        res = json.loads(line[-1][len("MEM_JSON "):])
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        results.append(res)
        print(json.dumps(res), flush=True)
    full = next((r for r in results if r["mode"] == "full"), None)
    rows = [("model", f"llama {args.model}"), ("workload", f"{args.batch} rollouts x 64 new tokens, prompt 64, f32")]
    for r in results:
        ratio = f" ({r['peak_rss_gib'] / full['peak_rss_gib']:.0%} of full)" if full and r is not full else ""
        rows.append((f"{r['mode']} peak RSS (GiB)", f"{r['peak_rss_gib']:.2f}{ratio}; s/iteration {r['iteration_s']}"))
    C.print_table(rows, title="PPO iteration, peak host memory")
    C.emit_json({"bench": "memory", "model": args.model, "batch": args.batch, "results": results,
                 "machine": C.machine_info()})


if __name__ == "__main__":
    main()
