"""One GRPO iteration: rlhf_jax's trainer vs TRL's `GRPOTrainer`, same CPU, same run, same weights.

Workload (/work/shared/peers/README.md): 8 prompts × 4 generations, prompts of exactly 64 tokens, exactly
64 new tokens (EOS suppressed: `min_new_tokens` = 64), temperature 1, a Python reward (fraction of
completion tokens that are digits), group-normalised advantages, KL to a frozen reference with β = 0.04
(k3 in the loss), token-mean loss (TRL `loss_type="dapo"`), one AdamW step (lr 1e-5, clip 1.0).
Models: Llama-style `tiny` (hidden 256 × 4 layers, 7M) and `small` (~100M), random weights written once
with our `save_pretrained` plus the fixture BPE tokenizer (8,192 tokens), loaded by both sides.

Each peer runs in its own virtualenv as ONE long-lived subprocess (TRL: `--trl-python`, default
.venv-trl/bin/python, this file with `--trl-worker`; Tunix: .venv-tunix, `benchmarks/bench_tunix.py grpo`),
loads and warms up before anything is timed (not counted), then `--rounds` interleaved rounds of `--iters`
iterations run (peer, ours, peer, ours, ...; the idle side waits on a pipe, never competing for the cores).
Reported: medians, the speed-up of every round with its median and min–max, the XLA and torch 2048³ matmul
rates before and after, load average, GLIBC_TUNABLES, and each side's time split:
  * ours: generate (sampling + decode + reward) / score (actor + reference log-probs, advantages) / train;
  * TRL: generation (`_generate_single_turn`) / the rest of `_generate_and_score_completions` (reward,
    reference log-probs, advantages) / train (the remainder of the Trainer step).

  * Tunix: the total only (one step = the time between the learner's pulls of a batch).

Usage: python benchmarks/grpo.py [--model tiny|small|both] [--rounds 3] [--iters 2] [--warmup 1] [--peers trl,tunix]
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
def trl_worker(model_dir: str, prompts_file: str, iters: int, warmup: int, rounds: int) -> None:
    """Runs inside the TRL virtualenv: `GRPOTrainer` as a long-lived round worker (`benchmarks/_rounds.py`)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(REPO))
    from benchmarks import _rounds as R

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompts = json.loads(pathlib.Path(prompts_file).read_text())
    steps = warmup + rounds * iters
    digit_ids = {i for i in range(len(tok)) if (s := tok.decode([i]).strip()) and s.isdigit()}

    def reward(completions, completion_ids, **kw):
        return [sum(t in digit_ids for t in ids) / max(len(ids), 1) for ids in completion_ids]

    split = {"generate_s": 0.0, "gas_s": 0.0}
    import trl

    timer = R.trainer_round_callback(
        warmup=warmup, iters=iters, rounds=rounds, split=split,
        info=lambda: {"framework": f"trl {trl.__version__} GRPOTrainer, torch {torch.__version__}",
                      "threads": torch.get_num_threads()})
    cfg = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-grpo-"), max_steps=steps, learning_rate=LR,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=10_000,
                     save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, bf16=False, fp16=False,
                     seed=0, data_seed=0, dataloader_num_workers=0, gradient_accumulation_steps=1, max_grad_norm=1.0,
                     gradient_checkpointing=False, dataloader_pin_memory=False,
                     per_device_train_batch_size=N_PROMPTS * G, num_generations=G, max_completion_length=C,
                     temperature=1.0, top_p=1.0, top_k=0, generation_kwargs={"min_new_tokens": C}, beta=BETA,
                     loss_type="dapo", scale_rewards="group", num_iterations=1, shuffle_dataset=False,
                     log_completions=False)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=cfg,
                          train_dataset=Dataset.from_dict({"prompt": [prompts[i % len(prompts)]
                                                                      for i in range(N_PROMPTS * steps)]}),
                          processing_class=tok, callbacks=[timer])
    for name, key in (("_generate_single_turn", "generate_s"), ("_generate_and_score_completions", "gas_s")):
        fn = getattr(trainer, name)

        def wrapped(*a, _fn=fn, _k=key, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                split[_k] += time.perf_counter() - t0

        setattr(trainer, name, wrapped)
    trainer.train()


# ------------------------------------------------------------------------------------------- our side
def ours(model_dir: pathlib.Path, prompts: list[str], work: pathlib.Path, args, before_round) -> dict:
    from benchmarks import _rounds as R
    from rlhf_jax import tasks
    from rlhf_jax.config import load_config
    from rlhf_jax.recipes import grpo

    import shutil

    steps = args.warmup + args.rounds * args.iters
    shutil.rmtree(work / "run", ignore_errors=True)  # a fresh run folder (a reused --work holds checkpoints)
    data = tasks.write_jsonl(work / "prompts.jsonl", [{"prompt": prompts[i % len(prompts)]}
                                                      for i in range(N_PROMPTS * steps)])
    cfg = load_config(grpo.GRPOConfig, None, (
        f"model.path={model_dir}", f"data.path={data}", f"data.max_prompt_len={P}", "data.shuffle=false",
        f"reward.functions=[{pathlib.Path(__file__).resolve()}:digit_fraction]", "algo.preset=grpo",
        f"algo.group_size={G}", "algo.loss_agg_mode=token-mean", f"algo.kl_coef={BETA}", "algo.kl_kind=k3",
        "algo.kl_placement=loss", f"rollout.batch_size={N_PROMPTS}", f"rollout.max_new_tokens={C}",
        f"rollout.min_new_tokens={C}", f"actor_optim.learning_rate={LR}", f"run.total_steps={steps}",
        f"run.output_dir={work / 'run'}", "run.resume=never", "run.tensorboard=false", "run.progress=off",
        "run.log_every=1000", *args.ours_override))
    undo = R.gated_run_loop(grpo, warmup=args.warmup, iters=args.iters, rounds=args.rounds, before_round=before_round)
    try:
        res = grpo.train(cfg)
    finally:
        undo()
    rows = [{"iteration_s": sum(h[f"time/{k}"] for k in ("generate", "score", "train")),
             **{f"{k}_s": h[f"time/{k}"] for k in ("generate", "score", "train")}} for h in res["history"]]
    w, n = args.warmup, args.iters
    return {"rounds": [rows[w + r * n: w + (r + 1) * n] for r in range(args.rounds)], "first_iter_s": rows[0]["iteration_s"]}


def summary(rows: list[dict]) -> dict:
    """Medians over rows; TRL rows carry generate_s and gas_s (generate + score), Tunix rows only the total."""
    def full(r):
        if "gas_s" in r:
            return {"iteration_s": r["iteration_s"], "generate_s": r["generate_s"], "score_s": r["gas_s"] - r["generate_s"],
                    "train_s": r["iteration_s"] - r["gas_s"]}
        return {"generate_s": float("nan"), "score_s": float("nan"), "train_s": float("nan"), **r}
    rows = [full(r) for r in rows]
    return {k: statistics.median(r[k] for r in rows) for k in ("iteration_s", "generate_s", "score_s", "train_s")}


def prepare(size: str, root: pathlib.Path) -> pathlib.Path:
    """Model folder with weights (our save_pretrained) and the fixture tokenizer (8,192 tokens)."""
    from benchmarks import _common as C_
    from rlhf_jax import fixtures

    model_dir = C_.build_llama(root / size, size)
    if not (model_dir / "tokenizer.json").exists():
        fixtures.build_tokenizer(root / "tokenizer", vocab_size=8192).save_pretrained(model_dir)
    return model_dir


def peer_argv(name: str, model_dir: pathlib.Path, pfile: pathlib.Path, args) -> list[str]:
    common = ["--warmup", str(args.warmup), "--iters", str(args.iters), "--rounds", str(args.rounds)]
    if name == "trl":
        return [args.trl_python, __file__, "--trl-worker", str(model_dir), str(pfile), *common]
    return [str(REPO / ".venv-tunix" / "bin" / "python"), str(REPO / "benchmarks" / "bench_tunix.py"), "grpo",
            "--model", str(model_dir), "--prompts", str(pfile), *common]


def run_one(size: str, args, root: pathlib.Path) -> dict:
    from benchmarks import _common as C_
    from benchmarks import _rounds as R
    from rlhf_jax.train.run import load_tokenizer

    model_dir = prepare(size, root)
    tok = load_tokenizer(str(model_dir))
    steps = args.warmup + args.rounds * args.iters
    prompts = word_prompts(tok, N_PROMPTS * steps, P, seed=0)
    pfile = root / f"prompts_{size}.json"
    pfile.write_text(json.dumps(prompts))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    peers, state, peer_rounds = [], {}, {}
    try:
        for name in [n for n in args.peers.split(",") if n]:  # one at a time; start-up and warm-up not counted
            peers.append(R.Peer(name, peer_argv(name, model_dir, pfile, args), env=env, cwd=str(REPO)))
            peers[-1].wait_ready()
            peer_rounds[name] = []

        def before_round(r: int) -> None:
            if r == 0:
                state["before"] = R.machine_state()
            for p in peers:
                peer_rounds[p.name].append(p.round()["rows"])

        with tempfile.TemporaryDirectory() as tmp:
            mine = ours(model_dir, prompts, pathlib.Path(tmp), args, before_round)
        state["after"] = R.machine_state()
    finally:
        for p in peers:
            p.close()
    o_rounds = [summary(rows) for rows in mine["rounds"]]
    o_all = summary([r for rows in mine["rounds"] for r in rows])
    rows = [("rounds", f"{args.rounds} x {args.iters} iterations per side after {args.warmup} warm-up "
                       "(peer start-up and warm-up not counted)"),
            ("rlhf_jax s/iter (median; per round)", f"{o_all['iteration_s']:.3f}  {[round(x['iteration_s'], 3) for x in o_rounds]}"),
            ("  generate / score / train", " / ".join(f"{o_all[k]:.3f}" for k in ("generate_s", "score_s", "train_s"))),
            ("  first iteration (compile)", f"{mine['first_iter_s']:.1f}")]
    rec = {"model": size, "ours": {**mine, "median": o_all}, "peers": {}, "state": state}
    for p in peers:
        pr = [summary(rws) for rws in peer_rounds[p.name]]
        p_all = summary([r for rws in peer_rounds[p.name] for r in rws])
        ratio = R.ratio_stats([x["iteration_s"] for x in pr], [x["iteration_s"] for x in o_rounds])
        rows += [(f"{p.name} s/iter (median; per round)", f"{p_all['iteration_s']:.3f}  {[round(x['iteration_s'], 3) for x in pr]}"),
                 ("  generate / score / train", " / ".join(f"{p_all[k]:.3f}" for k in ("generate_s", "score_s", "train_s"))),
                 (f"speed-up ({p.name} / rlhf_jax)", R.fmt_ratio(ratio)),
                 (f"  {p.name}: {p.ready.get('framework', '')}", f"start-up + warm-up {p.startup_s:.1f} s")]
        rec["peers"][p.name] = {**p.ready, "rounds": peer_rounds[p.name], "median": p_all, "speedup": ratio,
                                "startup_s": p.startup_s}
    rows += R.state_rows(state["before"], state["after"])
    C_.print_table(rows, title=f"GRPO iteration, {size}: {N_PROMPTS} prompts x {G} generations, {C} new tokens")
    return rec


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--trl-worker":
        ap = argparse.ArgumentParser()
        ap.add_argument("--trl-worker", nargs=2)
        for k in ("--warmup", "--iters", "--rounds"):
            ap.add_argument(k, type=int, required=True)
        a = ap.parse_args()
        trl_worker(*a.trl_worker, a.iters, a.warmup, a.rounds)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("tiny", "small", "both"), default="both")
    ap.add_argument("--iters", type=int, default=2, help="iterations per round (each side)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds: peer, ours, peer, ours, ...")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--peers", default="trl", help="comma-separated: trl, tunix")
    ap.add_argument("--ours-override", action="append", default=[],
                    help="extra config override for our run, e.g. rollout.weight_layout=in_out (repeatable)")
    ap.add_argument("--trl-python", default=str(REPO / ".venv-trl" / "bin" / "python"))
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "rlhf_jax_bench_models"))
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from rlhf_jax.runtime.host_memory import reexec_with_host_tunables

    reexec_with_host_tunables(sys.argv)  # same allocator tunable for both sides (the workers inherit it)
    from benchmarks import _common as C_

    root = pathlib.Path(args.cache)
    root.mkdir(parents=True, exist_ok=True)
    sizes = ("tiny", "small") if args.model == "both" else (args.model,)
    results = [run_one(s, args, root) for s in sizes]
    C_.emit_json({"bench": "grpo", "results": results, "machine": C_.machine_info()})


if __name__ == "__main__":
    main()
