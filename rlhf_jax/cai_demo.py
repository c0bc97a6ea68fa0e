"""Constitutional AI on the demo task, end to end on CPU: does SFT on critique → revision data reduce a
measurable violation?

The toy constitution (``configs/constitutions/toy.yaml``) forbids unkind words (``rlhf_jax.tasks.NEGATIVE``);
the violation rate of a set of responses is the fraction holding at least one of them
(:func:`violation_rate`). A tiny random model cannot follow critique and revision instructions, so the
helper that writes critiques and revisions is itself a tiny model, SFT'd first on a synthetic dataset that
this module generates with code (:func:`helper_rows`): for a random demo response and a principle of the
constitution, the critique lists the response's unkind words (``" none."`` when there are none) and the
revision is the response with them removed. The helper then runs as a model through ``rlhf-jax
critique`` (sampling greedily), never as a function.

Stages (all under OUT): ``setup`` (tokenizer, two random tiny Llamas, task data, helper data) → ``policy``
(SFT on the mixed-quality demo corpus) → ``helper`` (SFT on the synthetic critique/revision rows) →
``critique`` (the policy's responses to the train prompts, one critique → revision round each) →
``sl_cai`` (the policy SFT'd on the revised rows) and ``control`` (the same SFT on the policy's own
unrevised first responses) → samples of each model on held-out prompts, and their violation rates.

Usage: ``python -m rlhf_jax.cai_demo runs/cai_demo``; prints one JSON summary (also ``OUT/summary.json``).
"""

from __future__ import annotations

import json
import pathlib
import random
import sys

import yaml

from rlhf_jax import tasks

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
_NEG = frozenset(tasks.NEGATIVE)


def unkind_words(response: str) -> list[str]:
    """The response's words that the toy constitution forbids (in order)."""
    return [w for w in tasks._WORD_RE.findall(response.lower()) if w in _NEG]


def violation_rate(responses: list[str]) -> float:
    """Fraction of responses holding at least one forbidden (unkind) word."""
    return sum(bool(unkind_words(r)) for r in responses) / max(len(responses), 1)


def violation(prompts, responses, **columns) -> list[float]:
    """Reward-function signature: 1.0 for a response with a forbidden word, else 0.0."""
    del prompts, columns
    return [float(bool(unkind_words(r))) for r in responses]


def critique_text(response: str) -> str:
    """The synthetic critique: the unkind words, or none."""
    bad = unkind_words(response)
    return " " + (", ".join(bad) if bad else "none") + "."


def revision_text(response: str) -> str:
    """The synthetic revision: the response's words without the unkind ones (format of the demo corpus)."""
    kept = [w for w in tasks._WORD_RE.findall(response.lower()) if w not in _NEG]
    return (" " + " ".join(kept) + ".") if kept else "."


