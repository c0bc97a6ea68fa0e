"""The JAX peer: Google's Tunix (`google-tunix`, Flax NNX) on the benchmarks' workloads, as a round worker.

Runs inside `.venv-tunix` (`bash benchmarks/setup_tunix.sh`), never in rlhf_jax's environment, as one
long-lived subprocess of `benchmarks/{grpo,dpo,ppo}.py` (protocol: `benchmarks/_rounds.py`): it loads, runs
`--warmup` steps (compilation), prints `PEER_READY`, and for each `go` on stdin runs `--iters` steps and prints
`PEER_ROUND {"rows": [...]}`.

Models: Tunix's own `Llama3` (`tunix.models.llama3`) loaded with its safetensors loader from the same folder that
rlhf_jax and TRL load (written by `benchmarks/_common.build_llama`); the config comes from that folder's
`config.json` (rope θ 10,000, untied head, f32). Critic and reward model (PPO): the same backbone with its LM
head replaced by a D×1 head (Tunix's `compute_score` takes the model's `[B, T, 1]` output), like TRL's
`AutoModelForSequenceClassification` (score head without bias); its `__call__` accepts and drops the
`segment_ids=` that Tunix 0.1.7's `compute_score` passes but its own `Llama3` does not take.

Workloads (as TRL's): GRPO 8 prompts × 4 generations, 64 + 64 tokens, β = 0.04, token-mean loss, AdamW 1e-5 with
global-norm clip 1.0; DPO 8 pairs of 64 + 64 tokens, sigmoid, β = 0.1; PPO 32 prompts × 64 new tokens, γ = 1,
λ = 0.95, β = 0.05, one mini-batch, one epoch, reward model + critic. EOS never stops a row early: the rollout's
`eos_tokens` is an id outside the vocabulary, so every response has exactly 64 tokens (TRL: `min_new_tokens`).

Timing: one step = the time between the learner's consecutive pulls of a batch from the data iterator, i.e.
everything the learner does per step (rollout, reference/critic/reward passes, update, weight sync, metrics);
at a round boundary the model's state is blocked on before the clock stops.

Tunix 0.1.7's PPO builds its per-token reward tensor with `jnp.zeros_like(completion_ids)`, i.e. int32, so a
fractional score added at the last token is truncated to 0. This worker patches that one call on the peer's
side (`ppo_learner.jnp.zeros_like` → float32 for integer inputs): the work done is unchanged, the rewards are right.

Usage (from the drivers): bench_tunix.py {grpo,dpo,ppo} --model DIR [--prompts FILE] --warmup W --iters I --rounds R
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import _rounds as R  # noqa: E402

LR, CLIP = 1e-5, 1.0


def tunix_config(model_dir: str):
    from tunix.models.llama3 import model as llama

    c = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    if c.get("tie_word_embeddings"):
        raise ValueError(f"{model_dir}/config.json: tie_word_embeddings must be false for this benchmark")
    return llama.ModelConfig(
        num_layers=c["num_hidden_layers"], vocab_size=c["vocab_size"], embed_dim=c["hidden_size"],
        hidden_dim=c["intermediate_size"], num_heads=c["num_attention_heads"],
        head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        num_kv_heads=c["num_key_value_heads"], rope_theta=int(c["rope_theta"]), norm_eps=c["rms_norm_eps"],
        weight_tying=False)


def mesh():
    import jax

    auto = jax.sharding.AxisType.Auto  # Tunix's models index with implicit shardings
    return jax.make_mesh((1, 1), ("fsdp", "tp"), axis_types=(auto, auto))


_SCORE_CLASS = []


def score_class():
    """Tunix 0.1.7's `rl.common.compute_score` (critic values, reward-model scores) calls the model with
    `segment_ids=`, which its own `Llama3.__call__` does not accept; this subclass drops it (the causal
    `attention_mask` it also passes already masks the padding)."""
    if not _SCORE_CLASS:
        from tunix.models.llama3 import model as llama

        class ScoreLlama3(llama.Llama3):
            def __call__(self, input_tokens, positions, cache, attention_mask, segment_ids=None):
                return super().__call__(input_tokens, positions, cache, attention_mask)

        _SCORE_CLASS.append(ScoreLlama3)
    return _SCORE_CLASS[0]


def load(model_dir: str, m, *, scalar_head: bool = False):
    """Tunix Llama3 from the folder's safetensors; ``scalar_head``: LM head replaced by a D×1 head."""
    import jax.numpy as jnp
    from flax import nnx
    from tunix.models.llama3 import model as llama
    from tunix.models.llama3 import params as llama_params

    cfg = tunix_config(model_dir)
    import jax

    with jax.set_mesh(m):
        model = llama_params.create_model_from_safe_tensors(model_dir, cfg, mesh=m, dtype=jnp.float32)
        if scalar_head:
            model.lm_head = llama.Einsum(einsum_str="BTD,DV->BTV", shape=(cfg.embed_dim, 1), rngs=nnx.Rngs(0),
                                         sharding=cfg.shd_config.emb_dv)
            model.__class__ = score_class()
    return model


