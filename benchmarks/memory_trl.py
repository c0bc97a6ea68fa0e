"""TRL's side of `benchmarks/memory.py`: TRL 1.12 `PPOTrainer` with PEFT LoRA, peak host memory of its process.

Runs inside the TRL venv (`.venv-trl/bin/python` with `PYTHONPATH=.trl112:<repo>`); `benchmarks/memory.py`
starts it, one fresh process per configuration. The models come from the same safetensors folder as ours:

    policy     AutoModelForCausalLM, f32, `peft_config=LoraConfig(r, alpha, all 7 projections)` given to the
               trainer (TRL wraps it with `get_peft_model`); `ref_model=None`, so TRL's reference is the
               policy with the adapter disabled (`null_ref_context` → `disable_adapter()`), no second copy
    value      AutoModelForSequenceClassification (num_labels=1), f32, its OWN base. TRL 1.12 applies
               `peft_config` to the policy only; mode `trl_peft` puts the same LoRA on the value model's
               backbone with `peft.inject_adapter_in_model` and freezes the rest but the `score` head (what
               our `lora` mode does for the critic); mode `trl_peft_value_full` leaves it fully trained (what
               TRL 1.12 itself does with a `peft_config`)
    reward     AutoModelForSequenceClassification, f32, frozen (no_grad, not in the optimizer); from its own
               folder when `benchmarks/memory.py --separate-reward` gives one (a real copy, so no page is shared)

Workload as ours: `batch` prompts of exactly `prompt_len` tokens, exactly `new_tokens` sampled tokens
(temperature 1, no stop token), 1 epoch × 1 minibatch, k1 KL with β = 0.05, f32 (`bf16=False`).
Measured: `VmHWM` of this process right after each optimizer step (a `TrainerCallback`), its `RssAnon` and
`RssFile` then (torch keeps `from_pretrained`'s safetensors mapped: frozen weights stay file-backed pages the
kernel may drop and re-read, and a file mapped by two models counts twice in RSS but once in RAM), and the
seconds from the end of the previous step (the first includes the trainer's start-up).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def vm_kib(field: str) -> int:
    """`VmHWM` / `VmRSS` of this process (KiB)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def run(mode: str, model_dir: str, prompts_path: str, *, batch: int, prompt_len: int, new_tokens: int,
        iters: int, rank: int, alpha: int, micro_batches: int = 1, reward_dir: str | None = None) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    import transformers
    from datasets import Dataset
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    transformers.logging.set_verbosity_error()
    if mode not in ("trl_peft", "trl_peft_value_full"):
        raise ValueError(f"unknown TRL mode {mode!r}")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    prompts = [json.loads(line)["input_ids"] for line in open(prompts_path)]
    if any(len(p) != prompt_len for p in prompts):
        raise ValueError(f"{prompts_path}: every prompt must have exactly {prompt_len} tokens")
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    value = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(reward_dir or model_dir, num_labels=1,
                                                                dtype=torch.float32)
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id
    lora = dict(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=TARGETS, bias="none")
    if mode == "trl_peft":
        inject_adapter_in_model(LoraConfig(**lora), value.model)
        for name, p in value.named_parameters():
            p.requires_grad_("lora_" in name or name.startswith("score"))
    reward.requires_grad_(False)
    ds = Dataset.from_dict({"input_ids": [prompts[i % len(prompts)] for i in range(batch * iters)]})
    cfg = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-mem-"), learning_rate=1e-5, lr_scheduler_type="constant",
        logging_steps=10_000, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, bf16=False,
        seed=0, data_seed=0, dataloader_num_workers=0, gradient_accumulation_steps=micro_batches,
        max_grad_norm=1.0, per_device_train_batch_size=batch // micro_batches, total_episodes=batch * iters,
        num_ppo_epochs=1, num_mini_batches=1,
        local_rollout_forward_batch_size=batch, response_length=new_tokens, stop_token=None, temperature=1.0,
        kl_coef=0.05, kl_estimator="k1", gamma=1.0, lam=0.95, num_sample_generations=0, missing_eos_penalty=None)
    rows = []

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()
            self.rss_start = vm_kib("VmRSS")

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            rows.append({"iteration_s": round(now - self.t, 2), "hwm_gib": vm_kib("VmHWM") / 2**20,
                         "anon_gib": vm_kib("RssAnon") / 2**20, "file_gib": vm_kib("RssFile") / 2**20})
            self.t = now

    probe = Probe()
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         value_model=value, train_dataset=ds, eval_dataset=ds.select(range(batch)), callbacks=[probe],
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **lora))
    trainable = {"policy": sum(p.numel() for p in trainer.model.policy.parameters() if p.requires_grad),
                 "value": sum(p.numel() for p in trainer.model.value_model.parameters() if p.requires_grad)}
    trainer.train()
    if len(rows) != iters:
        raise RuntimeError(f"TRL ran {len(rows)} optimizer steps, expected {iters}")
    import peft
    import trl

    return {"mode": mode, "peak_rss_gib": rows[-1]["hwm_gib"], "rss_after_load_gib": probe.rss_start / 2**20,
            "peak_process_gib": vm_kib("VmHWM") / 2**20, "iteration_s": [r["iteration_s"] for r in rows],
            "rss_anon_gib": [round(r["anon_gib"], 3) for r in rows],
            "rss_file_gib": [round(r["file_gib"], 3) for r in rows],
            "trainable": trainable, "threads": torch.get_num_threads(),
            "framework": f"trl {trl.__version__} PPOTrainer, peft {peft.__version__}, torch {torch.__version__}"}


def main() -> None:
    mode, model_dir, prompts = sys.argv[1:4]
    batch, prompt_len, new_tokens, iters, rank, alpha = (int(a) for a in sys.argv[4:10])
    micro_batches = int(sys.argv[10]) if len(sys.argv) > 10 else 1
    reward_dir = sys.argv[11] if len(sys.argv) > 11 else None
    res = run(mode, model_dir, prompts, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, iters=iters,
              rank=rank, alpha=alpha, micro_batches=micro_batches, reward_dir=reward_dir)
    print("MEM_JSON " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
