"""Golden metrics of every CLI trainer on tiny configs: record them, or re-run and collect them for comparison.

Purpose: a behaviour-preservation check for refactors of ``rlhf_jax/trainers/``. The golden values in
``metrics.json`` were recorded from the code before the refactor (commit 8fe9375, checked out in a worktree
and put first on ``PYTHONPATH``); ``test_golden.py`` re-runs the same variants on the current code and
compares them.

What runs (only public entry points, so the refactor may move anything behind them):
  * fixtures, built offline and deterministically in a child process with ``rlhf_jax.fixtures``
    (``build_tokenizer``: byte-level BPE, vocab 4096; ``build_tiny_model``: random 2-layer Llama, hidden
    32, 4 heads / 2 KV heads, max 128 positions, f32, seed 0, LM head; the reward model of ``ppo_rm`` and
    ``label_rm`` is the ``rm`` variant's export, which carries the reward statistics PPO normalises with) and
    ``rlhf_jax.tasks.write_task_data`` (n_sft=64, n_pref=64, n_eval=16,
    n_prompts=32, seed 0), plus KTO rows made from the preference pairs (chosen -> label true, rejected
    -> false), as ``tests/trainers/test_dpo.py`` does;
  * every variant in ``VARIANTS``: ``rlhf_jax.cli.main([command, <code root>/configs/<config>, *overrides])``
    in ONE child process, one variant after the other (in-process calls save the ~5 s import per variant;
    the order was checked not to matter: a reversed-order run gave identical values). Common overrides of
    the training commands: ``run.total_steps=3 run.log_every=1 run.tensorboard=false run.progress=off
    run.resume=never run.output_dir=<fresh dir> mesh.data=-1`` and the fixture model/data paths; see
    ``VARIANTS`` for the per-variant ones (small batches, ``optim.warmup_steps=1`` where a cosine schedule
    needs warmup < total_steps).

What is recorded per variant: every record of ``<output_dir>/metrics.jsonl`` with ``step <= 3`` (train and
eval splits; ``step`` and ``split`` included), keeping every field except wall-clock ones. Dropped keys
(``is_timing_key``; what each recorded variant actually dropped is listed under ``dropped_keys`` in
metrics.json):
  * ``time``               seconds since the logger started (every record),
  * ``steps_per_s``        offline trainers (sft, rm, dpo family),
  * ``tokens_per_s``       online trainers (ppo, grpo family, raft, online_dpo),
  * ``time/generate``, ``time/score``, ``time/train``, ``time/iteration`` (seconds per phase) and
    ``time/generate_frac``, ``time/score_frac``, ``time/train_frac`` (their shares of the iteration),
  * and, defensively, any other key starting with ``time/`` or ``time_``, ending in ``_per_s``/``_per_sec``,
    or containing ``elapsed``, ``seconds`` or a ``wall`` path component.
  For the ``label`` variants (no metrics.jsonl) every row of the written pairs JSONL is recorded (prompt,
  chosen, rejected, score_chosen, score_rejected); nothing is dropped.

Rewards: a random tiny model never writes the task's adjectives, so ``rlhf_jax.tasks:gold_score`` is 0 for
every sample and the configs' reward would leave online DPO without pairs and most groups tied. The online
variants (except ``ppo_rm``: the ``rm`` variant's exported reward model only) and ``label_fn`` therefore
use ``reward.functions=[rlhf_jax.tasks:gold_score, <this file>:dense_reward] reward.weights=[1.0, 0.5]``;
``dense_reward`` (the response's share of ASCII letters minus 1/2) is defined here, so it cannot change with
the library.

Which code runs: the children import whatever ``import rlhf_jax`` finds from a neutral working directory
(the scratch folder) with this process's ``PYTHONPATH`` -- i.e. the first ``PYTHONPATH`` entry holding
``rlhf_jax``, else the installed (editable) package, else this repository. (``python -m`` from the repo root
puts the repo root first on ``sys.path`` of *this* process, which would shadow ``PYTHONPATH``; that is why
this process itself never imports ``rlhf_jax``.) ``--code-root DIR`` forces a tree. The configs are read
from ``<code root>/configs``. The resolved code root is printed, the child checks it imported exactly that
tree, and the recording stores it with its git HEAD.

Usage (from the repo root):
  PYTHONPATH=/work/golden-base python -m tests.golden.runner --record tests/golden/metrics.json
  python -m tests.golden.runner --check tests/golden/metrics.json        # current code vs the recording
  python tests/golden/runner.py --out /tmp/x.json --only ppo_rm grpo     # works as a plain script too
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata

STEPS = 3  # run.total_steps of every training variant; records with step <= STEPS are kept
FORMAT = 1  # bump when the recording layout changes

# Overrides every training variant gets ({out} is the variant's fresh output folder).
COMMON = ["run.total_steps=3", "run.log_every=1", "run.tensorboard=false", "run.progress=off", "run.resume=never",
          "run.output_dir={out}", "mesh.data=-1"]
_PREF = ["model.path={model}", "data.path={pref_train}", "data.eval_path={pref_eval}", "batch_size=8",
         "eval_batch_size=16", "optim.warmup_steps=1"]
# A random tiny model never writes the task's adjectives, so the gold score alone is 0 for every sample (the
# only signal would be the no-EOS penalty: no pairs for online DPO, all-tied groups, zero gradients). The
# online variants therefore add `dense_reward` (below; loaded by file path, a public reward-spec form).
_REWARDS = ["reward.functions=[rlhf_jax.tasks:gold_score, {dense}]", "reward.weights=[1.0, 0.5]"]
_PROMPTS = ["model.path={model}", "data.path={prompts_train}", "rollout.batch_size=4"]
_ONLINE = [*_PROMPTS, *_REWARDS]
_GROUP = [*_ONLINE, "algo.num_minibatches=2"]
_LABEL = ["model.path={model}", "data.path={prompts_eval}", "output_path={out}/pairs.jsonl", "rollout.batch_size=6",
          "mesh.data=-1"]  # 16 eval prompts in batches of 6: the last batch is partial

#: name -> (CLI command, config file under <code root>/configs, overrides besides COMMON). Placeholders:
#: {out} (this variant's output folder), {model} (fixture tiny Llama),
#: {rm_export} (the `rm` variant's exported reward model), {dense} (this file's dense_reward), {sft_train},
#: {sft_eval}, {pref_train}, {pref_eval}, {kto_train}, {kto_eval}, {prompts_train}, {prompts_eval}.
VARIANTS: dict[str, tuple[str, str, list[str]]] = {
    "sft": ("sft", "sft_tiny_cpu.yaml", ["model.path={model}", "data.path={sft_train}", "data.eval_path={sft_eval}",
                                         "batch_size=8", "eval_batch_size=16", "optim.warmup_steps=1"]),
    "rm": ("rm", "rm_tiny_cpu.yaml", [*_PREF]),
    "dpo_sigmoid": ("dpo", "dpo_tiny_cpu.yaml", [*_PREF, "loss.loss_type=sigmoid"]),
    "dpo_ipo": ("dpo", "dpo_ipo_tiny_cpu.yaml", [*_PREF]),  # loss_type ipo, precomputed reference log-probs
    "dpo_simpo": ("dpo", "dpo_simpo_tiny_cpu.yaml", [*_PREF]),
    "dpo_orpo": ("dpo", "dpo_orpo_tiny_cpu.yaml", [*_PREF]),
    "dpo_kto": ("dpo", "kto_tiny_cpu.yaml", ["model.path={model}", "data.path={kto_train}", "data.eval_path={kto_eval}",
                                             "batch_size=8", "eval_batch_size=16", "optim.warmup_steps=1"]),
    # PPO against the `rm` variant's export only (normalised by its stored statistics; the critic starts from it)
    "ppo_rm": ("ppo", "ppo_tiny_cpu.yaml", [*_PROMPTS, "reward.model_path={rm_export}"]),
    # PPO with Python reward functions only (no reward model; the critic starts from model.path)
    "ppo_fn": ("ppo", "ppo_tiny_cpu.yaml", [*_ONLINE, "reward.model_path=null"]),
    "grpo": ("grpo", "grpo_tiny_cpu.yaml", [*_GROUP]),
    "grpo_dapo": ("grpo", "grpo_dapo_tiny_cpu.yaml", [*_GROUP]),
    "grpo_dr_grpo": ("grpo", "grpo_dr_tiny_cpu.yaml", [*_GROUP]),
    "rloo": ("rloo", "rloo_tiny_cpu.yaml", [*_GROUP]),
    "reinforce_pp": ("reinforce_pp", "reinforce_pp_tiny_cpu.yaml", [*_GROUP]),
    "remax": ("remax", "remax_tiny_cpu.yaml", [*_GROUP]),
    "raft": ("raft", "raft_tiny_cpu.yaml", [*_ONLINE]),
    "online_dpo": ("online_dpo", "online_dpo_tiny_cpu.yaml", [*_ONLINE]),
    # label (no run.* keys): the written pairs JSONL; three rankers
    "label_fn": ("label", "label_tiny_cpu.yaml", [*_LABEL, *_REWARDS]),
    "label_rm": ("label", "label_tiny_cpu.yaml", [*_LABEL, "ranker=reward_model", "reward.model_path={rm_export}",
                                                  "reward.functions=[]"]),
    # the sampling model judges itself; " Yes" is two tokens of the fixture tokenizer, " True" is one
    "label_judge": ("label", "label_tiny_cpu.yaml", [*_LABEL, "ranker=judge", "judge.verdict=' True'"]),
}
#: variants that need another variant's output (run first when not selected)
DEPENDS = {"ppo_rm": ["rm"], "label_rm": ["rm"]}
NO_COMMON = {"label_fn", "label_rm", "label_judge"}  # variants without run.* keys

_TIMING_EXACT = {"time", "steps_per_s", "tokens_per_s"}
_TIMING_RE = re.compile(r"^time(/|_|$)|elapsed|seconds|_per_s(ec)?$|_per_s/|(^|/)wall")


def is_timing_key(key: str) -> bool:
    """Whether a metrics.jsonl key is a wall-clock measurement (dropped from the recording)."""
    return key in _TIMING_EXACT or bool(_TIMING_RE.search(key))


def dense_reward(prompts, responses, **columns) -> list[float]:
    """A reward with a different value for almost every response: its share of ASCII letters, minus 1/2."""
    return [sum(c.isascii() and c.isalpha() for c in r) / max(len(r), 1) - 0.5 for r in responses]


def variant_argv(name: str, code_root: pathlib.Path, paths: dict[str, str], out: pathlib.Path) -> list[str]:
    """The CLI argv of one variant."""
    command, config, extra = VARIANTS[name]
    overrides = ([] if name in NO_COMMON else COMMON) + extra
    fill = {**paths, "out": str(out), "rm_export": str(out.parent / "rm" / "model"),
            "dense": f"{os.path.abspath(__file__)}:dense_reward"}
    return [command, str(code_root / "configs" / config), *(o.format(**fill) for o in overrides)]


def describe_overrides(name: str) -> list[str]:
    """The overrides of a variant with placeholders unfilled (stored with the recording)."""
    return ([] if name in NO_COMMON else COMMON) + VARIANTS[name][2]


# ----------------------------------------------------------------------------------------- fingerprint
def _cpu_flags_hash() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = {ln.split(":", 1)[1].strip() for ln in f if ln.split(":", 1)[0].strip() == "flags"}
    except OSError:
        return "unavailable"
    return hashlib.sha256("\n".join(sorted(flags)).encode()).hexdigest()[:16]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def fingerprint() -> dict:
    """What bit-exactness depends on besides the code: library versions, CPU, threads, XLA flags."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"jax": _version("jax"), "jaxlib": _version("jaxlib"), "machine": platform.machine(),
            "cpu_flags_sha256": _cpu_flags_hash(), "usable_cores": cores,
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "JAX_PLATFORMS": "cpu"}


