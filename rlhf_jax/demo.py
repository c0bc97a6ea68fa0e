"""`rlhf-jax demo`: a tiny end-to-end RLHF run on CPU, fully offline.

Stages (each a function `stage(ctx) -> dict` in `STAGES`; a later stage such as PPO appends one line):
  0. setup: byte-level BPE tokenizer + random tiny Llama (`rlhf_jax.fixtures`), and the "describe X" task
     corpora (`rlhf_jax.tasks`: SFT rows, gold-labelled preference pairs, RL prompts) as JSONL;
  1. sft: fine-tune the tiny Llama on mixed-quality descriptions (configs/sft_tiny_cpu.yaml);
  2. rm: train a reward model from the SFT export on the preference pairs (configs/rm_tiny_cpu.yaml) and
     report its held-out pairwise accuracy (target >= 90%);
  3. ppo: PPO from the SFT export against that reward model (configs/ppo_tiny_cpu.yaml); prints the gold
     score and KL of sampled responses before -> after, and the held-out prompts' numbers (greedy and
     sampled score and gold score, length, EOS rate; `online.heldout`) of the SFT policy vs the PPO policy.
Everything lands under OUT (default runs/demo): data/, base_model/, <stage>/{metrics.jsonl, checkpoints/,
model/, curves.png}, and demo_summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import time
from typing import Callable

from rlhf_jax import tasks

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
QUICK_STEPS = 6


@dataclasses.dataclass
class DemoContext:
    """What the stages share: the output folder, the mode, and every earlier stage's result."""

    out: pathlib.Path
    quick: bool
    data: dict[str, pathlib.Path] = dataclasses.field(default_factory=dict)
    results: dict[str, dict] = dataclasses.field(default_factory=dict)

    def stage_dir(self, name: str) -> pathlib.Path:
        """A fresh folder for stage `name` (a previous demo's outputs of that stage are removed)."""
        d = self.out / name
        if d.exists():
            shutil.rmtree(d)
        return d

    def overrides(self, name: str, *, steps: int) -> list[str]:
        """Common overrides of a stage's tiny config: its output folder, no resume, quick step counts."""
        o = [f"run.output_dir={self.stage_dir(name)}", "run.resume=never", "run.tensorboard=false"]
        if self.quick:
            o += [f"run.total_steps={QUICK_STEPS}", f"run.log_every={QUICK_STEPS // 2}", "run.eval_every=0",
                  "run.save_every=0", "optim.warmup_steps=1", "batch_size=8"]
        else:
            o += [f"run.total_steps={steps}"]
        return o


def stage_setup(ctx: DemoContext) -> dict:
    """Tokenizer + tiny Llama + task corpora."""
    from rlhf_jax import fixtures

    tokenizer = fixtures.build_tokenizer(ctx.out / "tokenizer")
    base = fixtures.build_tiny_model(ctx.out / "base_model", "llama", tokenizer=tokenizer, hidden=64, layers=2,
                                     heads=4, kv_heads=2, max_positions=128)
    n = 128 if ctx.quick else 3000
    ctx.data = tasks.write_task_data(ctx.out / "data", n_sft=n, n_pref=n, n_eval=64 if ctx.quick else 256,
                                     n_prompts=64 if ctx.quick else 512, seed=0)
    return {"base_model": str(base), "data_dir": str(ctx.out / "data")}


def stage_sft(ctx: DemoContext) -> dict:
    """Supervised fine-tuning of the tiny Llama on the task corpus."""
    from rlhf_jax.recipes import load_trainer_config
    from rlhf_jax.recipes import sft

    overrides = ctx.overrides("sft", steps=150) + [
        f"model.path={ctx.out / 'base_model'}", f"data.path={ctx.data['sft_train']}",
        f"data.eval_path={ctx.data['sft_eval']}"]
    return sft.train(load_trainer_config("sft", str(CONFIG_DIR / "sft_tiny_cpu.yaml"), overrides))


def stage_rm(ctx: DemoContext) -> dict:
    """Reward model from the SFT export on gold-labelled pairs; held-out pairwise accuracy."""
    from rlhf_jax.recipes import load_trainer_config
    from rlhf_jax.recipes import rm

    overrides = ctx.overrides("rm", steps=150) + [
        f"model.path={ctx.results['sft']['export_dir']}", f"data.path={ctx.data['pref_train']}",
        f"data.eval_path={ctx.data['pref_eval']}"]
    return rm.train(load_trainer_config("rm", str(CONFIG_DIR / "rm_tiny_cpu.yaml"), overrides))


