"""One PPO iteration: rlhf_jax vs TRL 1.12 `PPOTrainer` (PyTorch), same CPU, same run, same weights.

Workload (the shared one of /work/shared/peers/bench_trl.py `ppo`): 32 prompts of exactly 64 tokens, one
response each of exactly 64 sampled tokens (temperature 1, EOS suppressed), policy + frozen reference +
value model + reward model (value and reward: the same backbone with a scalar head), k1 KL in the reward
with β = 0.05, γ = 1, λ = 0.95, 1 PPO epoch × 1 minibatch (one AdamW step for the actor and one for the
critic per iteration), float32. Models: Llama-style `tiny` (hidden 256 × 4 layers) and `small` (~100M),
written once with our `save_pretrained` plus the fixture BPE tokenizer, so both sides load identical weights.

Interleaved rounds (`benchmarks/_rounds.py`): each peer is ONE long-lived subprocess of its own venv (TRL:
`.venv-trl/bin/python` with `PYTHONPATH=.trl112`; Tunix: `.venv-tunix`, `benchmarks/bench_tunix.py ppo`) that
loads and runs `--warmup` iterations before anything is timed (not counted), then waits; our trainer runs
in this process. After our `--warmup` iterations, `--rounds` rounds follow: each peer runs `--iters`
iterations, then we do, while the others wait on a pipe. Reported: medians, the speed-up of every round with
its median and min–max, the split generate / score (teacher-forced forwards of actor/reference/critic/reward +
rewards) / train (TRL's from timing its own `batch_generation`, `get_reward` and no-grad `forward` calls;
Tunix only the total), the XLA and torch 2048³ matmul rates before and after, load average, GLIBC_TUNABLES.

Usage: python benchmarks/ppo.py [--model tiny|small|both] [--rounds 3] [--iters 2] [--warmup 1] [--peers trl,tunix]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

B, P, T = 32, 64, 64


# ----------------------------------------------------------------------------------------- TRL side
def run_trl_peer(model_dir: str, prompts_path: str, *, warmup: int, iters: int, rounds: int,
                 micro_batches: int) -> None:
    """Runs inside the TRL venv (imports torch + trl only here); a long-lived round worker (`_rounds`)."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    import transformers
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    from benchmarks import _rounds as R

    transformers.logging.set_verbosity_error()
    split = {"generate_s": 0.0, "score_s": 0.0}

    def timed(name, fn, only_no_grad=False):
        def wrapper(*a, **k):
            if only_no_grad and torch.is_grad_enabled():
                return fn(*a, **k)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                split[name] += time.perf_counter() - t0
        return wrapper

    trl_ppo.batch_generation = timed("generate_s", trl_ppo.batch_generation)
    trl_ppo.get_reward = timed("score_s", trl_ppo.get_reward, only_no_grad=True)
    trl_ppo.forward = timed("score_s", trl_ppo.forward, only_no_grad=True)

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    prompts = [json.loads(line)["input_ids"] for line in open(prompts_path)]
    total = warmup + rounds * iters
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    value = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id
    ds = Dataset.from_dict({"input_ids": [prompts[i % len(prompts)] for i in range(B * total)]})
    cfg = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-ppo-"), learning_rate=1e-5, lr_scheduler_type="constant",
        logging_steps=10_000, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, bf16=False,
        seed=0, data_seed=0, dataloader_num_workers=0, gradient_accumulation_steps=micro_batches, max_grad_norm=1.0,
        per_device_train_batch_size=B // micro_batches, total_episodes=B * total, num_ppo_epochs=1, num_mini_batches=1,
        local_rollout_forward_batch_size=B, response_length=T, stop_token=None, temperature=1.0, kl_coef=0.05,
        kl_estimator="k1", gamma=1.0, lam=0.95, num_sample_generations=0, missing_eos_penalty=None)
    import trl

    info = lambda: {"framework": f"trl {trl.__version__} PPOTrainer, torch {torch.__version__}",  # noqa: E731
                    "params": int(sum(p.numel() for p in policy.parameters())), "threads": torch.get_num_threads()}
    timer = R.trainer_round_callback(warmup=warmup, iters=iters, rounds=rounds, info=info, split=split)
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=ds, eval_dataset=ds.select(range(B)), callbacks=[timer])
    trainer.train()


