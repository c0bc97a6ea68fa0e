"""Rollout throughput: our jitted sampler vs `transformers` PyTorch `generate(use_cache=True)`, same CPU,
same run, same weights (written once with our `save_pretrained`).

Setup: Llama-style models (tiny: hidden 256 × 4 layers; small: ~100M, hidden 768 × 12 layers, GQA 12/2),
16 prompts × 64 tokens (left-padded, random lengths 32..64), 128 new tokens sampled at temperature 1
with EOS suppressed (`min_new_tokens` = `max_new_tokens`) so both sides produce exactly 128 tokens.

Also reports how close one decode step is to this CPU's limits:
  * matmul floor: the step's matrix products alone (projections, MLP, attention over the cache, LM head)
    at batch 16, timed as a jitted loop of plain `jnp` dots;
  * bandwidth floor: bytes read per step (all weights + the whole KV cache) ÷ measured bandwidth.

Usage: python benchmarks/rollout.py [--model tiny|small|both] [--iters 3] [--warmup 1] [--quick]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

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
    key = iter(jax.random.split(jax.random.key(1), 16))
    w = lambda *shape: 0.02 * jax.random.normal(next(key), shape, jnp.float32)  # noqa: E731
    layers = dict(q=w(L, D, H * hd), k=w(L, D, K * hd), v=w(L, D, K * hd), o=w(L, H * hd, D),
                  g=w(L, D, F), u=w(L, D, F), d=w(L, F, D),
                  kc=w(L, batch, cache_len, K, hd), vc=w(L, batch, cache_len, K, hd))
    head = w(D, V)

    def step(x, ws):
        for i in range(L):
            q = (x @ ws["q"][i]).reshape(batch, K, H // K, hd)
            _ = x @ ws["k"][i], x @ ws["v"][i]
            s = jnp.einsum("bkgh,bskh->bkgs", q, ws["kc"][i])
            o = jnp.einsum("bkgs,bskh->bkgh", s, ws["vc"][i]).reshape(batch, H * hd)
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


def bench_ours(model_dir, ids, mask, *, new_tokens: int, warmup: int, iters: int, eos: int, pad: int):
    from rlhf_jax import models, rollout

    C.reset_peak_rss()
    model, params = models.load_pretrained(model_dir)
    run = lambda T, k=0: jax.block_until_ready(rollout.generate(  # noqa: E731
        model, params, ids, mask, key=jax.random.key(k), max_new_tokens=T, min_new_tokens=T, temperature=1.0,
        eos_token_id=eos, pad_token_id=pad))
    t0 = time.perf_counter()
    out = run(new_tokens)
    first_s = time.perf_counter() - t0
    assert int(out.lengths_B.min()) == new_tokens, "our sampler stopped early despite min_new_tokens"
    timing = C.time_call(lambda: run(new_tokens), warmup=warmup, iters=iters)
    rss = C.peak_rss_mb()
    # Decode-step time: difference between T and 1 new tokens (same prefill), per extra step.
    run(1)
    t1 = C.time_call(lambda: run(1), warmup=0, iters=max(iters, 3)).median_s
    step_s = (timing.median_s - t1) / max(new_tokens - 1, 1)
    return dict(model=model, params=params, timing=timing, compile_s=first_s - timing.median_s, peak_rss_mb=rss,
                step_s=step_s, prefill_s=t1)


def bench_torch(model_dir, ids, mask, *, new_tokens: int, warmup: int, iters: int, eos: int, pad: int, threads: int):
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
    timing = C.time_call(run, warmup=max(warmup - 1, 0), iters=iters)
    with torch.inference_mode():
        ref_logits = m(input_ids=tids, attention_mask=tmask).logits.numpy()
    return dict(timing=timing, peak_rss_mb=C.peak_rss_mb(), logits=ref_logits)


def bench_size(size: str, args, workdir: pathlib.Path) -> dict:
    from rlhf_jax import models

    model_dir = C.build_llama(workdir / f"llama-{size}", size)
    cfg = C.llama_hf_config(size)
    eos, pad = cfg["eos_token_id"], cfg["pad_token_id"]
    B, P, T = args.batch, args.prompt_len, args.new_tokens
    ids, mask = make_prompts(batch=B, prompt_len=P, vocab=cfg["vocab_size"], pad_id=pad)
    ours = bench_ours(model_dir, ids, mask, new_tokens=T, warmup=args.warmup, iters=args.iters, eos=eos, pad=pad)
    theirs = bench_torch(model_dir, ids, mask, new_tokens=T, warmup=args.warmup, iters=args.iters, eos=eos, pad=pad,
                         threads=args.threads)
    # Same weights on both sides: teacher-forced logits agree on real positions.
    our_logits = np.asarray(ours["model"].apply({"params": ours["params"]}, jnp.asarray(ids), jnp.asarray(mask)))
    logit_diff = float(np.abs(our_logits - theirs["logits"])[mask.astype(bool)].max())

    config = ours["model"].config
    n_params = C.param_count(ours["params"])
    S = P + T
    kv_bytes = 2 * config.num_layers * B * S * config.num_kv_heads * config.head_dim * 4
    step_bytes = C.param_bytes(ours["params"]) + kv_bytes
    bw = C.memory_bandwidth_gbs()
    mm_s = matmul_floor_s(config, batch=B, cache_len=S)
    ours_tps = B * T / ours["timing"].median_s
    torch_tps = B * T / theirs["timing"].median_s
    rec = dict(
        model=size, params=n_params, batch=B, prompt_len=P, new_tokens=T, iters=args.iters, warmup=args.warmup,
        ours_tokens_per_s=ours_tps, torch_tokens_per_s=torch_tps, speedup=ours_tps / torch_tps,
        ours_median_s=ours["timing"].median_s, torch_median_s=theirs["timing"].median_s,
        ours_cpu_s=ours["timing"].median_cpu_s, torch_cpu_s=theirs["timing"].median_cpu_s,
        speedup_cpu_time=theirs["timing"].median_cpu_s / ours["timing"].median_cpu_s,
        ours_compile_s=ours["compile_s"], ours_prefill_plus_1_s=ours["prefill_s"],
        ours_peak_rss_mb=ours["peak_rss_mb"], torch_peak_rss_mb=theirs["peak_rss_mb"],
        decode_step_ms=ours["step_s"] * 1e3, matmul_floor_ms=mm_s * 1e3,
        step_over_matmul=ours["step_s"] / mm_s, bytes_per_step_mb=step_bytes / 2**20,
        copy_bandwidth_gbs=bw["copy_gbs"], read_bandwidth_gbs=bw["read_gbs"],
        bandwidth_floor_ms=step_bytes / (bw["read_gbs"] * 1e9) * 1e3,
        step_over_bandwidth=ours["step_s"] / (step_bytes / (bw["read_gbs"] * 1e9)),
        max_abs_logit_diff_vs_torch=logit_diff, loadavg_1m_end=os.getloadavg()[0],
    )
    del models
    return rec


def print_record(r: dict, machine: dict) -> None:
    C.print_table([
        ("params", f"{r['params'] / 1e6:.1f} M"),
        ("batch × prompt → new", f"{r['batch']} × {r['prompt_len']} → {r['new_tokens']}"),
        ("ours tokens/s", f"{r['ours_tokens_per_s']:.0f}  (median {r['ours_median_s']:.3f} s)"),
        ("torch tokens/s", f"{r['torch_tokens_per_s']:.0f}  (median {r['torch_median_s']:.3f} s)"),
        ("speedup (ours / torch)", f"{r['speedup']:.2f}×  (by process CPU time: {r['speedup_cpu_time']:.2f}×)"),
        ("ours compile", f"{r['ours_compile_s']:.2f} s"),
        ("peak RSS ours / torch", f"{r['ours_peak_rss_mb']:.0f} / {r['torch_peak_rss_mb']:.0f} MB"),
        ("decode step", f"{r['decode_step_ms']:.2f} ms"),
        ("matmul floor", f"{r['matmul_floor_ms']:.2f} ms  (step / floor = {r['step_over_matmul']:.2f})"),
        ("bytes read / step", f"{r['bytes_per_step_mb']:.1f} MB"),
        ("bandwidth copy / read", f"{r['copy_bandwidth_gbs']:.1f} / {r['read_bandwidth_gbs']:.1f} GB/s"),
        ("bandwidth floor", f"{r['bandwidth_floor_ms']:.2f} ms  (step / floor = {r['step_over_bandwidth']:.2f})"),
        ("max |logit diff| vs torch", f"{r['max_abs_logit_diff_vs_torch']:.2e}"),
    ], title=f"rollout: {r['model']} Llama, load avg {machine.get('loadavg_1m', float('nan')):.1f} at start, "
       f"{r['loadavg_1m_end']:.1f} at end, {machine['cpu_count']} cores")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "small", "both"], default="both")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    ap.add_argument("--workdir", default=None, help="where to write the models (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="tiny model, batch 4, 16-token prompts, 8 new tokens")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.prompt_len, args.new_tokens, args.iters, args.warmup = "tiny", 4, 16, 8, 1, 0
    sizes = ["tiny", "small"] if args.model == "both" else [args.model]
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="rlhf_jax_bench_"))
    machine = C.machine_info()
    records = []
    for size in sizes:  # print each size's table as soon as it is measured
        records.append(bench_size(size, args, workdir))
        print_record(records[-1], machine)
    record = {"benchmark": "rollout", "machine": machine, "results": records}
    C.emit_json(record)
    return record


if __name__ == "__main__":
    main()
