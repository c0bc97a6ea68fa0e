"""`rlhf-jax eval`'s generation path vs `transformers` greedy `generate`, same prompts, same run, same weights.

Ours: exactly what `rlhf-jax eval` runs for its samples (`online.evaluation`: `load_policy`, `open_prompts`,
`sample_all` with τ = 0: the trainers' jitted `Sampler`), one pass over every prompt of the file. Peer:
`AutoModelForCausalLM.from_pretrained(DIR)` + `generate(do_sample=False, use_cache=True)` over the same prompts
in batches of the same size, left-padded by the same tokenizer. Prompt encoding is outside both timings.

Models: `/work/shared/peers/make_tiny.py` (`tiny`: Llama hidden 256 × 4 layers, 7.4M; `small`: ~86M, hidden
768 × 12 layers, GQA 12/2; the tokenizer is in every folder), built once into `--models-dir` when absent.
Prompts: `--prompts` lines of this Python installation's `json/decoder.py`, cut to 24..48 tokens.
EOS is kept (both stop a row at EOS; random weights rarely emit it), so both generate up to
`--max-new-tokens` tokens per row; the report counts the tokens each side produced and the rows whose
greedy ids are identical.

Timing: one warm-up call each (compiles), then `--rounds` interleaved rounds (peer, ours, peer, ours, ...);
per side the median and min–max; the speed-up is peer ÷ ours per round (median and min–max over rounds).
The load average (`uptime`) and the XLA and torch f32 2048³ matmul rates before and after the rounds are printed
(`_rounds.machine_state`): on a shared machine the ratio, measured in the same run, is the number to read.

After the rounds: what issue #20's item 6 asks (≤ peer ÷ 2 per pass) next to what the decode steps' weight
products alone take in XLA:CPU (`products_floor`: one jitted chain of every projection and the head at the batch
size, from the weights `rlhf-jax eval` decodes with, × the steps) and the read-bandwidth floor of those steps.

`--compare-layouts` adds a third side, interleaved: ours sampling from the loaded ``[in, out]`` weights
(``RLHF_JAX_DECODE_LAYOUT=in_out``) instead of the ``[out, in]`` decode copy `rlhf-jax eval` makes on CPU.

Usage: python benchmarks/eval.py [--model tiny|small|both] [--rounds 3] [--prompts 16] [--batch-size 16]
                                 [--max-new-tokens 64] [--peer-threads N] [--compare-layouts] [--models-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from benchmarks import _rounds as R  # noqa: E402

MAKE_TINY = pathlib.Path("/work/shared/peers/make_tiny.py")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def ensure_models(models_dir: pathlib.Path) -> pathlib.Path:
    """`make_tiny.py` output (tiny, small, tokenizer), built once."""
    if not (models_dir / "small" / "config.json").exists():
        print(f"building the peer models into {models_dir} ({MAKE_TINY})", flush=True)
        subprocess.run([sys.executable, str(MAKE_TINY), str(models_dir), "--max-text-mb", "4"], check=True)
    return models_dir


def write_prompts(path: pathlib.Path, tokenizer, *, n: int, seed: int = 0) -> list[str]:
    """`n` code prompts of 24..48 tokens from the stdlib's json/decoder.py (deterministic)."""
    src = (pathlib.Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()
    ids = tokenizer(src, add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(n):
        length = int(rng.integers(24, 49))
        start = int(rng.integers(0, len(ids) - length))
        prompts.append(tokenizer.decode(ids[start:start + length]))
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return prompts


class Ours:
    """`rlhf-jax eval`'s generation path (greedy), over every prompt of the file."""

    def __init__(self, model_dir: str, data: str, *, batch_size: int, max_new_tokens: int, max_prompt_len: int):
        from rlhf_jax import cli
        from rlhf_jax.online import evaluation as ev

        self.ev = ev
        self.args = cli._parser().parse_args([
            "eval", "--model", model_dir, "--data", data, "--batch-size", str(batch_size),
            "--max-new-tokens", str(max_new_tokens), "--max-prompt-len", str(max_prompt_len), "--temperature", "0"])
        self.mesh, self.loaded = ev.load_policy(model_dir)
        self.batches, self.sampler = ev.open_prompts(self.args, self.loaded, self.mesh)

    def __call__(self) -> list[list[int]]:
        out = []
        for sb in self.ev.sample_all(self.sampler, self.loaded.params, self.batches, samples=1, temperature=0.0):
            out += [rec["completion_ids"][0] for rec in self.ev.per_prompt(sb, self.loaded.tokenizer)]
        return out


class Peer:
    """`transformers` greedy generate, same prompts and batch size."""

    def __init__(self, model_dir: str, prompts: list[str], *, batch_size: int, max_new_tokens: int,
                 threads: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
        self.batches = [self.tok(prompts[i:i + batch_size], return_tensors="pt", padding=True)
                        for i in range(0, len(prompts), batch_size)]
        self.max_new_tokens = max_new_tokens

    def __call__(self) -> list[list[int]]:
        out = []
        eos = self.tok.eos_token_id
        with self.torch.inference_mode():
            for enc in self.batches:
                gen = self.model.generate(**enc, do_sample=False, max_new_tokens=self.max_new_tokens, use_cache=True,
                                          pad_token_id=self.tok.pad_token_id, eos_token_id=eos)
                for row in gen[:, enc["input_ids"].shape[1]:].tolist():
                    out.append(row[: row.index(eos) + 1] if eos in row else row)
        return out


def decode_weights(params, model) -> list:
    """The decode step's weight matrices in the order a step reads them, each as the 2-D ``[out, in]`` or
    ``[in, out]`` matrix its product streams (``model.config.weight_layout``); a tied head is the embedding."""
    import jax.numpy as jnp

    from rlhf_jax.models.weight_layout import PROJECTIONS

    out_in = model.config.weight_layout == "out_in"
    mats = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = getattr(path[-1], "key", None)
        if name not in PROJECTIONS:
            continue
        scanned = any(getattr(k, "key", None) == "layers" for k in path) and model.config.scan_layers
        for w in (list(leaf) if scanned else [leaf]):
            n_lead = w.ndim - PROJECTIONS[name] if out_in else PROJECTIONS[name]  # [out…, in…] / [in…, out…]
            mats.append(jnp.reshape(w, (math.prod(w.shape[:n_lead]), -1)))
    if not any(getattr(p[-1], "key", None) == "lm_head" for p, _ in jax.tree_util.tree_leaves_with_path(params)):
        embed = params["embed"]  # tied head: logits = x · Eᵀ, E stored [vocab, hidden] = [out, in]
        mats.append(embed if out_in else embed.T)
    return mats


def products_floor(loaded, *, batch: int, steps: int) -> dict:
    """Seconds that `steps` decode steps spend in their weight products alone, at XLA:CPU's own rate: one jitted
    chain of every projection of a step (and the head) at ``batch`` rows, from the weights `rlhf-jax eval` decodes
    with (median of 5 calls after 2 warm-ups). No attention, norms, sampling or loop: a floor for our program."""
    import jax.numpy as jnp

    mats = decode_weights(loaded.params, loaded.model)
    out_in = loaded.model.config.weight_layout == "out_in"

    def step(x, ws):
        for w in ws:
            n_in = w.shape[1] if out_in else w.shape[0]
            h = jnp.tile(x, (1, -(-n_in // x.shape[1])))[:, :n_in] * 0.01
            x = jax.lax.dot_general(h, w, (((1,), (1 if out_in else 0,)), ((), ())))
        return x

    f = jax.jit(step)
    x = jnp.ones((batch, mats[0].shape[1] if out_in else mats[0].shape[0]), jnp.float32)
    step_s = C.time_call(lambda: f(x, mats).block_until_ready(), warmup=2, iters=5).median_s
    weight_bytes = sum(w.size * w.dtype.itemsize for w in mats)
    read = C.memory_bandwidth_gbs()["read_gbs"]
    return {"layout": loaded.model.config.weight_layout, "step_products_s": step_s, "steps": steps,
            "products_s": step_s * steps, "weight_gb": weight_bytes / 1e9, "products_gbs": weight_bytes / step_s / 1e9,
            "read_gbs": read, "bandwidth_floor_s": weight_bytes / (read * 1e9) * steps}


def timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def _ours_in_layout(layout: str, *args, **kwargs) -> Ours:
    """`Ours` loaded with ``RLHF_JAX_DECODE_LAYOUT=layout`` (read once, when the model loads)."""
    from rlhf_jax.models.weight_layout import ENV

    old = os.environ.get(ENV)
    os.environ[ENV] = layout
    try:
        return Ours(*args, **kwargs)
    finally:
        os.environ.pop(ENV) if old is None else os.environ.__setitem__(ENV, old)


def bench(name: str, model_dir: pathlib.Path, *, rounds: int, n_prompts: int, batch_size: int,
          max_new_tokens: int, peer_threads: int = 0, compare_layouts: bool = False) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_eval_"))
    prompts = write_prompts(work / "prompts.jsonl", tok, n=n_prompts)
    max_prompt_len = max(len(tok(p)["input_ids"]) for p in prompts)
    ours = Ours(str(model_dir), str(work / "prompts.jsonl"), batch_size=batch_size, max_new_tokens=max_new_tokens,
                max_prompt_len=max_prompt_len)
    peer = Peer(str(model_dir), prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, threads=peer_threads)
    sides = [("peer", peer), ("ours", ours)]
    if compare_layouts:  # the same command sampling from the loaded [in, out] weights (no decode copy)
        sides.append(("ours_in_out", _ours_in_layout(
            "in_out", str(model_dir), str(work / "prompts.jsonl"), batch_size=batch_size,
            max_new_tokens=max_new_tokens, max_prompt_len=max_prompt_len)))
    warm = {side: timed(fn)[0] for side, fn in sides}  # ours: includes compilation
    times: dict[str, list[float]] = {side: [] for side, _ in sides}
    ids = {}
    load_before = uptime()
    state_before = R.machine_state()
    for _ in range(rounds):
        for side, fn in sides:
            t, ids[side] = timed(fn)
            times[side].append(t)
    state_after = R.machine_state()
    load_after = uptime()
    # what item 6 of issue #20 asks (>= 2x the peer) against what the step's products alone cost in our program
    floor = products_floor(ours.loaded, batch=batch_size, steps=max(len(r) for r in ids["ours"]) - 1)
    ratios = [p / o for p, o in zip(times["peer"], times["ours"])]
    same = sum(a == b for a, b in zip(ids["peer"], ids["ours"]))
    layout_rows = []
    if compare_layouts:
        gains = [a / b for a, b in zip(times["ours_in_out"], times["ours"])]
        layout_rows = [
            ("ours, [in, out] weights s/pass", f"median {statistics.median(times['ours_in_out']):.3f}  "
                                               f"[{min(times['ours_in_out']):.3f} – {max(times['ours_in_out']):.3f}]"),
            ("[out, in] copy speed-up", f"median {statistics.median(gains):.2f}x  [{min(gains):.2f} – {max(gains):.2f}]"),
            ("identical rows, both layouts", f"{sum(a == b for a, b in zip(ids['ours_in_out'], ids['ours']))}/{n_prompts}"),
        ]
    tokens = {side: sum(len(r) for r in rows) for side, rows in ids.items()}
    rec = {"model": name, "prompts": n_prompts, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
           "rounds": rounds, "warmup_s": warm, "times_s": times,
           "median_s": {s: statistics.median(v) for s, v in times.items()},
           "speedup_median": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
           "tokens": tokens, "identical_rows": same, "peer_threads": peer.torch.get_num_threads(),
           "load_before": load_before, "load_after": load_after,
           "state_before": state_before, "state_after": state_after, "products_floor": floor}
    C.print_table([
        ("prompts x new tokens", f"{n_prompts} x {max_new_tokens} (batch {batch_size}, greedy)"),
        ("peer torch threads", str(rec["peer_threads"])),
        ("warm-up (compile) s", f"peer {warm['peer']:.2f}  ours {warm['ours']:.2f}"),
        ("peer s/pass", f"median {rec['median_s']['peer']:.3f}  [{min(times['peer']):.3f} – {max(times['peer']):.3f}]"),
        ("ours s/pass", f"median {rec['median_s']['ours']:.3f}  [{min(times['ours']):.3f} – {max(times['ours']):.3f}]"),
        ("speed-up (peer/ours)", f"median {rec['speedup_median']:.2f}x  [{rec['speedup_min']:.2f} – {rec['speedup_max']:.2f}]"),
        ("tokens generated", f"peer {tokens['peer']}  ours {tokens['ours']}"),
        ("identical greedy rows", f"{same}/{n_prompts}"),
        *layout_rows,
        ("2x the peer needs", f"<= {rec['median_s']['peer'] / 2:.3f} s/pass"),
        (f"decode products alone ({floor['layout']})",
         f"{floor['products_s']:.3f} s = {floor['steps']} steps x {floor['step_products_s'] * 1e3:.1f} ms "
         f"({floor['weight_gb']:.3f} GB of weights at {floor['products_gbs']:.1f} GB/s; prefill not included)"),
        ("bandwidth floor of those steps", f"{floor['bandwidth_floor_s']:.3f} s (read {floor['read_gbs']:.1f} GB/s)"),
        ("load before", load_before), ("load after", load_after),
        *R.state_rows(state_before, state_after),
    ], title=f"rlhf-jax eval generation vs transformers generate: {name}")
    return rec


def main() -> None:
    from rlhf_jax.runtime.host_memory import reexec_with_host_tunables

    reexec_with_host_tunables(sys.argv, heap=False)  # as `rlhf-jax eval` runs (the CLI re-executes itself); both sides share it
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("tiny", "small", "both"), default="both")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--peer-threads", type=int, default=0,
                    help="torch.set_num_threads for the peer (0 = torch's default; 1 is faster on an oversubscribed machine)")
    ap.add_argument("--compare-layouts", action="store_true",
                    help="also time ours on the loaded [in, out] weights (RLHF_JAX_DECODE_LAYOUT=in_out), interleaved")
    ap.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "rlhf_jax_peer_models"))
    args = ap.parse_args()
    if args.rounds < 3:
        raise SystemExit("--rounds must be >= 3")
    root = ensure_models(pathlib.Path(args.models_dir))
    names = ["tiny", "small"] if args.model == "both" else [args.model]
    print(f"{uptime()}\njax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs", flush=True)
    records = [bench(n, root / n, rounds=args.rounds, n_prompts=args.prompts, batch_size=args.batch_size,
                     max_new_tokens=args.max_new_tokens, peer_threads=args.peer_threads,
                     compare_layouts=args.compare_layouts) for n in names]
    C.emit_json({"benchmark": "eval", "machine": C.machine_info(), "results": records})


if __name__ == "__main__":
    main()