def optimizer():
    import optax

    return optax.chain(optax.clip_by_global_norm(CLIP), optax.adamw(LR, weight_decay=0.0))


def gated(make_batch, *, warmup: int, iters: int, rounds: int, info, sync):
    """The data iterator that doubles as the round clock (see the module docstring). After the last round it
    ends the process: the step that would follow is never run."""
    rows, t = [], None
    for i in range(warmup + rounds * iters + 1):
        if i > 0:
            sync()
            now = time.perf_counter()
            if i > warmup:
                rows.append({"iteration_s": now - t})
            if i == warmup:
                R.peer_ready(info())
            elif i > warmup and (i - warmup) % iters == 0:
                last = (i - warmup) // iters == rounds
                R.peer_round_done({"rows": rows})  # after the last: blocks until the driver closes stdin, exits
                rows = []
                if last:
                    sys.stdout.flush()
                    os._exit(0)
        t = time.perf_counter()
        yield make_batch(i)


def state_sync(model_fn):
    import jax
    from flax import nnx

    return lambda: jax.block_until_ready(nnx.state(model_fn()))


def info(kind: str, model) -> dict:
    import jax
    from importlib.metadata import version

    from flax import nnx

    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {"framework": f"tunix {version('google-tunix')} {kind}, jax {jax.__version__}", "params": int(n)}


def tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    return tok


def rl_cluster(model_dir: str, args, *, critic: bool, reward_model: bool, max_steps: int):
    from tunix.rl import rl_cluster as rlc
    from tunix.rl.rollout import base_rollout

    m = mesh()
    actor, ref = load(model_dir, m), load(model_dir, m)
    vocab = json.loads((pathlib.Path(model_dir) / "config.json").read_text())["vocab_size"]
    roles = [rlc.Role.ACTOR, rlc.Role.REFERENCE, rlc.Role.ROLLOUT] + ([rlc.Role.CRITIC, rlc.Role.REWARD] if critic else [])
    training = rlc.RLTrainingConfig(
        actor_optimizer=optimizer(), critic_optimizer=optimizer() if critic else None, eval_every_n_steps=10**9,
        max_steps=max_steps)  # one mini-batch = the whole batch, one optimizer step per iteration
    rollout = base_rollout.RolloutConfig(
        max_tokens_to_generate=args.new_tokens, max_prompt_length=args.prompt_len,
        kv_cache_size=2 * (args.prompt_len + args.new_tokens),  # Tunix buckets the prompt (+BOS) to 128 temperature=1.0, top_p=1.0, top_k=None,
        eos_tokens=[vocab + 7])  # never sampled: every row runs to max_tokens_to_generate, like TRL's min_new_tokens
    cluster = rlc.RLCluster(
        actor=actor, reference=ref, critic=load(model_dir, m, scalar_head=True) if critic else None,
        reward=load(model_dir, m, scalar_head=True) if reward_model else None, tokenizer=tokenizer(model_dir),
        cluster_config=rlc.ClusterConfig(role_to_mesh={r: m for r in roles}, rollout_engine="vanilla",
                                         offload_to_cpu=False, training_config=training, rollout_config=rollout))
    return cluster, actor


def digit_fraction(prompts, completions, **kw):
    """Python reward (same as benchmarks/grpo.py): fraction of the response's non-space characters that are digits."""
    out = []
    for r in completions:
        chars = [c for c in r if not c.isspace()]
        out.append(sum(c.isdigit() for c in chars) / max(len(chars), 1))
    return out


def run_grpo(args) -> None:
    import numpy as np
    from tunix.rl.grpo import grpo_learner

    prompts = json.loads(pathlib.Path(args.prompts).read_text())
    n, total = args.batch, args.warmup + args.rounds * args.iters + 1
    cluster, actor = rl_cluster(args.model, args, critic=False, reward_model=False,
                                max_steps=total)
    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster, reward_fns=[digit_fraction],
        algo_config=grpo_learner.GRPOConfig(num_generations=args.group, num_iterations=1, beta=args.beta,
                                            epsilon=0.2, loss_agg_mode="token-mean"))
    batches = gated(lambda i: {"prompts": np.array([prompts[(i * n + j) % len(prompts)] for j in range(n)])},
                    warmup=args.warmup, iters=args.iters, rounds=args.rounds, info=lambda: info("GRPOLearner", actor),
                    sync=state_sync(lambda: cluster.actor_trainer.model))
    learner.train(batches)


