"""Rollout throughput: our jitted sampler vs `transformers` PyTorch `generate(use_cache=True)`, same CPU,
same run, same weights (written once with our `save_pretrained`).

Setup: Llama-style models (tiny: hidden 256 × 4 layers; small: ~100M, hidden 768 × 12 layers, GQA 12/2),
16 prompts × 64 tokens (left-padded, random lengths 32..64), 128 new tokens sampled at temperature 1
with EOS suppressed (`min_new_tokens` = `max_new_tokens`) so both sides produce exactly 128 tokens.

Both models are loaded and warmed once in this process; then `--rounds` interleaved rounds (torch, ours,
torch, ours, ...) of `--iters` generate calls each. Printed: tokens/s (medians over all calls), the speed-up
per round with its median and min–max, the XLA and torch f32 2048³ matmul rates before and after the rounds,
the load average and GLIBC_TUNABLES.

Also reports how close one decode step is to this CPU's limits, at the benchmark's batch and at each of
`--floor-batches` (default 64 and 256, the RL batch sizes; our sampler only):
  * decode step: (time of T new tokens − time of 1 new token) / (T − 1), same prefill;
  * matmul floor: the step's matrix products alone (projections, MLP, attention over the cache, LM head)
    timed as a jitted loop of plain `jnp` dots;
  * bandwidth floor: bytes read per step (all weights + the whole KV cache) ÷ measured read bandwidth.

Usage: python benchmarks/rollout.py [--model tiny|small|both] [--rounds 3] [--iters 2] [--warmup 1]
       [--floor-batches 64,256] [--quick]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # the CLI's allocator tunables (rlhf_jax/runtime/host_memory.py), set before JAX starts;
    from rlhf_jax.runtime.host_memory import reexec_with_host_tunables  # torch runs in this process: both sides share them

    reexec_with_host_tunables(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _common as C  # noqa: E402


def make_prompts(*, batch: int, prompt_len: int, vocab: int, pad_id: int, seed: int = 0):
    """Random left-padded prompts with lengths in [prompt_len // 2, prompt_len] (ids avoid 0..2)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_len // 2, prompt_len + 1, size=batch)
    lengths[0] = prompt_len
    ids = np.full((batch, prompt_len), pad_id, np.int32)
    mask = np.zeros((batch, prompt_len), np.int32)
    for i, n in enumerate(lengths):
        ids[i, prompt_len - n:] = rng.integers(3, vocab, size=n)
        mask[i, prompt_len - n:] = 1
    return ids, mask


def matmul_floor_s(config, *, batch: int, cache_len: int, steps: int = 32) -> float:
    """Seconds per decode step spent in its matrix products alone (no norms/RoPE/softmax/sampling)."""
    D, H, K, hd, F, V, L = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                            config.intermediate_size, config.vocab_size, config.num_layers)
    key = iter(jax.random.split(jax.random.key(1), 9 * L + 1))
    w = lambda *shape: 0.02 * jax.random.normal(next(key), shape, jnp.float32)  # noqa: E731
    # one array per layer (as the sampler's weights and `split_cache` buffers): slicing a stacked [L, ...] array
    # inside the loop would time XLA:CPU's copy of each slice, not the products
    layers = {name: [w(*shape) for _ in range(L)] for name, shape in dict(
        q=(D, H * hd), k=(D, K * hd), v=(D, K * hd), o=(H * hd, D), g=(D, F), u=(D, F), d=(F, D),
        kc=(batch, K, cache_len, hd), vc=(batch, K, cache_len, hd)).items()}
    head = w(D, V)

    def step(x, ws):
        for i in range(L):
            q = (x @ ws["q"][i]).reshape(batch, K, H // K, hd)
            _ = x @ ws["k"][i], x @ ws["v"][i]
            s = jnp.einsum("bkgh,bksh->bkgs", q, ws["kc"][i])
            o = jnp.einsum("bkgs,bksh->bkgh", s, ws["vc"][i]).reshape(batch, H * hd)
            x = x + o @ ws["o"][i] + ((x @ ws["g"][i]) * (x @ ws["u"][i])) @ ws["d"][i]
        return x, x @ ws["head"]

    @jax.jit
    def loop(x, ws):
        def body(_, carry):
            x, acc = carry
            x, logits = step(x, ws)
            return x * 1e-3, acc + logits[:, :1]
        return jax.lax.fori_loop(0, steps, body, (x, jnp.zeros((batch, 1))))

    ws = dict(layers, head=head)
    x = jnp.ones((batch, D), jnp.float32)
    t = C.time_call(lambda: jax.block_until_ready(loop(x, ws)), warmup=1, iters=3).median_s
    return t / steps


def setup_ours(model_dir, ids, mask, *, new_tokens: int, eos: int, pad: int, layout: str = "in_out"):
    """Load our model and compile; returns (run(T) closure, model, params, compile seconds, peak RSS MB).
    ``layout="out_in"`` samples from the ``[out, in]`` copy (``models.to_out_in``, ``rollout.weight_layout``)."""
    from rlhf_jax import models, rollout

    C.reset_peak_rss()
    model, params = models.load_pretrained(model_dir)
    if layout == "auto":  # what `rollout.weight_layout: auto` and `eval` pick for this model on this backend
        from rlhf_jax.models import weight_layout

        layout = "out_in" if weight_layout.pays_off(model, params) else "in_out"
    if layout == "out_in":
        model, params = models.to_out_in(model, params)
    run = lambda T=new_tokens, k=0: jax.block_until_ready(rollout.generate(  # noqa: E731
        model, params, ids, mask, key=jax.random.key(k), max_new_tokens=T, min_new_tokens=T, temperature=1.0,
        eos_token_id=eos, pad_token_id=pad))
    t0 = time.perf_counter()
    out = run()
    first_s = time.perf_counter() - t0
    assert int(out.lengths_B.min()) == new_tokens, "our sampler stopped early despite min_new_tokens"
    t0 = time.perf_counter()
    run()
    return run, model, params, first_s - (time.perf_counter() - t0), C.peak_rss_mb()


def decode_step_s(run, *, new_tokens: int, iters: int) -> tuple[float, float]:
    """(decode-step seconds, prefill + 1 token seconds): the difference between T and 1 new tokens (same
    prefill), per extra step; medians of ``iters`` calls each."""
    t_full = C.time_call(lambda: run(new_tokens), warmup=0, iters=iters).median_s
    run(1)
    t1 = C.time_call(lambda: run(1), warmup=0, iters=iters).median_s
    return (t_full - t1) / max(new_tokens - 1, 1), t1


def setup_torch(model_dir, ids, mask, *, new_tokens: int, eos: int, pad: int, threads: int):
    """Load the HF model; returns (run closure, reference logits, peak RSS MB)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    C.reset_peak_rss()
    m = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tids, tmask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def run():
        with torch.inference_mode():
            return m.generate(input_ids=tids, attention_mask=tmask, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                              eos_token_id=eos, pad_token_id=pad)

    out = run()
    assert out.shape[1] - ids.shape[1] == new_tokens, f"torch produced {out.shape[1] - ids.shape[1]} tokens"
    with torch.inference_mode():
        ref_logits = m(input_ids=tids, attention_mask=tmask).logits.numpy()
    return run, ref_logits, C.peak_rss_mb()


def floors(config, params, *, batch: int, seq: int, read_gbs: float) -> dict:
    """The decode step's matmul floor (timed) and bandwidth floor (all weights + the whole KV cache ÷ read bandwidth)."""
    kv_bytes = 2 * config.num_layers * batch * seq * config.num_kv_heads * config.head_dim * 4
    step_bytes = C.param_bytes(params) + kv_bytes
    return {"matmul_floor_s": matmul_floor_s(config, batch=batch, cache_len=seq), "bytes_per_step": step_bytes,
            "bandwidth_floor_s": step_bytes / (read_gbs * 1e9)}


def bench_size(size: str, args, workdir: pathlib.Path) -> dict:
    import statistics

    from benchmarks import _rounds as R

    model_dir = C.build_llama(workdir / f"llama-{size}", size)
    cfg = C.llama_hf_config(size)
    eos, pad = cfg["eos_token_id"], cfg["pad_token_id"]
    B, P, T = args.batch, args.prompt_len, args.new_tokens
    ids, mask = make_prompts(batch=B, prompt_len=P, vocab=cfg["vocab_size"], pad_id=pad)
    ours_run, model, params, compile_s, ours_rss = setup_ours(model_dir, ids, mask, new_tokens=T, eos=eos, pad=pad,
                                                              layout=args.weight_layout)
    torch_run, ref_logits, torch_rss = setup_torch(model_dir, ids, mask, new_tokens=T, eos=eos, pad=pad,
                                                   threads=args.threads)
    for _ in range(max(args.warmup - 1, 0)):  # both compiled / warmed once above
        ours_run()
        torch_run()
    before = R.machine_state()
    t_ours, t_torch = [], []
    for _ in range(args.rounds):  # interleaved: torch, ours, torch, ours, ...
        t_torch.append(list(C.time_call(torch_run, warmup=0, iters=args.iters).times_s))
        t_ours.append(list(C.time_call(ours_run, warmup=0, iters=args.iters).times_s))
    after = R.machine_state()
    print(f"[rollout {size}] rounds done: torch s/call {t_torch}, ours s/call {t_ours}; the floors follow", flush=True)
    # Same weights on both sides: teacher-forced logits agree on real positions.
    our_logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    logit_diff = float(np.abs(our_logits - ref_logits)[mask.astype(bool)].max())

    config = model.config
    med = statistics.median
    ours_s, torch_s = med([t for ts in t_ours for t in ts]), med([t for ts in t_torch for t in ts])
    ratio = R.ratio_stats([med(ts) for ts in t_torch], [med(ts) for ts in t_ours])
    bw = C.memory_bandwidth_gbs()
    step_s, prefill_s = decode_step_s(ours_run, new_tokens=T, iters=max(args.iters, 3))
    fl = floors(config, params, batch=B, seq=P + T, read_gbs=bw["read_gbs"])
    at_limit = []
    for b in args.floor_batches:  # decode at the RL batch sizes: our step against its floors (no torch run)
        fids, fmask = make_prompts(batch=b, prompt_len=P, vocab=cfg["vocab_size"], pad_id=pad, seed=b)
        run_b, _, _, _, _ = setup_ours(model_dir, fids, fmask, new_tokens=T, eos=eos, pad=pad,
                                       layout=args.weight_layout)
        s_b, _ = decode_step_s(run_b, new_tokens=T, iters=args.iters)
        f_b = floors(config, params, batch=b, seq=P + T, read_gbs=bw["read_gbs"])
        at_limit.append({"batch": b, "decode_step_ms": s_b * 1e3, "matmul_floor_ms": f_b["matmul_floor_s"] * 1e3,
                         "bandwidth_floor_ms": f_b["bandwidth_floor_s"] * 1e3,
                         "bytes_per_step_mb": f_b["bytes_per_step"] / 2**20,
                         "step_over_matmul": s_b / f_b["matmul_floor_s"],
                         "step_over_bandwidth": s_b / f_b["bandwidth_floor_s"],
                         "tokens_per_s": b / s_b})
    return dict(
        model=size, weight_layout=model.config.weight_layout, params=C.param_count(params), batch=B, prompt_len=P, new_tokens=T, iters=args.iters,
        rounds=args.rounds, warmup=args.warmup,
        ours_tokens_per_s=B * T / ours_s, torch_tokens_per_s=B * T / torch_s, speedup=ratio["median"],
        speedup_rounds=ratio, ours_round_s=t_ours, torch_round_s=t_torch,
        ours_median_s=ours_s, torch_median_s=torch_s, ours_compile_s=compile_s, ours_prefill_plus_1_s=prefill_s,
        ours_peak_rss_mb=ours_rss, torch_peak_rss_mb=torch_rss,
        decode_step_ms=step_s * 1e3, matmul_floor_ms=fl["matmul_floor_s"] * 1e3,
        step_over_matmul=step_s / fl["matmul_floor_s"], bytes_per_step_mb=fl["bytes_per_step"] / 2**20,
        copy_bandwidth_gbs=bw["copy_gbs"], read_bandwidth_gbs=bw["read_gbs"],
        bandwidth_floor_ms=fl["bandwidth_floor_s"] * 1e3, step_over_bandwidth=step_s / fl["bandwidth_floor_s"],
        decode_at_limit=at_limit, max_abs_logit_diff_vs_torch=logit_diff, state={"before": before, "after": after},
    )


def print_record(r: dict) -> None:
    from benchmarks import _rounds as R

    rows = [
        ("params", f"{r['params'] / 1e6:.1f} M"),
        ("our weight layout", r.get("weight_layout", "in_out")),
        ("batch × prompt → new", f"{r['batch']} × {r['prompt_len']} → {r['new_tokens']}"),
        ("rounds", f"{r['rounds']} x {r['iters']} generate calls per side, interleaved (torch, ours, ...)"),
        ("ours tokens/s", f"{r['ours_tokens_per_s']:.0f}  (median {r['ours_median_s']:.3f} s)"),
        ("torch tokens/s", f"{r['torch_tokens_per_s']:.0f}  (median {r['torch_median_s']:.3f} s)"),
        ("speedup (ours / torch)", R.fmt_ratio(r["speedup_rounds"])),
        ("ours compile", f"{r['ours_compile_s']:.2f} s"),
        ("peak RSS ours / torch (load + first calls)", f"{r['ours_peak_rss_mb']:.0f} / {r['torch_peak_rss_mb']:.0f} MB"),
        ("bandwidth copy / read", f"{r['copy_bandwidth_gbs']:.1f} / {r['read_bandwidth_gbs']:.1f} GB/s"),
    ]
    for b in [{"batch": r["batch"], "decode_step_ms": r["decode_step_ms"], "matmul_floor_ms": r["matmul_floor_ms"],
               "bandwidth_floor_ms": r["bandwidth_floor_ms"], "bytes_per_step_mb": r["bytes_per_step_mb"],
               "step_over_matmul": r["step_over_matmul"], "step_over_bandwidth": r["step_over_bandwidth"]},
              *r["decode_at_limit"]]:
        rows.append((f"decode step, batch {b['batch']}",
                     f"{b['decode_step_ms']:.2f} ms; matmul floor {b['matmul_floor_ms']:.2f} ms "
                     f"(step / floor {b['step_over_matmul']:.2f}); bandwidth floor {b['bandwidth_floor_ms']:.2f} ms "
                     f"for {b['bytes_per_step_mb']:.0f} MB (step / floor {b['step_over_bandwidth']:.2f})"))
    rows += [("max |logit diff| vs torch", f"{r['max_abs_logit_diff_vs_torch']:.2e}"),
             *R.state_rows(r["state"]["before"], r["state"]["after"])]
    C.print_table(rows, title=f"rollout: {r['model']} Llama, {os.cpu_count()} cores")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "small", "both"], default="both")
    ap.add_argument("--iters", type=int, default=2, help="generate calls per round (each side)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds: torch, ours, torch, ours, ...")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--floor-batches", default="64,256",
                    help="extra batch sizes at which our decode step is compared with its floors ('' = none)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    ap.add_argument("--workdir", default=None, help="where to write the models (default: a temp dir)")
    ap.add_argument("--weight-layout", choices=["auto", "in_out", "out_in"], default="auto",
                    help="ours samples from the loaded [in, out] weights or from the [out, in] copy; auto: what "
                         "the sampler picks for this model (models.weight_layout.pays_off)")
    ap.add_argument("--quick", action="store_true", help="tiny model, batch 4, 16-token prompts, 8 new tokens")
    args = ap.parse_args(argv)
    args.floor_batches = [int(b) for b in args.floor_batches.split(",") if b]
    if args.quick:
        args.model, args.batch, args.prompt_len, args.new_tokens, args.iters, args.warmup = "tiny", 4, 16, 8, 1, 0
        args.rounds, args.floor_batches = 3, [8]
    sizes = ["tiny", "small"] if args.model == "both" else [args.model]
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="rlhf_jax_bench_"))
    machine = C.machine_info()
    records = []
    for size in sizes:  # print each size's table as soon as it is measured
        records.append(bench_size(size, args, workdir))
        print_record(records[-1])
    record = {"benchmark": "rollout", "machine": machine, "results": records}
    C.emit_json(record)
    return record


if __name__ == "__main__":
    main()
