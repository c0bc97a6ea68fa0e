"""Where the host memory of a PPO iteration goes: the diagnosis behind `benchmarks/memory.py`'s peaks.

Runs ONE of memory.py's configurations (same workload, same overrides: `memory.bench_config`) in this process
and prints, as ``PROBE`` lines and one final ``PROBE_JSON`` record:

- ``phase``: after each loading step (actor, critic, reward model, frozen copies, train states) and after each
  program call of every iteration: VmRSS, VmHWM, and the bytes of JAX's live arrays (distinct buffers);
- ``program``: ``compiled.memory_analysis()`` of every jitted program of the iteration (the sampler's
  prefill + decode loop, the reward model, ``final_scores``, ``evaluate_rollout``, ``experience_fn``,
  ``update``): arguments, outputs, aliased (donated) and temporary bytes. Each program is lowered and
  compiled from its first call's arguments and that executable is then the one that runs (no second compile);
- ``live``: the live arrays after loading, grouped by (shape, dtype), largest first (duplicated base copies
  show up as a count larger than the models that should hold that shape);
- ``donation``: whether the update returned the actor's / critic's frozen base in the same buffers it was given.

    python benchmarks/memory_programs.py MODE MODEL_DIR PROMPTS [--batch 4 --prompt-len 32 --new-tokens 32
                                                                 --iters 2 --scan-layers]

MODEL_DIR / PROMPTS as `memory.py --work DIR` leaves them (``DIR/l2048-N``, ``DIR/prompts-*.jsonl``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
RECORD: dict = {"phases": [], "programs": [], "live": [], "donation": []}
HLO_DIR = os.environ.get("PROBE_HLO_DIR")  # also write each program's optimized HLO there


def _vm(field: str) -> float:
    from benchmarks.memory_trl import vm_kib

    return vm_kib(field) / 2**20


def live_bytes() -> tuple[int, dict]:
    """Bytes of JAX's live arrays, each device buffer once; and the same grouped by (shape, dtype)."""
    import jax

    seen, groups = {}, {}
    for a in jax.live_arrays():
        for s in a.addressable_shards:
            ptr = s.data.unsafe_buffer_pointer()
            if ptr in seen:
                continue
            seen[ptr] = s.data.nbytes
            key = f"{tuple(a.shape)} {a.dtype}"
            n, b = groups.get(key, (0, 0))
            groups[key] = (n + 1, b + s.data.nbytes)
    return sum(seen.values()), groups


def phase(name: str) -> None:
    total, _ = live_bytes()
    row = {"phase": name, "rss_gib": round(_vm("VmRSS"), 3), "hwm_gib": round(_vm("VmHWM"), 3),
           "live_gib": round(total / GIB, 3), "t": round(time.perf_counter(), 1)}
    RECORD["phases"].append(row)
    print("PROBE phase " + json.dumps(row), flush=True)


def _abstract(tree):
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                        if isinstance(x, jax.Array) else x, tree)


class Program:
    """A jitted program compiled from its first call's arguments; reports its memory analysis; then runs."""

    def __init__(self, name: str, jitted, ctx):
        self.name, self.jitted, self.ctx, self.compiled, self.calls = name, jitted, ctx, None, 0

    def __call__(self, *args):
        import jax

        if self.compiled is None:
            t0 = time.perf_counter()
            with self.ctx():
                self.compiled = self.jitted.lower(*_abstract(args)).compile()
            m = self.compiled.memory_analysis()
            row = {"program": self.name, "compile_s": round(time.perf_counter() - t0, 1)}
            for k in ("argument", "output", "alias", "temp", "generated_code"):
                row[k + "_gib"] = round(getattr(m, f"{k}_size_in_bytes", 0) / GIB, 4)
            RECORD["programs"].append(row)
            print("PROBE program " + json.dumps(row), flush=True)
            if HLO_DIR:  # the optimized HLO, to find which buffers the temporaries are
                text = self.compiled.as_text()
                (pathlib.Path(HLO_DIR) / f"{self.name.split()[0]}.hlo.txt").write_text(text)
        with self.ctx():
            out = self.compiled(*args)
        jax.block_until_ready(out)
        self.calls += 1
        phase(f"{self.name} #{self.calls}")
        return out


def _largest_frozen_leaf(params):
    import jax

    from rlhf_jax.models import lora

    _, frozen = lora.split_trainable(params)
    leaves = jax.tree.leaves(frozen) if frozen is not None else []
    return max(leaves, key=lambda x: x.nbytes) if leaves else None  # full fine-tune / critic on the actor's base


