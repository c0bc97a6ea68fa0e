"""Peak host memory of a PPO iteration: full fine-tuning vs LoRA vs LoRA with a bf16 base vs TRL+PEFT (same run).

Workload (`benchmarks/ppo.py`'s, sizes configurable): `--batch` prompts of exactly `--prompt-len` tokens,
exactly `--new-tokens` sampled tokens (temperature 1), actor + critic + reward model (critic and reward: the
same backbone with a scalar head), k1 KL with β = 0.05, 1 epoch × 1 minibatch, f32 compute. Every
configuration runs in its own fresh subprocess, one at a time, for `--iters` iterations (the first compiles).
Reported per configuration: `peak_rss_gib`, the process's resident-set high-water mark (`VmHWM`) right after
its last iteration (so: loading, compiling and every iteration, i.e. the Python runtime, XLA's compiled
programs and temporaries or torch's, the params, optimizer state and activations; not the final
checkpoint/export), the RSS after loading, and each iteration's seconds. Both sides run with the same
allocator tunables (`rlhf_jax/runtime/host_memory.py`; the TRL process inherits them).

    full              every param trained: actor + Adam moments, critic + Adam moments, frozen f32 reference copy,
                      f32 reward model
    lora              model.lora rank 16 (alpha 32) on q k v o gate up down for the actor and for the critic
                      (each its own adapters; the critic on its own f32 base, like TRL's value model), the
                      reference = the actor's base with adapters off (no copy), Adam moments of the adapters and
                      the value head only, f32 reward model
    lora_bf16         lora with model.base_dtype=bfloat16 and frozen_dtype=bfloat16: actor base, critic base and
                      reward model stored in bf16 (compute stays f32)
    lora_bf16_shared  lora_bf16 with ppo.critic_shares_base=true: the critic's adapters + value head on the actor's
                      base (one base for actor, reference and critic) + the bf16 reward model
    lora_shared       lora with ppo.critic_shares_base=true (f32 bases): one base for actor, reference and critic
    *_remat           the same with model.remat=full (every decoder layer recomputed in the backward pass)
    trl_peft          TRL 1.12 PPOTrainer, peft_config = the same LoRA on the policy (reference = adapter
                      disabled), the same LoRA injected on the value model's own f32 base (`benchmarks/memory_trl.py`)
    trl_peft_value_full  TRL 1.12 as shipped with a peft_config: PEFT policy, fully trained f32 value model

Models: `tiny`, `small` (~100M: hidden 768 × 12 layers, GQA 12/2, vocab 16384) from `benchmarks/_common.py`, or
`l2048` with `--layers N`: Llama-shaped, hidden 2048, 16 heads of 128, 4 KV heads, intermediate 5632, vocab 8192
(the fixture tokenizer's), random weights streamed to sharded f32 safetensors (`benchmarks/memory_models.py`).
A comma list `--layers 2,4,6` probes each layer count and fits peak = a + b·layers per mode (least squares),
then predicts the largest layer count whose peak stays under `--budget-gib`.

Usage: python benchmarks/memory.py [--model small|tiny|l2048] [--layers 2,4] [--batch 32] [--prompt-len 64]
                                   [--new-tokens 64] [--iters 2] [--modes full,lora,lora_bf16,trl_peft]
                                   [--micro-batches N] [--separate-reward]

Resident memory is reported as the high-water mark and, after each iteration, split into anonymous and
file-backed pages (`RssAnon` / `RssFile`): torch's `from_pretrained` keeps the safetensors mapped, so TRL's frozen
weights stay file pages (which the kernel can drop under pressure and read again, and which count once per
mapping in RSS), while ours are copied into XLA buffers (anonymous).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LORA = ["model.lora.rank=16", "model.lora.alpha=32", "model.lora.targets=[all]"]
BF16 = ["model.base_dtype=bfloat16", "frozen_dtype=bfloat16"]
MODES = {
    "full": [],
    "lora": LORA,
    "lora_bf16": LORA + BF16,
    "lora_bf16_shared": LORA + BF16 + ["ppo.critic_shares_base=true"],
    "lora_shared": LORA + ["ppo.critic_shares_base=true"],
    "lora_shared_remat": LORA + ["ppo.critic_shares_base=true", "model.remat=full"],
    "lora_remat": LORA + ["model.remat=full"],
    "lora_bf16_shared_remat": LORA + BF16 + ["ppo.critic_shares_base=true", "model.remat=full"],
    "full_remat": ["model.remat=full"],
    "trl_peft": None,
    "trl_peft_value_full": None,
}


def _vm_gib(field: str) -> float:
    from benchmarks.memory_trl import vm_kib

    return vm_kib(field) / 2**20


def bench_config(mode: str, model_dir: str, prompts: str, out: str, *, batch: int, prompt_len: int,
                 new_tokens: int, iters: int, extra: list[str], reward_dir: str | None = None):
    """The `PPOConfig` of one of our modes on this workload (also `benchmarks/memory_programs.py`'s)."""
    from rlhf_jax.config import load_config
    from rlhf_jax.recipes import ppo

    return load_config(ppo.PPOConfig, None, [
        f"model.path={model_dir}", f"data.path={prompts}", "data.format=prompt", f"data.max_prompt_len={prompt_len}",
        "data.shuffle=false", f"reward.model_path={reward_dir or model_dir}", "reward.normalize=false",
        "reward.functions=[]",
        f"rollout.batch_size={batch}", f"rollout.max_new_tokens={new_tokens}", f"rollout.min_new_tokens={new_tokens}",
        "rollout.temperature=1.0", "ppo.epochs=1", "ppo.num_minibatches=1", "kl.coef=0.05", "kl.kind=k1",
        "actor_optim.learning_rate=1e-5", "critic_optim.learning_rate=1e-5", f"run.output_dir={out}",
        f"run.total_steps={iters}", "run.resume=never", "run.overwrite=true", "run.tensorboard=false",
        "run.progress=off", "run.save_every=0", "run.keep_last_n=1", *MODES[mode], *extra])


def child(mode: str, model_dir: str, prompts: str, out: str, *, batch: int, prompt_len: int, new_tokens: int,
          iters: int, extra: list[str], reward_dir: str | None = None) -> dict:
    """One PPO run of `iters` iterations in this process; returns its peak RSS and iteration times."""
    import dataclasses

    import jax

    from rlhf_jax.recipes import ppo

    cfg = bench_config(mode, model_dir, prompts, out, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                       iters=iters, extra=extra, reward_dir=reward_dir)
    probe = {"hwm": []}
    original = ppo.run_loop

    def run_loop(loop, state):  # VmHWM after each iteration, before the final checkpoint/export
        inner = loop.step

        def step(index, st):
            if index == 0:
                probe["rss_after_load"] = _vm_gib("VmRSS")
            res = inner(index, st)
            jax.block_until_ready(res[0])
            probe["hwm"].append(_vm_gib("VmHWM"))
            probe.setdefault("anon", []).append(round(_vm_gib("RssAnon"), 3))
            probe.setdefault("file", []).append(round(_vm_gib("RssFile"), 3))
            return res

        return original(dataclasses.replace(loop, step=step), state)

    ppo.run_loop = run_loop
    try:
        hist = ppo.train(cfg)["history"]
    finally:
        ppo.run_loop = original
    return {"mode": mode, "peak_rss_gib": probe["hwm"][-1], "rss_after_load_gib": probe["rss_after_load"],
            "hwm_per_iteration_gib": [round(h, 3) for h in probe["hwm"]],
            "rss_anon_gib": probe["anon"], "rss_file_gib": probe["file"],
            "peak_process_gib": _vm_gib("VmHWM"), "iteration_s": [round(h["time/iteration"], 2) for h in hist],
            "framework": "rlhf_jax (jax " + jax.__version__ + ")"}


def run_mode(mode: str, model_dir: pathlib.Path, prompts: pathlib.Path, out: pathlib.Path, args,
             reward_dir: pathlib.Path | None = None) -> dict:
    """One configuration in a fresh subprocess (ours, or TRL's in its venv); its MEM_JSON record."""
    sizes = [str(args.batch), str(args.prompt_len), str(args.new_tokens), str(args.iters)]
    env = dict(os.environ)
    if MODES[mode] is None:
        env.update(PYTHONPATH=os.pathsep.join([str(ROOT / ".trl112"), str(ROOT)]), CUDA_VISIBLE_DEVICES="",
                   WANDB_DISABLED="true", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        argv = [str(ROOT / ".venv-trl" / "bin" / "python"), str(ROOT / "benchmarks" / "memory_trl.py"), mode,
                str(model_dir), str(prompts), *sizes, "16", "32", str(args.micro_batches)]
        argv += [str(reward_dir)] if reward_dir else []
    else:
        argv = [sys.executable, __file__, "--batch", sizes[0], "--prompt-len", sizes[1], "--new-tokens", sizes[2],
                "--iters", sizes[3], "--micro-batches", str(args.micro_batches),
                "--child", mode, str(model_dir), str(prompts), str(out)]
        if args.scan_layers:
            argv += ["--scan-layers"]
        if reward_dir:
            argv += ["--reward-dir", str(reward_dir)]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=str(ROOT))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MEM_JSON ")]
    if proc.returncode or not line:
        return {"mode": mode, "failed": f"rc {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["?"])[-1],
                "wall_s": round(time.perf_counter() - t0, 1)}
    res = json.loads(line[-1][len("MEM_JSON "):])
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def separate_copy(model_dir: pathlib.Path) -> pathlib.Path:
    """A byte copy of `model_dir` next to it (new inodes: the kernel caches its pages apart), made once."""
    import shutil

    dest = model_dir.with_name(model_dir.name + "-reward")
    if not (dest / "config.json").exists():
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(model_dir, dest.with_name(dest.name + ".tmp"), dirs_exist_ok=True)
        dest.with_name(dest.name + ".tmp").rename(dest)
    return dest


def fit(points: list[tuple[int, float]], budget: float) -> dict:
    """Least-squares peak = a + b·layers over the probes; the largest layer count with a + b·L <= budget."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    a = my - b * mx
    return {"a_gib": round(a, 3), "b_gib_per_layer": round(b, 4), "max_layers": int((budget - a) // b)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small", choices=["tiny", "small", "l2048"])
    ap.add_argument("--layers", default="4", help="l2048 only: a layer count, or a comma list to fit")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--modes", default="full,lora,lora_bf16,trl_peft")
    ap.add_argument("--budget-gib", type=float, default=22.0)
    ap.add_argument("--scan-layers", action="store_true", help="ours: model.scan_layers=true (faster compiles)")
    ap.add_argument("--micro-batches", type=int, default=1,
                    help="gradient accumulation on both sides, as benchmarks/ppo.py: ours ppo.num_micro_batches, "
                         "TRL per_device_train_batch_size = batch / N with gradient_accumulation_steps = N")
    ap.add_argument("--separate-reward", action="store_true",
                    help="the reward model from its own copy of the model folder (as in a real run, where it is "
                         "another checkpoint): no safetensors page is shared between the reward model and the rest")
    ap.add_argument("--reward-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None)
    ap.add_argument("--child", nargs=4, metavar=("MODE", "MODEL_DIR", "PROMPTS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.micro_batches < 1 or args.batch % args.micro_batches:
        raise SystemExit(f"--micro-batches {args.micro_batches} must be >= 1 and divide --batch {args.batch}")
    from rlhf_jax.runtime.host_memory import reexec_with_host_tunables

    reexec_with_host_tunables(sys.argv)  # the same allocator settings as the CLI (runtime/host_memory.py)
    if args.child:
        mode, model_dir, prompts, out = args.child
        extra = ["model.scan_layers=true"] if args.scan_layers else []
        extra += [f"ppo.num_micro_batches={args.micro_batches}"]
        res = child(mode, model_dir, prompts, out, batch=args.batch, prompt_len=args.prompt_len,
                    new_tokens=args.new_tokens, iters=args.iters, extra=extra, reward_dir=args.reward_dir)
        print("MEM_JSON " + json.dumps(res), flush=True)
        return
    from benchmarks import _common as C
    from benchmarks.memory_models import build_l2048
    from benchmarks.ppo import build_prompts

    bad = [m for m in args.modes.split(",") if m not in MODES]
    if bad:
        raise SystemExit(f"--modes: unknown {bad}; expected among {sorted(MODES)}")
    root = pathlib.Path(args.work or tempfile.mkdtemp(prefix="bench-mem-"))
    layer_counts = [int(x) for x in args.layers.split(",")] if args.model == "l2048" else [None]
    results = []
    for layers in layer_counts:
        if layers is None:
            model_dir = C.build_llama(root / f"llama-{args.model}", args.model)
        else:
            model_dir = build_l2048(root / f"l2048-{layers}", layers=layers)
        name = f"{args.model}{layers or ''}-b{args.batch}-p{args.prompt_len}"
        prompts = build_prompts(root, model_dir, name=name, rows=args.batch, length=args.prompt_len)
        reward_dir = separate_copy(model_dir) if args.separate_reward else None
        for mode in args.modes.split(","):
            res = {"layers": layers, **run_mode(mode, model_dir, prompts, root / f"run-{mode}", args, reward_dir),
                   "loadavg": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
            results.append(res)
            print(json.dumps(res), flush=True)
    rows = [("model", args.model + (f" layers {args.layers}" if args.model == "l2048" else "")),
            ("workload", f"{args.batch} rollouts x {args.new_tokens} new tokens, prompt {args.prompt_len}, f32 compute, "
                         f"{args.iters} iterations")]
    for r in results:
        full = next((x for x in results if x["mode"] == "full" and x["layers"] == r["layers"] and "failed" not in x),
                    None)
        key = f"{r['mode']}" + (f" L={r['layers']}" if r["layers"] else "")
        if "failed" in r:
            rows.append((key, "FAILED " + r["failed"]))
            continue
        ratio = f" ({r['peak_rss_gib'] / full['peak_rss_gib']:.0%} of full)" if full and r is not full else ""
        rows.append((key, f"peak {r['peak_rss_gib']:.2f} GiB{ratio}; after load {r['rss_after_load_gib']:.2f}; "
                          f"s/iteration {r['iteration_s']}; load {r['loadavg'][0]:.2f}"))
    fits = {}
    if len(layer_counts) > 1:
        for mode in args.modes.split(","):
            pts = [(r["layers"], r["peak_rss_gib"]) for r in results if r["mode"] == mode and "failed" not in r]
            if len(pts) >= 2:
                fits[mode] = fit(pts, args.budget_gib)
                rows.append((f"fit {mode}", f"peak = {fits[mode]['a_gib']} + {fits[mode]['b_gib_per_layer']} x layers "
                                            f"GiB -> largest under {args.budget_gib} GiB: {fits[mode]['max_layers']} layers"))
    C.print_table(rows, title="PPO iteration, peak host memory")
    C.emit_json({"bench": "memory", "model": args.model, "batch": args.batch, "prompt_len": args.prompt_len,
                 "new_tokens": args.new_tokens, "results": results, "fits": fits, "machine": C.machine_info()})


if __name__ == "__main__":
    main()