# ---------------------------------------------------------------------------------------- our side
def build_models(root: pathlib.Path, size: str) -> tuple[pathlib.Path, pathlib.Path]:
    """Model folder (weights + fixture tokenizer) and a JSONL of B prompts of exactly P tokens."""
    from benchmarks import _common as C

    model_dir = C.build_llama(root / f"llama-{size}", size)
    return model_dir, build_prompts(root, model_dir, name=size, rows=B, length=P)


def build_prompts(root: pathlib.Path, model_dir: pathlib.Path, *, name: str, rows: int, length: int) -> pathlib.Path:
    """Save the fixture BPE tokenizer (vocab 8192) into `model_dir`; write `root/prompts-{name}.jsonl`: `rows`
    prompts of exactly `length` tokens (``prompt`` text and its ``input_ids``)."""
    import numpy as np

    from rlhf_jax import fixtures

    tok = fixtures.build_tokenizer(root / "tokenizer", vocab_size=8192)
    tok.save_pretrained(str(model_dir))
    # words that re-encode to exactly themselves: concatenations tokenise to exactly those ids
    words = []
    for i in range(len(tok)):
        s = tok.decode([i])
        if len(s) > 1 and s[0] == " " and s[1:].isalpha() and tok.encode(s, add_special_tokens=False) == [i]:
            words.append(s)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(rows):
        text = "".join(rng.choice(words, size=length))
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == length, (len(ids), length)
        out.append({"prompt": text, "input_ids": ids})
    prompts = root / f"prompts-{name}.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in out))
    return prompts


def run_ours(model_dir: pathlib.Path, prompts: pathlib.Path, out: pathlib.Path, *, warmup: int, iters: int,
             rounds: int, micro_batches: int, before_round) -> dict:
    import shutil

    from benchmarks import _rounds as R
    from rlhf_jax.config import load_config
    from rlhf_jax.recipes import ppo

    shutil.rmtree(out, ignore_errors=True)  # a fresh run folder: `--work` may hold an earlier run's checkpoints

    cfg = load_config(ppo.PPOConfig, None, [
        f"model.path={model_dir}", f"data.path={prompts}", "data.format=prompt", f"data.max_prompt_len={P}",
        "data.shuffle=false", f"reward.model_path={model_dir}", "reward.normalize=false", "reward.functions=[]",
        f"rollout.batch_size={B}", f"rollout.max_new_tokens={T}", f"rollout.min_new_tokens={T}",
        "rollout.temperature=1.0", "ppo.epochs=1", "ppo.num_minibatches=1", f"ppo.num_micro_batches={micro_batches}",
        "kl.coef=0.05", "kl.kind=k1",
        "actor_optim.learning_rate=1e-5", "critic_optim.learning_rate=1e-5", f"run.output_dir={out}",
        f"run.total_steps={warmup + rounds * iters}", "run.resume=never", "run.tensorboard=false", "run.progress=off",
        "run.save_every=0", "run.keep_last_n=1"])
    undo = R.gated_run_loop(ppo, warmup=warmup, iters=iters, rounds=rounds, before_round=before_round)
    try:
        hist = ppo.train(cfg)["history"]
    finally:
        undo()
    rows = [{"iteration_s": h["time/iteration"], "generate_s": h["time/generate"], "score_s": h["time/score"],
             "train_s": h["time/train"]} for h in hist]
    return {"framework": "rlhf_jax (jax " + __import__("jax").__version__ + ")",
            "rounds": [rows[warmup + r * iters: warmup + (r + 1) * iters] for r in range(rounds)],
            "warmup_rows": rows[:warmup]}