def helper_rows(n: int, principles: list[dict], *, seed: int) -> list[dict]:
    """``2n`` prompt/completion rows teaching the helper both steps, with the constitution's own request texts."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, response = tasks.make_prompt(rng.choice(tasks.TOPICS)), tasks.sample_response(rng)
        p = rng.choice(principles)
        context = prompt + response + p["critique"]
        rows.append({"prompt": context, "completion": critique_text(response)})
        rows.append({"prompt": context + critique_text(response) + p["revision"], "completion": revision_text(response)})
    return rows


def _sft(out: pathlib.Path, name: str, model: str, data: str, steps: int, lr: float, extra=()) -> str:
    from rlhf_jax.recipes import load_trainer_config, sft

    cfg = load_trainer_config("sft", str(CONFIG_DIR / "sft_tiny_cpu.yaml"), [
        f"model.path={model}", f"data.path={data}", "data.eval_path=null", f"run.output_dir={out / name}",
        f"run.total_steps={steps}", f"optim.learning_rate={lr}", "run.eval_every=0", "run.save_every=0",
        f"run.log_every={max(steps // 4, 1)}", "run.keep_best_metric=null", "run.progress=off", *extra])
    return sft.train(cfg)["export_dir"]


def _samples(model: str, prompts: str, out: pathlib.Path, *, samples: int) -> list[str]:
    from rlhf_jax import cli

    code = cli.main(["generate", "--model", model, "--data", prompts, "--output", str(out), "--samples",
                     str(samples), "--max-new-tokens", "16", "--temperature", "1", "--seed", "0", "--batch-size", "64"])
    assert code == 0, f"generate failed for {model}"
    return [c for line in out.read_text().splitlines() for c in json.loads(line)["completions"]]


def run(out: pathlib.Path, *, n_prompts: int = 512, samples: int = 4) -> dict:
    """Every stage; returns the summary (violation rates and gold scores before/after)."""
    from rlhf_jax import fixtures
    from rlhf_jax.recipes import critique, load_trainer_config

    out.mkdir(parents=True, exist_ok=True)
    principles = yaml.safe_load((CONFIG_DIR / "constitutions" / "toy.yaml").read_text())
    tok = fixtures.build_tokenizer(out / "tokenizer")
    base = {name: str(fixtures.build_tiny_model(out / name, "llama", tokenizer=tok, seed=seed, hidden=64, layers=2,
                                                heads=4, kv_heads=2, max_positions=128))
            for name, seed in (("policy_base", 0), ("helper_base", 1))}
    data = tasks.write_task_data(out / "data", n_sft=3000, n_pref=8, n_eval=8, n_prompts=n_prompts, seed=0)
    eval_prompts = tasks.write_jsonl(out / "data" / "prompts_heldout.jsonl", tasks.prompt_rows(128, seed=99))
    helper_data = tasks.write_jsonl(out / "data" / "helper_sft.jsonl", helper_rows(3000, principles, seed=7))
    seq = ["data.max_prompt_len=48", "data.max_completion_len=16", "data.max_seq_len=64", "data.buckets=[64]"]

    policy = _sft(out, "policy", base["policy_base"], str(data["sft_train"]), 150, 3e-3)
    helper = _sft(out, "helper", base["helper_base"], str(helper_data), 600, 3e-3, seq)
    res = critique.train(load_trainer_config("critique", str(CONFIG_DIR / "critique_tiny_cpu.yaml"), [
        f"model.path={policy}", f"helper_model={helper}", f"data.path={data['prompts_train']}",
        f"output_path={out / 'critique' / 'revised.jsonl'}", "revision.temperature=0", "rollout.batch_size=32"]))
    traces = [json.loads(line) for line in pathlib.Path(res["trace_path"]).read_text().splitlines()]
    first = [t["response"] for t in traces]
    revised = [t["rounds"][-1]["revision"] for t in traces]
    unrevised = tasks.write_jsonl(out / "critique" / "unrevised.jsonl",
                                  [{"prompt": t["prompt"], "completion": t["response"]} for t in traces])
    sl_cai = _sft(out, "sl_cai", policy, res["output_path"], 100, 1e-3)
    control = _sft(out, "control", policy, str(unrevised), 100, 1e-3)

    summary = {"critique_data": {"rows": len(traces), "violation_first_response": violation_rate(first),
                                 "violation_revision": violation_rate(revised),
                                 "gold_first_response": _mean(tasks.gold_score(first, first)),
                                 "gold_revision": _mean(tasks.gold_score(revised, revised))}}
    for name, model in (("policy_before", policy), ("sl_cai_after", sl_cai), ("control_sft_on_unrevised", control)):
        texts = _samples(model, str(eval_prompts), out / "samples" / f"{name}.jsonl", samples=samples)
        summary[name] = {"samples": len(texts), "violation_rate": violation_rate(texts),
                         "gold_score": _mean(tasks.gold_score(texts, texts)),
                         "mean_words": _mean([len(tasks._WORD_RE.findall(t.lower())) for t in texts])}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / max(len(xs), 1)


if __name__ == "__main__":
    print(json.dumps(run(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/cai_demo")), indent=2))
