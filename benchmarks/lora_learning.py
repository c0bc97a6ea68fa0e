"""LoRA vs full fine-tuning on the same budget: demo task (GRPO, PPO; 15 iterations), arithmetic and max-digit
(GRPO, 40 iterations).

Usage: ``python benchmarks/lora_learning.py OUT_DIR TASK:TRAINER:MODE:LR[:key=value...] ...`` with TASK
demo|arith|maxdigit, TRAINER grpo|ppo (ppo: demo only), MODE

* ``full``: every weight trains;
* ``lora``: rank 8, alpha 16, all projections, plain LoRA (A and B at LR);
* ``lora+``: the recommended setting (README "Results"): rank 8, alpha 16, targets ``[all, lm_head]`` (the blocks'
  projections and the untied output layer) and LoRA+ (``lora_plus_ratio=16``: B at 16 x LR, A at LR; actor and
  critic), at the full fine-tune's LR;
* ``full-proj`` (a diagnostic): full fine-tuning of the blocks' projections only (the weights LoRA ``all``
  adapts), embeddings, output layer and norms frozen;

and optional ``key=value`` overrides (``seed=S`` sets ``run.seed`` and ``model.lora.seed``; any other is a config
override, e.g. ``model.lora.alpha=45.25``), e.g. ``demo:grpo:full:1e-3 demo:grpo:lora+:1e-3:seed=1``.
Starts from the same briefly SFT'd tiny model as ``tests/recipes/test_lora_learning.py`` (max-digit: the SFT start
of ``benchmarks/heldout_learning.py``); prints (and appends to OUT_DIR/learn.jsonl) the sampled gold score (demo) /
exact match (arith, maxdigit) before and after, one sample per prompt, and the size of the learned update:
``dW_rel`` = ||W_after − W_before||_F / ||W_before||_F over the blocks' projections (LoRA: the merged W + s·A B),
``A_rel`` = RMS of the adapters' A over its initial RMS 1/sqrt(3·fan_in) (LoRA only).
"""
import json, math, pathlib, sys, time
import jax
import numpy as np
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "recipes"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _sampling_helpers import sampled_accuracy, sft_export
import heldout_learning as heldout
from rlhf_jax import models, tasks, verifiable, cli
from rlhf_jax.config import load_config
from rlhf_jax.models import lora as lora_lib
from rlhf_jax.recipes import grpo, ppo
from rlhf_jax.runtime import xla

xla.enable_compilation_cache()  # reruns (other seeds, the same program) load their compiled programs

base = pathlib.Path(sys.argv[1]).absolute(); base.mkdir(parents=True, exist_ok=True)
LORA = ("model.lora.rank=8", "model.lora.alpha=16", "model.lora.targets=[all]")
LORA_PLUS = ("model.lora.rank=8", "model.lora.alpha=16", "model.lora.targets=[all,lm_head]",
             "actor_optim.lora_plus_ratio=16")
out = open(base / "learn.jsonl", "a")
MAKE_OPTIMIZER = grpo.make_optimizer


def update_size(model, params, base_params) -> dict:
    """dW_rel over the projection matrices, and A_rel (see the module docstring)."""
    spec = model.config.lora
    new = lora_lib.merged(params, spec) if spec is not None else params
    old = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(base_params)[0]}
    num = den = 0.0
    a_rel = []
    for path, w in jax.tree_util.tree_flatten_with_path(new)[0]:
        if str(path[-1].key) in lora_lib.TARGETS["all"]:
            w0 = np.asarray(old[jax.tree_util.keystr(path)], np.float64)
            num += float(np.sum((np.asarray(w, np.float64) - w0) ** 2)); den += float(np.sum(w0 ** 2))
    for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
        if str(path[-1].key).endswith(lora_lib.SUFFIX_A):
            fan_in = math.prod(a.shape[:-1])
            a_rel.append(float(np.sqrt(np.mean(np.asarray(a, np.float64) ** 2)) * math.sqrt(3 * fan_in)))
    return dict(dW_rel=round(math.sqrt(num / den), 4), **({"A_rel": round(float(np.mean(a_rel)), 3)} if a_rel else {}))


def projections_only(make_optimizer):
    """`make_optimizer` whose updates are zero outside the projection matrices (embeddings, lm_head, norms frozen; a value head trains):
    the diagnostic MODE `full-proj`, full fine-tuning of exactly the weights LoRA `all` adapts."""
    import optax

    def frozen(params):
        return jax.tree_util.tree_map_with_path(lambda p, x: str(p[-1].key) not in (*lora_lib.TARGETS["all"], "score"), params)

    return lambda cfg, steps: optax.chain(make_optimizer(cfg, steps), optax.masked(optax.set_to_zero(), frozen))