def iteration_flops(model_dir: pathlib.Path) -> dict[str, float]:
    """Matmul FLOPs that one PPO iteration of this workload cannot avoid (our side's passes, each counted once):

    generate   2·N·B·(P + T − 1) body + 2·H·B·T head  (prefill + one decode step per new token)
    score      reference forward (body + head on the T response positions) + reward-model forward (body)
    train      actor forward + backward (3 × forward) + critic forward + backward (3 × body)

    with N the layers' matmul parameters, H = V·D the LM head, plus the attention products (QKᵀ, AV: 4·L·S²·H·d
    per sequence forward, causal counted in full). Divided by the measured f32 matmul rate, this is a lower
    bound on the iteration's time: real layers run below the rate of one large square product.
    """
    from benchmarks import _common as C

    m = C.llama_matmul_params(model_dir)
    S = P + T
    body_fwd = 2 * m["body"] * B * S + 4 * m["layers"] * S * S * m["heads"] * m["head_dim"] * B
    head_fwd = 2 * m["head"] * B * T
    return {"generate": 2 * m["body"] * B * (P + T - 1) + head_fwd,
            "score": (body_fwd + head_fwd) + body_fwd,
            "train": 3 * (body_fwd + head_fwd) + 3 * body_fwd}


def summary(rows: list[dict]) -> dict:
    """Medians of the rows' seconds; a row without a split (Tunix) has NaN parts, train = the rest."""
    full = [{"generate_s": float("nan"), "score_s": float("nan"), **r} for r in rows]
    full = [{**r, "train_s": r.get("train_s", r["iteration_s"] - r["generate_s"] - r["score_s"])} for r in full]
    return {k: statistics.median(r[k] for r in full) for k in ("iteration_s", "generate_s", "score_s", "train_s")}


