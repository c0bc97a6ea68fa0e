"""LoRA vs full fine-tuning on the same budget: demo task (GRPO, PPO; 15 iterations) and arithmetic (GRPO, 40).

Usage: ``python benchmarks/lora_learning.py OUT_DIR TASK:TRAINER:MODE:LR ...`` with TASK demo|arith, TRAINER
grpo|ppo, MODE full|lora (rank 8, alpha 16, all projections), e.g. ``demo:grpo:full:1e-3 demo:grpo:lora:5e-3``.
Starts from the same briefly SFT'd tiny model as ``tests/recipes/test_lora_learning.py``; prints (and appends to
OUT_DIR/learn.jsonl) the sampled gold score (demo) / exact match (arith) before and after, one sample per prompt.
"""
import json, pathlib, sys, time
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "recipes"))
from _sampling_helpers import sampled_accuracy, sft_export
from rlhf_jax import tasks, verifiable, cli
from rlhf_jax.config import load_config
from rlhf_jax.recipes import grpo, ppo

base = pathlib.Path(sys.argv[1]); base.mkdir(parents=True, exist_ok=True)
LORA = ("model.lora.rank=8", "model.lora.alpha=16", "model.lora.targets=[all]")
which = sys.argv[2:]
out = open(base / "learn.jsonl", "a")

def run(task, trainer, lora, lr):
    s = sft_export(base, task)
    tag = f"{task}-{trainer}-{'lora' if lora else 'full'}-lr{lr}"
    od = base / tag
    t0 = time.time()
    if task == "demo":
        prompts = [tasks.make_prompt(t) for t in tasks.TOPICS] * 4
        fn, mnt = tasks.gold_score, 12
        common = (f"model.path={s['model']}", f"data.path={s['prompts']}", "data.max_prompt_len=16",
                  "reward.functions=[rlhf_jax.tasks:gold_score]", "reward.gold_function=rlhf_jax.tasks:gold_score",
                  "rollout.max_new_tokens=12", "run.total_steps=15", f"run.output_dir={od}",
                  "run.tensorboard=false", "run.log_every=5", "run.progress=off", *(LORA if lora else ()))
        if trainer == "grpo":
            cfg = load_config(grpo.GRPOConfig, None, (*common, "algo.group_size=4", "rollout.batch_size=16",
                                                      f"actor_optim.learning_rate={lr}"))
        else:
            cfg = load_config(ppo.PPOConfig, None, (*common, "rollout.batch_size=16", "ppo.epochs=2",
                                                    f"actor_optim.learning_rate={lr}",
                                                    f"critic_optim.learning_rate={lr}", "kl.coef=0.02"))
    else:
        prompts = verifiable.arith_prompts(max_operand=4) * 16
        fn, mnt = verifiable.arith_reward, 3
        cfg = cli.load_trainer_config("grpo", None, (
            f"model.path={s['model']}", f"data.path={s['prompts']}", f"run.output_dir={od}",
            "algo.group_size=8", "algo.num_minibatches=2", "rollout.batch_size=8", "rollout.max_new_tokens=3",
            "reward.functions=[rlhf_jax.verifiable:arith_reward]", "reward.gold_function=rlhf_jax.verifiable:arith_reward",
            "run.total_steps=40", "run.log_every=10", "run.tensorboard=false", "data.max_prompt_len=8",
            "run.progress=off", f"actor_optim.learning_rate={lr}", *(LORA if lora else ())))
    before = sampled_accuracy(s["model"], s["tokenizer"], prompts, fn, max_new_tokens=mnt)
    res = (grpo if trainer == "grpo" else ppo).train(cfg)
    if trainer == "ppo":
        pair = (res["models"].actor, res["state"]["actor"].params)
    else:
        pair = (res["model"], res["state"].params)
    after = sampled_accuracy(pair, s["tokenizer"], prompts, fn, max_new_tokens=mnt)
    rec = dict(tag=tag, before=round(before, 3), after=round(after, 3), secs=round(time.time() - t0, 1),
               batch_gold=[round(h["gold_score"], 2) for h in res["history"]])
    print(json.dumps(rec), flush=True); out.write(json.dumps(rec) + "\n"); out.flush()

for spec in which:
    task, trainer, mode, lr = spec.split(":")
    run(task, trainer, mode == "lora", float(lr))
