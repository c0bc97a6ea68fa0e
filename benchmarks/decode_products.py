"""One decode product, both weight layouts: ``[B, in] × W`` with W stored ``[in, out]`` or ``[out, in]``.

What `rlhf_jax.models.weight_layout` chooses between. For each ``in×out`` shape: a chain of distinct weights
(≥ ``--mb`` MB in all, so they come from memory, not from cache), each product feeding the next (as the layers of
a decode step do), one jitted program per layout; time per product (median of 5 calls after 2 warm-ups), the
weight bytes streamed per second, and the ratio in_out ÷ out_in (> 1: the ``[out, in]`` copy is faster).
Prints the host tunables and the XLA matmul rate next to it (`_rounds.machine_state`).

Usage: python benchmarks/decode_products.py [--batch 16] [--shapes 768x2048,2048x768,...] [--mb 300]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from benchmarks import _rounds as R  # noqa: E402

SHAPES = "256x704,512x1408,768x768,768x2048,2048x768,1024x2816,2816x1024,2048x2048,2048x5632,768x8192"


def time_chain(x, weights, product) -> float:
    """Seconds per product of ``x ← tile(product(x, w))[:, :in] · 0.01`` over ``weights``."""
    n_in = x.shape[1]

    def chain(h, ws):
        for w in ws:
            y = product(h, w)
            h = jnp.tile(y, (1, -(-n_in // y.shape[1])))[:, :n_in] * 0.01
        return h

    f = jax.jit(chain)
    for _ in range(2):
        f(x, weights).block_until_ready()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        f(x, weights).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(weights)


def bench_shape(n_in: int, n_out: int, *, batch: int, mb: float, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    count = max(8, int(mb * 1e6 / (n_in * n_out * 4)))
    host = [rng.standard_normal((n_in, n_out), dtype=np.float32) for _ in range(count)]
    x = jnp.asarray(rng.standard_normal((batch, n_in), dtype=np.float32))
    in_out = time_chain(x, [jnp.asarray(w) for w in host], lambda h, w: h @ w)
    out_in = time_chain(x, [jnp.asarray(np.ascontiguousarray(w.T)) for w in host],
                        lambda h, w: jax.lax.dot_general(h, w, (((1,), (1,)), ((), ()))))
    gb = n_in * n_out * 4 / 1e9
    return {"in": n_in, "out": n_out, "weights": count, "in_out_ms": in_out * 1e3, "out_in_ms": out_in * 1e3,
            "in_out_gbs": gb / in_out, "out_in_gbs": gb / out_in, "gain": in_out / out_in}


def main() -> None:
    from rlhf_jax.runtime.host_memory import reexec_with_host_tunables

    reexec_with_host_tunables(sys.argv, heap=False)  # as `rlhf-jax eval` runs
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated in x out")
    ap.add_argument("--mb", type=float, default=300.0, help="weight megabytes per chain")
    args = ap.parse_args()
    before = R.machine_state()
    rows = []
    for spec in args.shapes.split(","):
        n_in, n_out = (int(v) for v in spec.lower().split("x"))
        r = bench_shape(n_in, n_out, batch=args.batch, mb=args.mb)
        rows.append(r)
        print(f"{n_in:5d} x {n_out:<5d} ({r['weights']:3d} weights): in_out {r['in_out_ms']:.3f} ms "
              f"({r['in_out_gbs']:.1f} GB/s)  out_in {r['out_in_ms']:.3f} ms ({r['out_in_gbs']:.1f} GB/s)  "
              f"gain {r['gain']:.2f}x", flush=True)
    after = R.machine_state()
    C.print_table(R.state_rows(before, after), title=f"decode products, batch {args.batch}, {os.cpu_count()} CPUs")
    C.emit_json({"benchmark": "decode_products", "machine": C.machine_info(), "batch": args.batch, "results": rows,
                 "state_before": before, "state_after": after})


if __name__ == "__main__":
    main()