def peer_argv(name: str, model_dir: pathlib.Path, prompts: pathlib.Path, args) -> tuple[list[str], dict]:
    """Command line and environment of one peer worker (kept alive across rounds)."""
    common = ["--warmup", str(args.warmup), "--iters", str(args.iters), "--rounds", str(args.rounds)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_DISABLED": "true", "JAX_PLATFORMS": "cpu"}
    if name == "trl":
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / ".trl112"), str(ROOT)])
        return [str(ROOT / ".venv-trl" / "bin" / "python"), __file__, "--peer", str(model_dir), str(prompts),
                "--micro-batches", str(args.micro_batches), *common], env
    env["PYTHONPATH"] = str(ROOT)
    return [str(ROOT / ".venv-tunix" / "bin" / "python"), str(ROOT / "benchmarks" / "bench_tunix.py"), "ppo",
            "--model", str(model_dir), "--prompts", str(prompts), *common], env


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=["tiny", "small", "both"])
    ap.add_argument("--iters", type=int, default=2, help="iterations per round (each side)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds: peer, ours, peer, ours, ...")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--peers", default="trl", help="comma-separated: trl, tunix")
    ap.add_argument("--micro-batches", type=int, default=1,
                    help="gradient accumulation inside the one optimizer step, the same on both sides")
    ap.add_argument("--work", default=None, help="folder for models and outputs (default: a temp dir)")
    ap.add_argument("--peer", nargs=2, metavar=("MODEL_DIR", "PROMPTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.peer:  # same allocator tunable for both sides (the peer inherits it): rlhf_jax/runtime/host_memory.py
        from rlhf_jax.runtime.host_memory import reexec_with_host_tunables

        reexec_with_host_tunables(sys.argv)
    if args.peer:  # inside the TRL venv
        run_trl_peer(*args.peer, warmup=args.warmup, iters=args.iters, rounds=args.rounds,
                     micro_batches=args.micro_batches)
        return
    from benchmarks import _common as C
    from benchmarks import _rounds as R

    root = pathlib.Path(args.work or tempfile.mkdtemp(prefix="bench-ppo-"))
    names = [n for n in args.peers.split(",") if n]
    records = []
    for size in (["tiny", "small"] if args.model == "both" else [args.model]):
        model_dir, prompts = build_models(root, size)
        peers = []
        try:
            for name in names:  # one at a time: a peer's start-up and warm-up never overlap anything timed
                argv, env = peer_argv(name, model_dir, prompts, args)
                peers.append(R.Peer(name, argv, env=env, cwd=str(ROOT)))
                peers[-1].wait_ready()
            peer_rounds = {p.name: [] for p in peers}
            state = {}

            def before_round(r: int) -> None:
                if r == 0:
                    state["before"] = R.machine_state()
                for p in peers:
                    peer_rounds[p.name].append(p.round()["rows"])

            ours = run_ours(model_dir, prompts, root / f"ours-{size}", warmup=args.warmup, iters=args.iters,
                            rounds=args.rounds, micro_batches=args.micro_batches, before_round=before_round)
            state["after"] = R.machine_state()
        finally:
            for p in peers:
                p.close()
        o_rounds = [summary(rows) for rows in ours["rounds"]]
        o_all = summary([row for rows in ours["rounds"] for row in rows])
        rows = [("model", f"llama {size}"),
                ("workload", f"{B} rollouts x {T} new tokens, prompt {P}, 1 epoch x 1 minibatch "
                              f"({args.micro_batches} micro-batch{'es' if args.micro_batches > 1 else ''}), f32"),
                ("rounds", f"{args.rounds} x {args.iters} iterations per side after {args.warmup} warm-up "
                           "(peer start-up and warm-up not counted)"),
                ("rlhf_jax s/iteration (median; per round)",
                 f"{o_all['iteration_s']:.3f}  {[round(x['iteration_s'], 3) for x in o_rounds]}"),
                ("  generate / score / train (s)", " / ".join(f"{o_all[k]:.3f}" for k in ("generate_s", "score_s", "train_s")))]
        rec = {"size": size, "ours": {**ours, "median": o_all}, "peers": {}, "rounds": args.rounds, "iters": args.iters}
        for p in peers:
            pr = [summary(rws) for rws in peer_rounds[p.name]]
            p_all = summary([row for rws in peer_rounds[p.name] for row in rws])
            ratio = R.ratio_stats([x["iteration_s"] for x in pr], [x["iteration_s"] for x in o_rounds])
            rows += [(f"{p.name} s/iteration (median; per round)",
                      f"{p_all['iteration_s']:.3f}  {[round(x['iteration_s'], 3) for x in pr]}"),
                     ("  generate / score / train (s)",
                      " / ".join(f"{p_all[k]:.3f}" for k in ("generate_s", "score_s", "train_s"))),
                     (f"speed-up ({p.name} / ours)", R.fmt_ratio(ratio)),
                     (f"  {p.name}: {p.ready.get('framework', '')}", f"start-up + warm-up {p.startup_s:.1f} s")]
            rec["peers"][p.name] = {**p.ready, "rounds": peer_rounds[p.name], "median": p_all, "speedup": ratio,
                                    "startup_s": p.startup_s}
        gflops = (state["before"]["xla_matmul_gflops"] + state["after"]["xla_matmul_gflops"]) / 2
        flops = iteration_flops(model_dir)
        floor = {k: v / (gflops * 1e9) for k, v in flops.items()}
        rows += [("compute floor at the mean XLA rate (s)", f"{sum(floor.values()):.3f}  (generate / score / train "
                                                            + " / ".join(f"{floor[k]:.2f}" for k in flops) + ")"),
                 *R.state_rows(state["before"], state["after"])]
        C.print_table(rows, title=f"PPO iteration, llama-{size}")
        records.append({**rec, "state": state, "iteration_flops": flops, "compute_floor_s": floor})
    C.emit_json({"bench": "ppo", "B": B, "P": P, "T": T, "results": records, "machine": C.machine_info()})


if __name__ == "__main__":
    main()
