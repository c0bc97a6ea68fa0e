"""Rollout with the actor's FSDP training layout vs the hybrid-engine inference layout, same run, 8 devices.

For each model (Llama-style `tiny` / `small` ~100M of `_common.LLAMA_SIZES`, random weights) and layer mode
(unrolled layers, `nn.scan` layers), on a (data, fsdp, tensor) mesh of 8 simulated CPU devices (default 1,8,1):

  * fsdp:      `generate(train_params, param_shardings=<training layout>)` (weights all-gathered by the program);
  * inference: `reshard_for_inference(train_params, inference_layout(...))` then `generate(copy, ...)`; the
               reshard is timed separately and included in the total.

Rounds are interleaved (the order alternates) after one untimed warm-up round that compiles everything; each
row gives the median and the min-max over the rounds. Also printed: per-device bytes of the FSDP copy and of the
inference copy (the largest per-device total), and the number of all-gather instructions in each compiled sampler
(`--hlo`) — the program-wide count, which includes the prefill's gathers and any XLA hoisted out of the decode loop.

On a CPU host the 8 "devices" share the same cores and memory, so collectives are memcpys and the timing shows
the program-structure cost only; on accelerators an all-gather crosses the interconnect.

Usage: python benchmarks/rollout_layout.py [--model tiny|small|both] [--scan off|on|both] [--mesh 1,8,1]
       [--rounds 3] [--batch 16] [--prompt-len 32] [--new-tokens 32] [--hlo]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import statistics
import sys
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # the CLI's allocator tunables (rlhf_jax/runtime/host_memory.py), set before JAX starts
    from rlhf_jax.runtime.host_memory import reexec_with_host_tunables

    reexec_with_host_tunables(sys.argv)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _common as C  # noqa: E402


def make_prompts(*, batch: int, prompt_len: int, vocab: int, seed: int = 0):
    """Random left-padded prompts, lengths in [prompt_len // 2, prompt_len], ids avoid 0..2."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompt_len // 2, prompt_len + 1, size=batch)
    ids = np.zeros((batch, prompt_len), np.int32)
    mask = np.zeros((batch, prompt_len), np.int32)
    for i, n in enumerate(lengths):
        ids[i, prompt_len - n:] = rng.integers(3, vocab, size=n)
        mask[i, prompt_len - n:] = 1
    return ids, mask


def _stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": times}


def bench(size: str, scan: bool, mesh_cfg, args) -> dict:
    from rlhf_jax import models, rollout, sharding

    config = models.ModelConfig.from_hf(C.llama_hf_config(size)).replace(scan_layers=scan)
    model = models.Transformer(config, head="lm")
    mesh = sharding.make_mesh(mesh_cfg)
    train_sh = sharding.param_shardings(model, mesh)
    inf_sh = rollout.inference_layout(model, mesh)
    b_sh = sharding.batch_sharding(mesh)
    params = sharding.create_sharded(lambda k: models.init_params(model, k), jax.random.key(0), out_shardings=train_sh)
    ids, mask = make_prompts(batch=args.batch, prompt_len=args.prompt_len, vocab=config.vocab_size)
    ids, mask = sharding.shard_batch(ids, mesh), sharding.shard_batch(mask, mesh)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, temperature=1.0, eos_token_id=2,
              pad_token_id=0, batch_sharding=b_sh)

    def run_fsdp(key):
        t0 = time.perf_counter()
        jax.block_until_ready(rollout.generate(model, params, ids, mask, key=key, param_shardings=train_sh, **kw))
        return {"generate": time.perf_counter() - t0}

    def run_inference(key):
        t0 = time.perf_counter()
        copy = jax.block_until_ready(rollout.reshard_for_inference(params, inf_sh))
        t1 = time.perf_counter()
        jax.block_until_ready(rollout.generate(model, copy, ids, mask, key=key, param_shardings=inf_sh, **kw))
        t2 = time.perf_counter()
        del copy
        return {"reshard": t1 - t0, "generate": t2 - t1, "total": t2 - t0}

    rec: dict = {"model": size, "scan_layers": scan, "mesh": list(mesh_cfg.shape(jax.device_count())),
                 "params": C.param_count(params), "batch": args.batch, "prompt_len": args.prompt_len,
                 "new_tokens": args.new_tokens}
    with sharding.mesh_context(mesh):
        warm = {"fsdp": run_fsdp(jax.random.key(0)), "inference": run_inference(jax.random.key(0))}  # compiles
        rec["warmup_s"] = warm
        fsdp, inf = [], []
        for r in range(args.rounds):
            key = jax.random.key(r + 1)
            if r % 2 == 0:
                fsdp.append(run_fsdp(key))
                inf.append(run_inference(key))
            else:
                inf.append(run_inference(key))
                fsdp.append(run_fsdp(key))
        copy = rollout.reshard_for_inference(params, inf_sh)
        rec["bytes_per_device"] = {"fsdp": rollout.bytes_per_device(params),
                                   "inference": rollout.bytes_per_device(copy)}
        if args.hlo:
            count = lambda p, sh: len(re.findall(r"= \S+ all-gather(?:-start)?\(", rollout.lower_generate(  # noqa: E731
                model, p, ids, mask, key=jax.random.key(0), param_shardings=sh, **kw).compile().as_text()))
            rec["all_gathers_in_program"] = {"fsdp": count(params, train_sh), "inference": count(copy, inf_sh)}
        del copy
    rec["fsdp_generate"] = _stats([t["generate"] for t in fsdp])
    rec["inference_reshard"] = _stats([t["reshard"] for t in inf])
    rec["inference_generate"] = _stats([t["generate"] for t in inf])
    rec["inference_total"] = _stats([t["total"] for t in inf])
    rec["speedup_total"] = rec["fsdp_generate"]["median_s"] / rec["inference_total"]["median_s"]
    return rec