def stage_ppo(ctx: DemoContext) -> dict:
    """PPO from the SFT export against the reward model; prints gold score and KL before -> after."""
    from rlhf_jax.recipes import load_trainer_config
    from rlhf_jax.recipes import ppo

    iters = QUICK_STEPS if ctx.quick else 60
    overrides = [f"run.output_dir={ctx.stage_dir('ppo')}", "run.resume=never", "run.tensorboard=false",
                 f"run.total_steps={iters}", f"run.log_every={max(iters // 6, 1)}", f"run.save_every={iters}",
                 f"model.path={ctx.results['sft']['export_dir']}", f"reward.model_path={ctx.results['rm']['export_dir']}",
                 f"data.path={ctx.data['prompts_train']}", f"data.eval_path={ctx.data['prompts_eval']}"]
    if ctx.quick:
        overrides += ["rollout.batch_size=8", "sample_every=0"]
    result = ppo.train(load_trainer_config("ppo", str(CONFIG_DIR / "ppo_tiny_cpu.yaml"), overrides),
                       evaluate_initial=True)
    table = ppo.before_after(result["history"])
    heldout = heldout_table(result["eval_initial"], result["eval"])
    print(ppo.format_before_after(table), flush=True)
    print(format_heldout(heldout), flush=True)
    return {"output_dir": result["output_dir"], "export_dir": result.get("export_dir"), "before_after": table,
            "heldout": heldout}


#: held-out metrics the demo reports (``online.heldout``), in order
HELDOUT_KEYS = ("score", "gold_score", "sampled_score", "sampled_gold_score", "response_length", "eos_rate")


def heldout_table(before: dict, after: dict) -> dict:
    """``{metric: {"before", "after"}}`` of the held-out evaluation of the initial and the final policy."""
    return {k: {"before": float(before[k]), "after": float(after[k])} for k in HELDOUT_KEYS
            if k in before and k in after}


def format_heldout(table: dict) -> str:
    """A small text table of :func:`heldout_table`."""
    lines = ["PPO: held-out prompts (greedy unless 'sampled'), SFT policy vs PPO policy",
             f"{'metric':<20}{'before':>10}{'after':>10}"]
    return "\n".join(lines + [f"{k:<20}{v['before']:>10.3f}{v['after']:>10.3f}" for k, v in table.items()])


#: (name, stage) in run order; later algorithms append theirs (e.g. ("ppo", stage_ppo)).
STAGES: list[tuple[str, Callable[[DemoContext], dict]]] = [("setup", stage_setup), ("sft", stage_sft), ("rm", stage_rm),
                                                           ("ppo", stage_ppo)]


def _report(ctx: DemoContext, seconds: dict[str, float]) -> str:
    from rlhf_jax.train.plots import plot_curves, summary_table

    lines = []
    for name, result in ctx.results.items():
        metrics = ctx.out / name / "metrics.jsonl"
        if not metrics.exists():
            continue
        outputs = {"metrics": metrics, "checkpoints": ctx.out / name / "checkpoints"}
        if "export_dir" in result:
            outputs["exported HF model"] = result["export_dir"]
        try:
            outputs["curves"] = plot_curves(metrics, ctx.out / name / "curves.png", title=f"demo: {name}")
        except ValueError:
            pass
        lines.append(summary_table(metrics, outputs=outputs, title=f"{name} ({seconds[name]:.0f} s)"))
    return "\n\n".join(lines)


def run_demo(out: str | pathlib.Path = "runs/demo", *, quick: bool = False) -> dict:
    """Run every stage in `STAGES`; print a summary and where everything went; return the results."""
    ctx = DemoContext(out=pathlib.Path(out).absolute(), quick=quick)
    ctx.out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    for name, stage in STAGES:
        print(f"\n===== demo stage: {name} =====", flush=True)
        t = time.perf_counter()
        ctx.results[name] = stage(ctx)
        seconds[name] = time.perf_counter() - t
    total = time.perf_counter() - start
    print("\n" + _report(ctx, seconds))
    summary = {"out": str(ctx.out), "quick": quick, "seconds": {**seconds, "total": total}, "results": ctx.results}
    if "rm" in ctx.results:
        summary["rm_heldout_accuracy"] = ctx.results["rm"].get("eval/accuracy")
        print(f"\nreward model held-out pairwise accuracy: {summary['rm_heldout_accuracy']:.3f} "
              f"({int(ctx.results['rm'].get('eval/pairs', 0))} pairs)")
    if "ppo" in ctx.results:
        summary["ppo_before_after"] = ctx.results["ppo"]["before_after"]
        from rlhf_jax.recipes.ppo import format_before_after
        print("\n" + format_before_after(summary["ppo_before_after"]))
        summary["ppo_heldout"] = ctx.results["ppo"]["heldout"]
        print("\n" + format_heldout(summary["ppo_heldout"]))
    (ctx.out / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"demo finished in {total:.0f} s; everything is under {ctx.out} (summary: {ctx.out / 'demo_summary.json'})")
    return summary