def run_ppo(args) -> None:
    import jax.numpy as jnp
    import numpy as np
    from tunix.rl.ppo import ppo_learner

    class _Jnp:  # the peer-side fix of the int32 reward tensor (module docstring)
        def __getattr__(self, name):
            return getattr(jnp, name)

        @staticmethod
        def zeros_like(a, dtype=None, **kw):
            if dtype is None and jnp.issubdtype(jnp.asarray(a).dtype, jnp.integer):
                dtype = jnp.float32
            return jnp.zeros_like(a, dtype=dtype, **kw)

    ppo_learner.jnp = _Jnp()
    tok = tokenizer(args.model)
    prompts = [tok.decode(json.loads(line)["input_ids"]) for line in open(args.prompts)]
    n, total = args.batch, args.warmup + args.rounds * args.iters + 1
    cluster, actor = rl_cluster(args.model, args, critic=True, reward_model=True, max_steps=total)
    learner = ppo_learner.PPOLearner(
        rl_cluster=cluster,
        ppo_config=ppo_learner.PPOConfig(num_iterations=1, gamma=1.0, gae_lambda=0.95, beta=args.beta,
                                          epsilon=0.2, clip_range_value=0.2, kl_method="kl"))
    batches = gated(lambda i: {"prompts": np.array([prompts[(i * n + j) % len(prompts)] for j in range(n)])},
                    warmup=args.warmup, iters=args.iters, rounds=args.rounds, info=lambda: info("PPOLearner", actor),
                    sync=state_sync(lambda: cluster.actor_trainer.model))
    learner.train(batches)


def run_dpo(args) -> None:
    import numpy as np
    from tunix.sft import metrics_logger
    from tunix.sft.dpo import dpo_trainer

    m = mesh()
    model, ref = load(args.model, m), load(args.model, m)
    vocab = json.loads((pathlib.Path(args.model) / "config.json").read_text())["vocab_size"]
    B, P, C = args.batch, args.prompt_len, args.new_tokens
    rng = np.random.default_rng(0)
    total = args.warmup + args.rounds * args.iters + 1

    def batch(i):
        ids = lambda n: rng.integers(4, vocab, size=(B, n)).astype(np.int32)  # noqa: E731
        chosen, rejected = ids(C), ids(C)
        chosen[:, -1] = rejected[:, -1] = 2
        ones = lambda n: np.ones((B, n), np.int32)  # noqa: E731
        return dpo_trainer.TrainingInput(prompt_ids=ids(P), prompt_mask=ones(P), chosen_ids=chosen,
                                         chosen_mask=ones(C), rejected_ids=rejected, rejected_mask=ones(C))

    import tempfile

    cfg = dpo_trainer.DPOTrainingConfig(
        eval_every_n_steps=10**9, max_steps=total, beta=args.beta, algorithm="dpo",
        metrics_logging_options=metrics_logger.MetricsLoggerOptions(log_dir=tempfile.mkdtemp(prefix="tunix-dpo-")))
    trainer = dpo_trainer.DPOTrainer(model=model, ref_model=ref, optimizer=optimizer(), training_config=cfg)
    import jax

    with jax.set_mesh(m):
        trainer.train(gated(batch, warmup=args.warmup, iters=args.iters, rounds=args.rounds,
                            info=lambda: info("DPOTrainer", model), sync=state_sync(lambda: trainer.model)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["grpo", "dpo", "ppo"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", default=None, help="grpo: JSON list of prompt texts; ppo: JSONL with input_ids")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="prompts (grpo: 8, ppo: 32) or pairs (dpo: 8)")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64, help="response / completion tokens")
    ap.add_argument("--beta", type=float, default=None)
    args = ap.parse_args()
    defaults = {"grpo": (8, 0.04), "dpo": (8, 0.1), "ppo": (32, 0.05)}[args.kind]
    args.batch = args.batch or defaults[0]
    args.beta = defaults[1] if args.beta is None else args.beta
    if args.warmup < 1:
        raise SystemExit("bench_tunix.py: --warmup must be >= 1 (the first step compiles)")
    {"grpo": run_grpo, "dpo": run_dpo, "ppo": run_ppo}[args.kind](args)


if __name__ == "__main__":
    main()
