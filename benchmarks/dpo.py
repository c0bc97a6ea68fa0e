"""One DPO optimizer step: rlhf_jax vs TRL's `DPOTrainer` (PyTorch), same CPU, same run, same weights.

Workload (as /work/shared/peers/README.md): 8 pairs, prompt 64 + completion 64 tokens (chosen and
rejected each exactly 128 tokens), loss sigmoid, β = 0.1, AdamW lr 1e-5, grad-norm clip 1.0, frozen
reference model in memory. Models: Llama-style `tiny` (hidden 256 × 4) and `small` (~100M, hidden
768 × 12), written once with our `save_pretrained` (`benchmarks/_common.build_llama`) so both sides load
the same weights. Each peer is ONE long-lived subprocess of its own venv (TRL: .venv-trl, torch 2.13, trl 1.16,
2 threads, this file with `--trl-worker`; Tunix: .venv-tunix, `benchmarks/bench_tunix.py dpo`) that loads
and warms up before anything is timed (not counted); then `--rounds` interleaved rounds of `--iters` steps
(peer, ours, peer, ours, ...; the idle side waits on a pipe). Reported: the speed-up of every round, median
and min–max, the XLA and torch 2048³ matmul rates before and after, load average, GLIBC_TUNABLES.

Our step = reference forward (jitted, reference params as arguments) + policy forward/backward over the
2B = 16 stacked rows + AdamW, exactly what `rlhf-jax dpo` runs with `data.max_completion_len=64` (the
workload's completion length): the LM head then runs on the 64 completion positions of each row only
(`algos.preference_rows.completion_logps`). TRL's default (`use_logits_to_keep=False`) runs it on all 128. Each
pair's 64-token prompt goes through the layers once for both completions (`share_prompt`, on by default:
`recipes.dpo.shared_prompt_width`), as the same prompt ids are both rows' first 64 tokens, like TRL's rows.
Also timed: the step with precomputed reference log-probs (`precompute_ref_logps: true`, after the rounds);
the step's achieved rate is reported against the mean of the XLA matmul rates before and after the rounds:

    model FLOPs per step = 6·N·tokens (policy fwd + bwd) + 2·N·tokens (reference fwd)
                           + 4 × (QKᵀ and AV products: 4·L·S²·H·d_head per sequence, causal counted in full)

with N the matmul parameters (embedding lookup excluded), tokens = 16 × 128: the usual model-FLOPs count,
every position through the LM head. Also reported: the rate of the FLOPs our step executes, with the head
on the 16 × 64 completion positions only (8·H·16·64 instead of 8·H·16·128, H the head's V·D).

Usage: python benchmarks/dpo.py [--model tiny|small|both] [--rounds 3] [--iters 3] [--warmup 2] [--peers trl,tunix]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile

B, P, C = 8, 64, 64
BETA, LR = 0.1, 1e-5
TRL_PYTHON = pathlib.Path(__file__).resolve().parents[1] / ".venv-trl" / "bin" / "python"
TUNIX_PYTHON = pathlib.Path(__file__).resolve().parents[1] / ".venv-tunix" / "bin" / "python"


# ------------------------------------------------------------------------------------- TRL worker
def trl_worker(model_dir: str, iters: int, warmup: int, rounds: int) -> None:
    """DPOTrainer steps as a long-lived round worker (`benchmarks/_rounds.py`; runs in the TRL venv, no jax)."""
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_DISABLED="true",
                      ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    import numpy as np
    import torch

    torch.set_num_threads(2)
    import transformers
    from datasets import Dataset
    from tokenizers import Tokenizer, models as tmodels
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from benchmarks import _rounds as R

    transformers.logging.set_verbosity_error()
    transformers.set_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = model.config.vocab_size
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tmodels.WordLevel({f"t{i}": i for i in range(vocab)},
                                                                                 unk_token="t3")),
                                  pad_token="t0", bos_token="t1", eos_token="t2", unk_token="t3")
    steps = warmup + rounds * iters
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(4, vocab, size=n).tolist()  # noqa: E731
    rows = {"prompt_ids": [ids(P) for _ in range(B * steps)],
            "chosen_ids": [ids(C - 1) + [2] for _ in range(B * steps)],
            "rejected_ids": [ids(C - 1) + [2] for _ in range(B * steps)]}
    text = Dataset.from_dict({"prompt": ["t5"] * B * steps, "chosen": [" t6"] * B * steps,
                              "rejected": [" t7"] * B * steps})

    import trl

    timer = R.trainer_round_callback(
        warmup=warmup, iters=iters, rounds=rounds,
        info=lambda: {"framework": f"trl {trl.__version__} DPOTrainer, torch {torch.__version__}",
                      "params": sum(p.numel() for p in model.parameters()), "threads": torch.get_num_threads()})
    cfg = DPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-dpo-"), max_steps=steps, learning_rate=LR,
                    lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=10_000,
                    save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, bf16=False, fp16=False,
                    seed=0, dataloader_num_workers=0, dataloader_pin_memory=False, gradient_accumulation_steps=1,
                    max_grad_norm=1.0, per_device_train_batch_size=B, beta=BETA, loss_type=["sigmoid"],
                    max_length=None, precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=model, ref_model=None, args=cfg, train_dataset=text, processing_class=tok,
                         callbacks=[timer])
    trainer.train_dataset = Dataset.from_dict(rows)
    batch = next(iter(trainer.get_train_dataloader()))
    assert tuple(batch["input_ids"].shape) == (2 * B, P + C), batch["input_ids"].shape
    assert int(batch["completion_mask"].sum()) == 2 * B * C
    trainer.train()


# ------------------------------------------------------------------------------------------ ours
def model_flops(cfg, params, *, shared_prompt: bool = False) -> tuple[float, float]:
    """Matmul FLOPs of one DPO step: (model FLOPs, FLOPs our step executes); see the module docstring.
    ``shared_prompt``: each pair's prompt goes through the layers once (B·P tokens, not 2B·P; attention as
    without)."""
    import jax
    import numpy as np

    n_all = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    n = n_all - cfg.vocab_size * cfg.hidden_size  # embedding lookup is not a matmul
    if cfg.tie_word_embeddings:
        n += cfg.vocab_size * cfg.hidden_size
    s, tokens = P + C, 2 * B * (P + C)
    attn_fwd = 2 * B * 4 * cfg.num_layers * s * s * cfg.num_heads * cfg.head_dim  # QK^T and AV, 2B rows
    model = 8 * n * tokens + 4 * attn_fwd  # policy fwd+bwd (3x) + reference fwd (1x) of attention
    head = cfg.vocab_size * cfg.hidden_size
    executed = model - 8 * head * 2 * B * (s - C)  # the head on completions only
    if shared_prompt:
        executed -= 8 * (n - (0 if cfg.tie_word_embeddings else head)) * B * P
    return model, executed


def run_ours(model_dir: pathlib.Path, iters: int, warmup: int, rounds: int, before_round) -> dict:
    """Our step, `warmup` untimed, then `rounds` × `iters` timed steps with `before_round(r)` (the peers' round)
    before each round's; then the step with precomputed reference log-probs (once, after the rounds)."""
    import jax
    import numpy as np

    from benchmarks import _common as Cm
    from rlhf_jax.run_config import OptimConfig
    from rlhf_jax.data import DataConfig, PreferenceBatch
    from rlhf_jax.sharding import MeshConfig
    from rlhf_jax.train.optim import make_optimizer
    from rlhf_jax.train.state import create_train_state
    from rlhf_jax.train.step import make_train_step
    from rlhf_jax.algos import preference as pref
    from rlhf_jax.recipes import dpo
    from rlhf_jax.train import reference as pc
    from rlhf_jax.train import run as common

    from rlhf_jax import models
    from rlhf_jax import sharding as shd

    mesh = common.make_mesh(MeshConfig())

    def load_placed():
        model, params = models.load_pretrained(model_dir)
        sh = shd.param_shardings(model, mesh)
        return model, jax.device_put(params, sh), sh

    model, params, p_sh = load_placed()
    _, ref_params, _ = load_placed()
    cfg = model.config
    rng = np.random.default_rng(0)
    s = P + C

    prompt = rng.integers(4, cfg.vocab_size, size=(B, P)).astype(np.int32)  # one prompt per pair, as TRL's rows

    def side():
        ids = np.concatenate([prompt, rng.integers(4, cfg.vocab_size, size=(B, C)).astype(np.int32)], axis=1)
        ids[:, -1] = 2
        loss = np.zeros((B, s), np.int32)
        loss[:, P:] = 1
        return ids, np.ones((B, s), np.int32), loss

    batch = pref.PairBatch(PreferenceBatch(*side(), *side()), np.zeros(B, np.float32), np.zeros(B, np.float32))
    batch = shd.shard_batch(batch, mesh)
    tx = make_optimizer(OptimConfig(learning_rate=LR, max_grad_norm=1.0), 100)
    state, state_sh = create_train_state(params, tx, mesh=mesh, params_shardings=p_sh)
    loss = pref.PreferenceLossConfig(algorithm="dpo", loss_type="sigmoid", beta=BETA)
    run_cfg = dpo.DPOConfig(model=common.ModelLoadConfig(path=str(model_dir)), loss=loss,
                            data=DataConfig(path="-", max_prompt_len=P, max_completion_len=C, max_seq_len=s))
    width, pw = dpo.completion_width(run_cfg.data), dpo.shared_prompt_width(run_cfg)  # as `rlhf-jax dpo` runs
    step = make_train_step(pref.make_loss_fn(model, loss, completion_width=width, prompt_width=pw), tx=tx, mesh=mesh,
                           state_shardings=state_sh)
    attach = pc.make_ref_attacher(model, mesh=mesh, params_shardings=p_sh, completion_width=width, prompt_width=pw)
    key = jax.random.key(0)
    box = [state]

    def live():
        box[0], m = step(box[0], attach(ref_params, batch), key)
        jax.block_until_ready(m.loss)

    precomputed_batch = attach(ref_params, batch)
    jax.block_until_ready(precomputed_batch)

    def precomputed():
        box[0], m = step(box[0], precomputed_batch, key)
        jax.block_until_ready(m.loss)

    for _ in range(warmup):
        live()
    t_rounds = []
    for r in range(rounds):
        before_round(r)
        t_rounds.append(list(Cm.time_call(live, warmup=0, iters=iters).times_s))
    t_pre = Cm.time_call(precomputed, warmup=1, iters=iters)
    assert step.jitted._cache_size() == 1
    return {"rounds": t_rounds, "precomputed_s_per_step": t_pre.median_s,
            "flops_per_step": model_flops(cfg, params)[0],
            "executed_flops_per_step": model_flops(cfg, params, shared_prompt=pw is not None)[1],
            "params": Cm.param_count(params)}


def peer_argv(name: str, model_dir: pathlib.Path, args) -> list[str]:
    common = ["--warmup", str(args.warmup), "--iters", str(args.iters), "--rounds", str(args.rounds)]
    if name == "trl":
        return [str(TRL_PYTHON), __file__, "--trl-worker", str(model_dir), *common]
    return [str(TUNIX_PYTHON), str(pathlib.Path(__file__).resolve().parent / "bench_tunix.py"), "dpo",
            "--model", str(model_dir), *common]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="both", choices=["tiny", "small", "both"])
    ap.add_argument("--iters", type=int, default=3, help="steps per round (each side)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds: peer, ours, peer, ours, ...")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peers", default="trl", help="comma-separated: trl, tunix")
    ap.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:
        trl_worker(args.trl_worker, args.iters, args.warmup, args.rounds)
        return
    root_dir = pathlib.Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root_dir))
    from rlhf_jax.runtime.host_memory import reexec_with_host_tunables

    reexec_with_host_tunables(sys.argv)  # same allocator tunable for both sides (the workers inherit it)
    from benchmarks import _common as Cm
    from benchmarks import _rounds as R

    root = pathlib.Path(os.environ.get("RLHF_JAX_BENCH_MODELS", pathlib.Path(tempfile.gettempdir()) / "rlhf_jax_bench"))
    sizes = ["tiny", "small"] if args.model == "both" else [args.model]
    record = {"machine": Cm.machine_info(), "workload": f"{B} pairs, {P}+{C} tokens"}
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root_dir)}
    for size in sizes:
        model_dir = Cm.build_llama(root / f"llama-{size}", size)
        peers, state, peer_rounds = [], {}, {}
        try:
            for name in [n for n in args.peers.split(",") if n]:  # one at a time; start-up/warm-up not counted
                peers.append(R.Peer(name, peer_argv(name, model_dir, args), env=env, cwd=str(root_dir)))
                peers[-1].wait_ready()
                peer_rounds[name] = []

            def before_round(r: int) -> None:
                if r == 0:
                    state["before"] = R.machine_state()
                for p in peers:
                    peer_rounds[p.name].append([row["iteration_s"] for row in p.round()["rows"]])

            ours = run_ours(model_dir, args.iters, args.warmup, args.rounds, before_round)
            state["after"] = R.machine_state()
        finally:
            for p in peers:
                p.close()
        med = statistics.median
        o_round = [med(t) for t in ours["rounds"]]
        o_all = med([t for ts in ours["rounds"] for t in ts])
        gflops = (state["before"]["xla_matmul_gflops"] + state["after"]["xla_matmul_gflops"]) / 2
        achieved = ours["flops_per_step"] / o_all / 1e9
        executed = ours["executed_flops_per_step"] / o_all / 1e9
        rec = {"ours": {**ours, "s_per_step": o_all}, "peers": {}, "state": state, "matmul_f32_gflops": gflops,
               "achieved_gflops": achieved, "fraction_of_matmul": achieved / gflops, "executed_gflops": executed,
               "executed_fraction_of_matmul": executed / gflops}
        rows = [(f"{size} ({ours['params'] / 1e6:.1f}M): rounds", f"{args.rounds} x {args.iters} steps per side after "
                 f"{args.warmup} warm-up (peer start-up and warm-up not counted)"),
                (f"{size}: ours s/step (median; per round)", f"{o_all:.3f}  {[round(x, 3) for x in o_round]}"),
                (f"{size}: ours, precomputed ref, s/step", f"{ours['precomputed_s_per_step']:.3f}")]
        for p in peers:
            p_round = [med(t) for t in peer_rounds[p.name]]
            ratio = R.ratio_stats(p_round, o_round)
            p_all = med([t for ts in peer_rounds[p.name] for t in ts])
            rec["peers"][p.name] = {**p.ready, "rounds": peer_rounds[p.name], "s_per_step": p_all, "speedup": ratio,
                                    "startup_s": p.startup_s}
            rows += [(f"{size}: {p.name} s/step (median; per round)", f"{p_all:.3f}  {[round(x, 3) for x in p_round]}"),
                     (f"{size}: speed-up ({p.name} / ours)", R.fmt_ratio(ratio)),
                     (f"  {p.name}: {p.ready.get('framework', '')}", f"start-up + warm-up {p.startup_s:.1f} s")]
        rows += [(f"{size}: achieved GFLOP/s (fraction of mean XLA matmul)", f"{achieved:.1f} ({achieved / gflops:.0%})"),
                 (f"{size}: executed GFLOP/s (fraction of mean XLA matmul)", f"{executed:.1f} ({executed / gflops:.0%})"),
                 *R.state_rows(state["before"], state["after"])]
        record[size] = rec
        Cm.print_table(rows, title=f"DPO step, {size}: rlhf_jax vs peers (same CPU, same run)")
    Cm.emit_json(record)


if __name__ == "__main__":
    main()