def start(task):
    """(SFT export dir, prompts file, tokenizer, eval prompts, reward fn, its import path, eval new tokens)."""
    if task == "maxdigit":
        model, prompt_file, tok = heldout.sft_start(base / "heldout", "maxdigit", 30)
        spec = heldout.TASKS["maxdigit"]
        return model, prompt_file, tok, spec["prompts"]() * 2, spec["fn"], spec["reward"], 3
    s = sft_export(base, task)
    if task == "demo":
        return (s["model"], s["prompts"], s["tokenizer"], [tasks.make_prompt(t) for t in tasks.TOPICS] * 4,
                tasks.gold_score, "rlhf_jax.tasks:gold_score", 12)
    return (s["model"], s["prompts"], s["tokenizer"], verifiable.arith_prompts(max_operand=4) * 16,
            verifiable.arith_reward, "rlhf_jax.verifiable:arith_reward", 3)


def run(task, trainer, mode, lr, extra):
    model_dir, prompt_file, tok, prompts, fn, reward, mnt = start(task)
    seed = int(extra.pop("seed", 0))
    tag = "-".join([task, trainer, mode, f"lr{lr}", f"s{seed}", *(f"{k}={v}" for k, v in extra.items())])
    od = base / tag.replace("/", "_")
    lora = {"full": (), "full-proj": (), "lora": LORA, "lora+": LORA_PLUS}[mode]
    recipe = grpo if trainer == "grpo" else ppo
    recipe.make_optimizer = projections_only(MAKE_OPTIMIZER) if mode == "full-proj" else MAKE_OPTIMIZER
    if mode == "lora+" and trainer == "ppo":
        lora = (*lora, "critic_optim.lora_plus_ratio=16")
    run_keys = (f"run.seed={seed}", *((f"model.lora.seed={seed}",) if lora else ()), f"run.output_dir={od}",
                "run.tensorboard=false", "run.progress=off", "run.resume=never", "run.overwrite=true",
                *lora, *(f"{k}={v}" for k, v in extra.items()))
    t0 = time.time()
    if task == "demo":
        common = (f"model.path={model_dir}", f"data.path={prompt_file}", "data.max_prompt_len=16",
                  f"reward.functions=[{reward}]", f"reward.gold_function={reward}",
                  "rollout.max_new_tokens=12", "run.total_steps=15", "run.log_every=5")
        if trainer == "grpo":
            cfg = load_config(grpo.GRPOConfig, None, (*common, "algo.group_size=4", "rollout.batch_size=16",
                                                      f"actor_optim.learning_rate={lr}", *run_keys))
        else:
            cfg = load_config(ppo.PPOConfig, None, (*common, "rollout.batch_size=16", "ppo.epochs=2",
                                                    f"actor_optim.learning_rate={lr}",
                                                    f"critic_optim.learning_rate={lr}", "kl.coef=0.02", *run_keys))
    else:
        cfg = cli.load_trainer_config("grpo", None, (
            f"model.path={model_dir}", f"data.path={prompt_file}",
            "algo.group_size=8", "algo.num_minibatches=2", "rollout.batch_size=8", "rollout.max_new_tokens=3",
            f"reward.functions=[{reward}]", f"reward.gold_function={reward}",
            "run.total_steps=40", "run.log_every=10", "data.max_prompt_len=8",
            f"actor_optim.learning_rate={lr}", *run_keys))
    before = sampled_accuracy(model_dir, tok, prompts, fn, max_new_tokens=mnt)
    res = (grpo if trainer == "grpo" else ppo).train(cfg)
    if trainer == "ppo":
        pair = (res["models"].actor, res["state"]["actor"].params)
    else:
        pair = (res["model"], res["state"].params)
    after = sampled_accuracy(pair, tok, prompts, fn, max_new_tokens=mnt)
    hist = res["history"]
    grad = {k: [round(float(h[k]), 3) for h in hist if k in h] for k in hist[-1] if k.endswith("grad_norm")}
    rec = dict(tag=tag, before=round(before, 3), after=round(after, 3), secs=round(time.time() - t0, 1),
               **update_size(pair[0], pair[1], models.load_pretrained(model_dir)[1]),
               batch_gold=[round(h["gold_score"], 2) for h in hist], **grad)
    print(json.dumps(rec), flush=True); out.write(json.dumps(rec) + "\n"); out.flush()


for spec in sys.argv[2:]:
    task, trainer, mode, lr, *kv = spec.split(":")
    run(task, trainer, mode, float(lr), dict(x.split("=", 1) for x in kv))