def _fmt(s: dict) -> str:
    return f"{s['median_s']:8.3f} s  [{s['min_s']:.3f} – {s['max_s']:.3f}]"


def print_record(r: dict) -> None:
    b = r["bytes_per_device"]
    rows = [
        ("params", f"{r['params'] / 1e6:.1f}M, scan_layers={r['scan_layers']}, mesh (data,fsdp,tensor)={r['mesh']}"),
        ("work", f"{r['batch']} prompts x {r['prompt_len']} tokens, {r['new_tokens']} new tokens"),
        ("fsdp: generate", _fmt(r["fsdp_generate"])),
        ("inference: reshard", _fmt(r["inference_reshard"])),
        ("inference: generate", _fmt(r["inference_generate"])),
        ("inference: reshard + generate", _fmt(r["inference_total"])),
        ("speedup (fsdp / inference total)", f"{r['speedup_total']:.2f}x"),
        ("bytes/device fsdp copy", f"{b['fsdp'] / 2**20:.1f} MiB"),
        ("bytes/device inference copy", f"{b['inference'] / 2**20:.1f} MiB ({b['inference'] / b['fsdp']:.1f}x)"),
    ]
    if "all_gathers_in_program" in r:
        g = r["all_gathers_in_program"]
        rows.append(("all-gathers in sampler program", f"fsdp {g['fsdp']}, inference {g['inference']}"))
    n = len(r["fsdp_generate"]["times_s"])
    C.print_table(rows, title=f"rollout layout: {r['model']} (median [min – max] of {n} rounds)")


def main(argv=None) -> dict:
    from rlhf_jax import sharding

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "small", "both"], default="tiny")
    ap.add_argument("--scan", choices=["off", "on", "both"], default="both")
    ap.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor over the 8 devices")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--hlo", action="store_true", help="also count all-gathers in both compiled samplers")
    args = ap.parse_args(argv)
    if args.rounds < 3:
        ap.error("--rounds must be >= 3")
    assert jax.device_count() == 8, f"needs 8 devices, got {jax.devices()}"
    mesh_cfg = sharding.MeshConfig.parse(args.mesh)
    sizes = ["tiny", "small"] if args.model == "both" else [args.model]
    scans = [False, True] if args.scan == "both" else [args.scan == "on"]
    results = []
    for size in sizes:
        for scan in scans:
            rec = bench(size, scan, mesh_cfg, args)
            print_record(rec)
            results.append(rec)
    record = {"benchmark": "rollout_layout", "machine": C.machine_info(), "results": results}
    C.emit_json(record)
    return record


if __name__ == "__main__":
    main()
