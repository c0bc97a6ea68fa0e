"""Page faults and wall time of repeated XLA:CPU executions, with and without the host allocator tunables
(rlhf_jax/runtime/host_memory.py). Reports only: nothing here is asserted, because the no-tunable baseline is
decided by the host (glibc's dynamic mmap threshold, which rises after large frees, and the kernel's
transparent-huge-page mode), not by this project. tests/test_host_memory.py asserts what the project
controls.

Each configuration runs in its own process (a glibc tunable is read at process start only):

- ``none``: no tunables (``RLHF_JAX_HOST_TUNABLES=0``, ``GLIBC_TUNABLES`` unset): glibc's defaults.
- ``hugetlb``: :data:`rlhf_jax.runtime.host_memory.TUNABLE` only, what a host with an accelerator gets.
- ``cpu-only``: :data:`~rlhf_jax.runtime.host_memory.TUNABLE` + :data:`~rlhf_jax.runtime.host_memory.HEAP_TUNABLES`, what
  a CPU-only host gets (the project's default there).

The workload: ``jnp.sum(jnp.tanh(x @ x.T) @ x)`` on ``x`` of ``[size, 256]`` f32, i.e. a ``[size, size]``
temporary (64 MiB at the default 4096) per execution. After compile and ``--warmup`` executions, each of
``--executions`` executions is measured alone with ``getrusage`` (minor/major faults, kernel and user
CPU seconds) and ``perf_counter`` (wall).

    .venv/bin/python benchmarks/host_memory.py [--size 4096] [--warmup 3] [--executions 8] [--quick]

Prints a table, then one ``BENCH_JSON {...}`` line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import _common  # noqa: E402
from rlhf_jax.runtime import host_memory as hm  # noqa: E402

CONFIGS: dict[str, str | None] = {
    "none": None,
    "hugetlb": hm.TUNABLE,
    "cpu-only": f"{hm.TUNABLE}:{hm.HEAP_TUNABLES}",
}

PROBE = textwrap.dedent(
    """
    import json, os, resource, sys, time
    import jax, jax.numpy as jnp
    size, warmup, executions = (int(a) for a in sys.argv[1:4])
    f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) @ x))
    x = jnp.ones((size, 256), jnp.float32)
    t0 = time.perf_counter()
    f(x).block_until_ready()                       # compile + first execution
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        f(x).block_until_ready()
    rows = []
    for _ in range(executions):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        f(x).block_until_ready()
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        rows.append(dict(minflt=r1.ru_minflt - r0.ru_minflt, majflt=r1.ru_majflt - r0.ru_majflt,
                         sys_s=r1.ru_stime - r0.ru_stime, user_s=r1.ru_utime - r0.ru_utime, wall_s=wall))
    print(json.dumps(dict(glibc_tunables=os.environ.get("GLIBC_TUNABLES"), first_s=first_s, executions=rows,
                          maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)))
    """
)


def probe_env(tunables: str | None) -> dict[str, str]:
    """This process's environment with exactly ``tunables`` as ``GLIBC_TUNABLES`` (none when None), on the
    CPU backend, and without the project's own re-exec (the probe must run with what it is given)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hm._DONE)}
    env.update({hm.ENV: "0", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
    if tunables is not None:
        env["GLIBC_TUNABLES"] = tunables
    return env


def run_probe(tunables: str | None, *, size: int, warmup: int, executions: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(size), str(warmup), str(executions)],
                         env=probe_env(tunables), capture_output=True, text=True, timeout=900, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"probe with GLIBC_TUNABLES={tunables!r} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _thp_mode() -> str:
    p = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
    try:
        text = p.read_text()
    except OSError:
        return "unknown"
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=4096, help="rows of x; the temporary is size² f32")
    ap.add_argument("--warmup", type=int, default=3, help="executions after the first, not measured")
    ap.add_argument("--executions", type=int, default=8, help="measured executions per configuration")
    ap.add_argument("--quick", action="store_true", help="size 2048, warmup 1, 3 executions (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.warmup, args.executions = 2048, 1, 3

    results = []
    for name, tunables in CONFIGS.items():
        r = run_probe(tunables, size=args.size, warmup=args.warmup, executions=args.executions)
        ex = r["executions"]
        faults = [e["minflt"] for e in ex]
        walls = [e["wall_s"] for e in ex]
        results.append(dict(
            config=name, glibc_tunables=r["glibc_tunables"] or "", minflt_per_execution=faults,
            minflt_median=statistics.median(faults), minflt_total=sum(faults),
            majflt_total=sum(e["majflt"] for e in ex), sys_s_median=statistics.median(e["sys_s"] for e in ex),
            wall_s_median=statistics.median(walls), wall_s_min=min(walls), wall_s_per_execution=walls,
            first_execution_s=r["first_s"], maxrss_mb=r["maxrss_mb"]))

    temp_pages = args.size * args.size * 4 // 4096
    rows = [("workload", f"x [{args.size}, 256] f32, one [{args.size}, {args.size}] temporary = "
                         f"{temp_pages} pages of 4 KiB; {args.warmup} warm-up + {args.executions} measured"),
            ("host", f"glibc {platform.libc_ver()[1] or '?'}, THP mode '{_thp_mode()}', {os.cpu_count()} CPUs, "
                     f"load average (1 min) {os.getloadavg()[0]:.1f}")]
    for r in results:
        rows.append((r["config"], f"minor faults/execution median {r['minflt_median']:.0f} "
                                  f"(all: {r['minflt_per_execution']}), kernel {r['sys_s_median']:.3f} s, "
                                  f"wall median {r['wall_s_median']:.3f} s (min {r['wall_s_min']:.3f} s)"))
    _common.print_table(rows, title="host memory: repeated XLA:CPU executions (reported, not asserted)")
    _common.emit_json(dict(benchmark="host_memory", size=args.size, warmup=args.warmup,
                           executions=args.executions, temporary_pages_4k=temp_pages, thp_mode=_thp_mode(),
                           glibc=platform.libc_ver()[1], cpu_count=os.cpu_count(), loadavg_1m=os.getloadavg()[0],
                           results=results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