# ------------------------------------------------------------------------------------------- parent side
def child_env(code_root: pathlib.Path | None, scratch: pathlib.Path) -> dict[str, str]:
    env = dict(os.environ)
    if code_root is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code_root), *filter(None, [env.get("PYTHONPATH")])])
    hf = scratch / "hf_home"
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "JAX_PLATFORMS": "cpu", "HF_HOME": str(hf),
                "HF_DATASETS_CACHE": str(hf / "datasets"), "PYTHONHASHSEED": "0"})
    env.pop("RLHF_JAX_TRACEBACK", None)
    return env


REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def resolve_code_root(env: dict[str, str], cwd: pathlib.Path) -> pathlib.Path:
    """The tree whose ``rlhf_jax`` the children import (the parent of the package folder).

    ``import rlhf_jax`` from `cwd` with `env` (PYTHONPATH first, then the installed/editable package); if
    that fails, this file's repository (whose root then goes on the children's PYTHONPATH).
    """
    out = subprocess.run([sys.executable, "-c", "import rlhf_jax, os; print(os.path.dirname(os.path.dirname("
                          "os.path.abspath(rlhf_jax.__file__))))"], env=env, cwd=cwd, capture_output=True, text=True)
    if out.returncode == 0:
        return pathlib.Path(out.stdout.strip().splitlines()[-1])
    if (REPO_ROOT / "rlhf_jax" / "__init__.py").exists():
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        return REPO_ROOT
    raise RuntimeError(f"cannot import rlhf_jax: {out.stderr[-2000:]}")