def instrument() -> None:
    """Patch the recipe's loaders and program builders (this process only) to report as they run."""
    from rlhf_jax import sharding as shd
    from rlhf_jax.online import sampler as sampler_mod
    from rlhf_jax.recipes import ppo
    from rlhf_jax.rollout import decode
    from rlhf_jax.train import run as common

    def after(fn, label):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            phase(label(a, k, out) if callable(label) else label)
            return out
        return wrapped

    common.load_model = after(common.load_model, lambda a, k, out: f"load_model head={k.get('head')}")
    sampler_mod.frozen_copy = ppo.frozen_copy = after(sampler_mod.frozen_copy, "frozen_copy")
    ppo.make_scorer = after(ppo.make_scorer, "make_scorer (reward model loaded)")
    ppo.create_train_state = after(ppo.create_train_state, "create_train_state")

    orig_jit = shd.jit_sharded

    def jit_sharded(fn, mesh, *, rules=shd.LOGICAL_RULES, **kw):
        call = orig_jit(fn, mesh, rules=rules, **kw)
        name = getattr(getattr(fn, "func", fn), "__name__", "program")
        prog = Program(name, call.jitted, lambda: shd.mesh_context(mesh, rules))
        prog.jitted_fn = call.jitted
        return prog

    shd.jit_sharded = jit_sharded
    orig_sampler, programs = decode._sampler, {}

    def _sampler(*a, **k):
        jitted = orig_sampler(*a, **k)
        if id(jitted) not in programs:
            programs[id(jitted)] = Program("generate (prefill + decode loop)", jitted, contextlib.nullcontext)
        return programs[id(jitted)]

    decode._sampler = _sampler
    orig_loop = ppo.run_loop

    def run_loop(loop, state):
        import jax

        inner = loop.step
        _, groups = live_bytes()
        RECORD["live"] = sorted(([k, n, round(b / GIB, 4)] for k, (n, b) in groups.items()), key=lambda r: -r[2])
        for row in RECORD["live"][:16]:
            print("PROBE live " + json.dumps(row), flush=True)
        phase("before iteration 0")

        def step(index, st):
            before = {r: _largest_frozen_leaf(st[r].params) for r in ("actor", "critic")}
            ptrs = {r: (x.unsafe_buffer_pointer() if x is not None else None) for r, x in before.items()}
            res = inner(index, st)
            jax.block_until_ready(res[0])
            after_ = {r: _largest_frozen_leaf(res[0][r].params) for r in ("actor", "critic")}
            row = {"iteration": index, **{r: (None if ptrs[r] is None else
                                              ptrs[r] == after_[r].unsafe_buffer_pointer()) for r in ptrs}}
            RECORD["donation"].append(row)
            print("PROBE donation (frozen base kept its buffer) " + json.dumps(row), flush=True)
            phase(f"end of iteration {index}")
            return res

        return orig_loop(dataclasses.replace(loop, step=step), state)

    ppo.run_loop = run_loop


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("model_dir")
    ap.add_argument("prompts")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--scan-layers", action="store_true")
    ap.add_argument("--extra", nargs="*", default=[], help="more config overrides")
    args = ap.parse_args()
    from rlhf_jax.runtime.host_memory import reexec_with_host_tunables

    reexec_with_host_tunables(sys.argv)  # the allocator memory.py's children run with
    from benchmarks.memory import MODES, bench_config
    from rlhf_jax.recipes import ppo

    if args.mode not in MODES or MODES[args.mode] is None:
        raise SystemExit(f"mode {args.mode!r}: one of ours: {[m for m, v in MODES.items() if v is not None]}")
    extra = (["model.scan_layers=true"] if args.scan_layers else []) + list(args.extra)
    out = tempfile.mkdtemp(prefix="mem-programs-")
    cfg = bench_config(args.mode, args.model_dir, args.prompts, out, batch=args.batch, prompt_len=args.prompt_len,
                       new_tokens=args.new_tokens, iters=args.iters, extra=extra)
    phase("start")
    instrument()
    ppo.train(cfg)
    RECORD.update(mode=args.mode, model_dir=args.model_dir, extra=extra)
    print("PROBE_JSON " + json.dumps(RECORD), flush=True)


if __name__ == "__main__":
    main()