def _git_head(root: pathlib.Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "rlhf_jax", "configs"],
                               capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_variants(names: list[str] | None = None, *, scratch: str | os.PathLike | None = None,
                 code_root: str | os.PathLike | None = None, keep: bool = False, log=print) -> dict:
    """Build the fixtures and run `names` (default: all VARIANTS), in that order, in one child process.

    Returns {"code_root", "git_head", "fingerprint", "variants": {name: {"records": [...]} or {"error": str}},
    "seconds"}.
    """
    names = list(VARIANTS) if names is None else list(names)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        raise KeyError(f"unknown variants {sorted(unknown)}")
    for n in list(names):  # dependencies first
        for d in DEPENDS.get(n, []):
            if d not in names[:names.index(n)]:
                if d in names:
                    names.remove(d)
                names.insert(names.index(n), d)
    own = scratch is None
    work = pathlib.Path(tempfile.mkdtemp(prefix="rlhf_golden_") if own else scratch).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        env = child_env(pathlib.Path(code_root).resolve() if code_root else None, work)
        root = resolve_code_root(env, work)
        log(f"[golden] code under test: {root}/rlhf_jax (git {_git_head(root)}); scratch {work}")
        job = {"code_root": str(root), "work": str(work), "names": names}
        job_path = work / "job.json"
        job_path.write_text(json.dumps(job))
        start = time.perf_counter()
        log_path = work / "child.log"
        with open(log_path, "w") as logf:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", str(job_path)], env=env,
                                  cwd=work, stdout=logf, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
        result_path = work / "result.json"
        if proc.returncode != 0 or not result_path.exists():
            tail = log_path.read_text(errors="replace")[-6000:]
            raise RuntimeError(f"golden child process failed (status {proc.returncode}); log tail:\n{tail}")
        variants = json.loads(result_path.read_text())
        text = log_path.read_text(errors="replace")
        for name, v in variants.items():
            if "error" in v:
                v["error"] += f"\n--- {name}'s part of {log_path} ---\n" + _variant_log(text, name)[-6000:]
        log(f"[golden] {len(names)} variants in {seconds:.1f} s")
        return {"code_root": str(root), "git_head": _git_head(root), "fingerprint": fingerprint(),
                "variants": variants, "seconds": seconds}
    finally:
        if own and not keep:
            shutil.rmtree(work, ignore_errors=True)


def _variant_log(text: str, name: str) -> str:
    """The part of the child's log between a variant's start and end markers."""
    start = text.find(f"[golden] ===== {name}: rlhf-jax ")
    if start < 0:
        return text
    end = text.find(f"[golden] ===== {name}: ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def recording(result: dict) -> dict:
    """The metrics.json document of a complete, error-free run."""
    errors = {n: v["error"] for n, v in result["variants"].items() if "error" in v}
    if errors:
        raise RuntimeError("cannot record, variants failed:\n" + "\n".join(f"{n}: {e}" for n, e in errors.items()))
    return {
        "format": FORMAT,
        "recorded_from": {"code_root": result["code_root"], "git_head": result["git_head"]},
        "fingerprint": result["fingerprint"],
        "steps": STEPS,
        "variants": {n: {"command": VARIANTS[n][0], "config": VARIANTS[n][1], "overrides": describe_overrides(n),
                         "dropped_keys": result["variants"][n]["dropped_keys"],
                         "records": result["variants"][n]["records"]} for n in VARIANTS},
    }


# -------------------------------------------------------------------------------------------- comparison
def _same_float(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def diff_exact(expected, actual, path: str = "") -> list[str]:
    """Bit-for-bit differences (floats compared with ==, NaN equal to NaN; keys must match)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = []
        if set(expected) != set(actual):
            out.append(f"{path}: keys differ: missing {sorted(set(expected) - set(actual))}, "
                       f"extra {sorted(set(actual) - set(expected))}")
        for k in sorted(set(expected) & set(actual)):
            out += diff_exact(expected[k], actual[k], f"{path}.{k}")
        return out
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return [f"{path}: {len(expected)} entries recorded, {len(actual)} now"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in diff_exact(e, a, f"{path}[{i}]")]
    if isinstance(expected, float) or isinstance(actual, float):
        if isinstance(expected, (int, float)) and isinstance(actual, (int, float)) and \
                _same_float(float(expected), float(actual)):
            return []
        return [f"{path}: recorded {expected!r}, now {actual!r}"]
    return [] if expected == actual and type(expected) is type(actual) else [f"{path}: recorded {expected!r}, now {actual!r}"]


# ----------------------------------------------------------------------------------------------- child side
def _child(job_path: str) -> int:
    job = json.loads(pathlib.Path(job_path).read_text())
    root, work = pathlib.Path(job["code_root"]), pathlib.Path(job["work"])
    import rlhf_jax

    here = pathlib.Path(rlhf_jax.__file__).resolve().parent.parent
    if here != root.resolve():
        raise RuntimeError(f"child imported rlhf_jax from {here}, expected {root}")
    paths = _child_fixtures(work / "fixtures")
    from rlhf_jax.cli import main

    results = {}
    for name in job["names"]:
        out = work / "runs" / name
        if out.exists():
            shutil.rmtree(out)
        argv = variant_argv(name, root, paths, out)
        print(f"\n[golden] ===== {name}: rlhf-jax {' '.join(argv)}", flush=True)
        t = time.perf_counter()
        try:
            status = main(argv)
            if status != 0:
                raise RuntimeError(f"rlhf-jax {argv[0]} exited with status {status}")
            results[name] = _collect(name, out)
        except BaseException as e:  # noqa: BLE001 -- report and go on with the next variant
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"[golden] ===== {name}: {time.perf_counter() - t:.1f} s", flush=True)
        sys.stdout.flush()
    (work / "result.json").write_text(json.dumps(results))
    return 0


def _child_fixtures(root: pathlib.Path) -> dict[str, str]:
    from rlhf_jax import fixtures, tasks

    if root.exists():
        shutil.rmtree(root)
    tok = fixtures.build_tokenizer(root / "tokenizer")
    arch = dict(hidden=32, layers=2, heads=4, kv_heads=2, max_positions=128)
    model = fixtures.build_tiny_model(root / "model", "llama", tokenizer=tok, **arch)
    data = tasks.write_task_data(root / "data", n_sft=64, n_pref=64, n_eval=16, n_prompts=32, seed=0)
    for split in ("train", "eval"):
        rows = [json.loads(ln) for ln in pathlib.Path(data[f"pref_{split}"]).read_text().splitlines()]
        kto = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in rows
               for k in ("chosen", "rejected")]
        data[f"kto_{split}"] = tasks.write_jsonl(root / "data" / f"kto_{split}.jsonl", kto)
    return {"model": str(pathlib.Path(model).resolve()),
            **{k: str(pathlib.Path(v).resolve()) for k, v in data.items()}}


def _collect(name: str, out: pathlib.Path) -> dict:
    if VARIANTS[name][0] == "label":
        rows = [json.loads(ln) for ln in (out / "pairs.jsonl").read_text().splitlines() if ln.strip()]
        if not rows:
            raise RuntimeError(f"{out}/pairs.jsonl is empty")
        return {"records": rows, "dropped_keys": []}
    records, dropped = [], set()
    for ln in (out / "metrics.jsonl").read_text().splitlines():
        if not ln.strip():
            continue
        rec = json.loads(ln)
        if rec["step"] <= STEPS:
            records.append({k: v for k, v in rec.items() if not is_timing_key(k)})
            dropped |= {k for k in rec if is_timing_key(k)}
    if not records:
        raise RuntimeError(f"{out}/metrics.jsonl has no record with step <= {STEPS}")
    return {"records": records, "dropped_keys": sorted(dropped)}


# ------------------------------------------------------------------------------------------------------ CLI
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--record", metavar="JSON", help="run every variant and write the recording")
    g.add_argument("--check", metavar="JSON", help="run and compare bit-for-bit with a recording")
    g.add_argument("--out", metavar="JSON", help="run and write the raw results (no checks)")
    g.add_argument("--child", metavar="JOB", help=argparse.SUPPRESS)
    p.add_argument("--only", nargs="+", default=None, help="variants to run (default: all)")
    p.add_argument("--reverse", action="store_true", help="run the variants in reverse order (order check)")
    p.add_argument("--code-root", default=None, help="tree to import rlhf_jax from (default: PYTHONPATH/install)")
    p.add_argument("--scratch", default=None, help="scratch folder (default: a temp dir, removed)")
    args = p.parse_args(argv)
    if args.child:
        return _child(args.child)
    names = list(VARIANTS) if args.only is None else args.only
    if args.reverse:
        names = names[::-1]
    res = run_variants(names, scratch=args.scratch, code_root=args.code_root)
    if args.record:
        if args.only or args.reverse:
            raise SystemExit("--record runs every variant in VARIANTS order; drop --only/--reverse")
        pathlib.Path(args.record).write_text(json.dumps(recording(res), indent=1, sort_keys=True) + "\n")
        print(f"[golden] wrote {args.record}")
        return 0
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
        print(f"[golden] wrote {args.out}")
        return 0
    golden = json.loads(pathlib.Path(args.check).read_text())
    bad = 0
    for name, v in res["variants"].items():
        if "error" in v:
            print(f"FAIL {name}: {v['error']}")
            bad += 1
            continue
        diffs = diff_exact(golden["variants"][name]["records"], v["records"])
        print(f"{'ok  ' if not diffs else 'FAIL'} {name}" + "".join(f"\n    {d}" for d in diffs[:20]))
        bad += bool(diffs)
    print(f"[golden] fingerprint {'matches' if golden['fingerprint'] == res['fingerprint'] else 'DIFFERS'}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
