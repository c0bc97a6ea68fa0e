"""`rlhf-jax ilql`: offline RL with implicit language Q-learning (Snell et al. 2022), as trlx implements it.

Rows: `prompt`/`completion` with a scalar `reward` (standardised over the training set and put on the last
completion token, trlx ``make_experience``) or per-token `rewards`. One trunk carries the LM, two Q heads,
their Polyak-averaged targets and a V head (`algos/ilql.py`); each optimizer step minimises trlx's
``ILQLConfig.loss`` (`ops/ilql.py`: TD loss for Q, expectile loss for V, CQL, AWAC-weighted LM loss), and
every `ilql.steps_for_target_q_sync` steps the target heads move towards the Q heads by
`θ̂ ← α·θ + (1 − α)·θ̂`. Evaluation (`eval.prompts` + `eval.gold_function`) decodes with
``log_softmax(z) + β·(min Q̂ − V)`` (`gen_kwargs.beta`) in the jitted sampler, greedily and sampled with
`gen_kwargs.top_k` / `temperature`, and greedily with β = 0 (the trained LM alone). The LM is exported as a Hugging Face folder; the heads live in the checkpoints.

Usage: `rlhf-jax ilql configs/ilql_tiny_cpu.yaml model.path=runs/sft/model data.path=scored.jsonl`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import jax
import numpy as np

from rlhf_jax import rewards
from rlhf_jax import sharding as shd
from rlhf_jax.algos import ilql as algo
from rlhf_jax.config import require
from rlhf_jax.data import BatchIterator, DataConfig, load_encoded, pad_id_of
from rlhf_jax.data.ilql import ilql_iterator
from rlhf_jax.online.config import RolloutConfig
from rlhf_jax.online.evaluation import fill_padding
from rlhf_jax.online.sampler import Sampler
from rlhf_jax.online.scoring import local_texts
from rlhf_jax.run_config import OptimConfig, RunConfig
from rlhf_jax.runtime import distributed, xla
from rlhf_jax.sharding import MeshConfig
from rlhf_jax.train import run as common
from rlhf_jax.train.loop import Loop, batch_steps, run_loop
from rlhf_jax.train.optim import make_optimizer, make_schedule
from rlhf_jax.train.state import create_train_state
from rlhf_jax.train.step import StepMetrics, train_step_fn


@dataclasses.dataclass(frozen=True)
class ILQLMethodConfig:
    """trlx ``ILQLConfig`` (names and defaults of ``default_ilql_config``)."""

    tau: float = 0.7  # expectile of V against the target Q, in (0, 1)
    gamma: float = 0.99  # discount
    cql_scale: float = 0.1  # weight of the CQL term
    awac_scale: float = 1.0  # weight of the AWAC-weighted LM loss
    alpha: float = 0.001  # Polyak rate of the target Q heads, in (0, 1]
    beta: float = 0.0  # AWAC weight exp(beta·(Q̂ − V)); 0 = plain LM loss
    steps_for_target_q_sync: int = 5  # optimizer steps between target syncs
    two_qs: bool = True  # two Q heads (min of their targets) or one
    reward_field: str = "reward"  # scalar reward column
    rewards_field: str = "rewards"  # per-token reward column (a list per row); used when present
    normalize_rewards: bool = True  # standardise scalar rewards over the training set (trlx)

    def __post_init__(self):
        require(0.0 < self.tau < 1.0, "ilql.tau", f"must be in (0, 1), got {self.tau}")
        require(0.0 <= self.gamma <= 1.0, "ilql.gamma", f"must be in [0, 1], got {self.gamma}")
        require(0.0 < self.alpha <= 1.0, "ilql.alpha", f"must be in (0, 1], got {self.alpha}")
        require(self.steps_for_target_q_sync >= 1, "ilql.steps_for_target_q_sync",
                f"must be >= 1, got {self.steps_for_target_q_sync}")


@dataclasses.dataclass(frozen=True)
class GenKwargs:
    """trlx ``ILQLConfig.gen_kwargs``: decoding with log_softmax(z) + beta·(Q̂ − V), top-k, temperature."""

    max_new_tokens: int = 32
    beta: float = 1.0
    top_k: Optional[int] = 20
    temperature: float = 1.0

    def __post_init__(self):
        require(self.max_new_tokens >= 1, "gen_kwargs.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require(self.top_k is None or self.top_k >= 1, "gen_kwargs.top_k", f"must be >= 1 or null, got {self.top_k}")
        require(self.temperature > 0, "gen_kwargs.temperature", f"must be > 0, got {self.temperature}")


@dataclasses.dataclass(frozen=True)
class ILQLEvalConfig:
    """Held-out decoding: gold score of greedy β-perturbed (and β = 0) responses to `prompts`."""

    prompts: Optional[str] = None  # prompt rows (JSONL, ...); null = no evaluation
    gold_function: Optional[str] = None  # "module:function" scoring (prompts, responses) -> floats
    batch_size: int = 32  # global prompts per decode

    def __post_init__(self):
        require((self.prompts is None) == (self.gold_function is None), "eval.gold_function",
                "set both eval.prompts and eval.gold_function, or neither")
        require(self.batch_size >= 1, "eval.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclasses.dataclass(frozen=True)
class ILQLConfig:
    """Offline ILQL run."""

    model: common.ModelLoadConfig  # the LM to start from (e.g. the SFT export that produced the data)
    data: DataConfig  # prompt/completion/reward rows (max_prompt_len, max_completion_len: static shapes)
    ilql: ILQLMethodConfig = ILQLMethodConfig()
    gen_kwargs: GenKwargs = GenKwargs()
    eval: ILQLEvalConfig = ILQLEvalConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    mesh: MeshConfig = MeshConfig()
    batch_size: int = 32  # GLOBAL rows per optimizer step
    num_micro_batches: int = 1
    export: bool = True  # write the LM as a Hugging Face folder to <output_dir>/model

    def __post_init__(self):
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.num_micro_batches >= 1 and self.batch_size % self.num_micro_batches == 0, "num_micro_batches",
                f"must be >= 1 and divide batch_size={self.batch_size}, got {self.num_micro_batches}")
        require(self.data.format in ("auto", "prompt_completion"), "data.format",
                f"ILQL reads prompt_completion rows (+ reward), got {self.data.format!r}")
        require(not self.data.pack, "data.pack", "ILQL does not pack rows")
        require(self.data.eval_path is None and self.data.eval_fraction == 0, "data.eval_path",
                "ILQL evaluates by decoding eval.prompts; remove data.eval_path / data.eval_fraction")


def heads_layout(cfg: ILQLConfig, config, mesh):
    """``(shapes, shardings)`` of the head params (``jax.ShapeDtypeStruct``s; no array is made)."""
    init = functools.partial(algo.init_heads, config, two_qs=cfg.ilql.two_qs)
    boxed = jax.eval_shape(init, jax.random.key(cfg.run.seed))
    shapes = nn.meta.unbox(boxed)
    return shapes, shd.logical_to_shardings(nn.get_partition_spec(boxed), mesh, shapes=shapes)


def _heads(cfg: ILQLConfig, config, mesh):
    """Head params born sharded by their logical axes, and their shardings."""
    init = functools.partial(algo.init_heads, config, two_qs=cfg.ilql.two_qs)
    _, shardings = heads_layout(cfg, config, mesh)
    params = shd.create_sharded(lambda k: nn.meta.unbox(init(k)), jax.random.fold_in(jax.random.key(cfg.run.seed), 7),
                                out_shardings=shardings)
    return params, shardings


def make_step(cfg: ILQLConfig, model, heads, tx, total: int, mesh, state_sh):
    """Jitted ``(state, batch, key) -> (state, StepMetrics)``: one optimizer step on the ILQL loss, then the
    Polyak sync of the target heads when ``step % steps_for_target_q_sync == 0`` (from the pre-step targets,
    so the optimizer never moves them)."""
    m = cfg.ilql
    hp = algo.ILQLHparams(tau=m.tau, gamma=m.gamma, cql_scale=m.cql_scale, awac_scale=m.awac_scale, beta=m.beta)
    inner = train_step_fn(lambda p, b, k: algo.ilql_loss(model, heads, p, b, k, hp=hp), tx=tx,
                          num_micro_batches=cfg.num_micro_batches, lr_schedule=make_schedule(cfg.optim, total))

    def step(state, batch, key):
        before = state.params["heads"]
        new, metrics = inner(state, batch, key)
        heads_p = algo.sync_targets(new.params["heads"], before, alpha=m.alpha,
                                    sync=new.step % m.steps_for_target_q_sync == 0)
        return new.replace(params={**new.params, "heads": heads_p}), metrics

    rep = shd.replicated(mesh)
    return shd.jit_sharded(step, mesh, in_shardings=(state_sh, shd.batch_sharding(mesh), rep),
                           out_shardings=(state_sh, rep), donate_argnums=(0,),
                           compiler_options=xla.gradient_compiler_options())


def eval_rollout(cfg: ILQLConfig) -> RolloutConfig:
    """The evaluation sampler's settings (also what ``rlhf-jax plan`` compiles)."""
    g = cfg.gen_kwargs
    return RolloutConfig(batch_size=cfg.eval.batch_size, max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                         top_k=g.top_k, param_axes=("fsdp", "tensor"), weight_layout="in_out")  # ILQLPolicy


def make_evaluate(cfg: ILQLConfig, loaded, mesh):
    """``state -> {"gold_score", "gold_score_beta0", "gold_score_sampled"}``: mean gold score of the responses
    to every eval prompt, decoded greedily with ``log_softmax(z) + β·(min Q̂ − V)`` (β = gen_kwargs.beta), greedily
    with β = 0 (the LM alone), and sampled as trlx does (top-k of the perturbed scores, softmax(·/τ)) with
    gen_kwargs.top_k / temperature (key fold_in(run.seed, batch))."""
    e, g = cfg.eval, cfg.gen_kwargs
    if e.prompts is None:
        return None
    P = cfg.data.max_prompt_len
    dcfg = DataConfig(path=e.prompts, format="prompt", max_prompt_len=P, max_seq_len=P, buckets=(P,),
                      shuffle=False, drop_last=False)
    shard, shards = shd.host_data_shard(mesh)
    batches = BatchIterator(load_encoded(dcfg, loaded.tokenizer, task="prompt"), dcfg,
                            batch_size=common.host_batch_size(e.batch_size, mesh), pad_id=pad_id_of(loaded.tokenizer),
                            process_index=shard, process_count=shards, shuffle=False, drop_last=False, num_epochs=1)
    gold = rewards.load_function(e.gold_function)
    rollout = eval_rollout(cfg)
    policy = lambda beta: Sampler(algo.ILQLPolicy(loaded.model.config, two_qs=cfg.ilql.two_qs, beta=beta),  # noqa: E731
                                  loaded.tokenizer, rollout, mesh)
    # (metric, sampler, temperature): greedy with beta, greedy with beta = 0, sampled as trlx (top-k, τ)
    runs = (("gold_score", policy(g.beta), 0.0), ("gold_score_beta0", policy(0.0), 0.0),
            ("gold_score_sampled", policy(g.beta), g.temperature))

    def evaluate(state) -> dict[str, float]:
        out = {}
        for name, sampler, temperature in runs:
            scores = []
            for n in range(batches.batches_per_epoch):
                batch, real = fill_padding(batches.batch(0, n))
                ro = sampler(state.params, batch, jax.random.fold_in(jax.random.key(cfg.run.seed), n),
                             temperature=temperature)
                prompts, responses = local_texts(loaded.tokenizer, ro)
                s = np.asarray(rewards.call_reward_fn(gold, prompts, responses, {}, name="eval.gold_function"))
                scores.append(distributed.allgather_rows(np.where(real, s, np.nan)))
            out[name] = float(np.nanmean(np.concatenate(scores)))
        return out

    return evaluate


def train(cfg: ILQLConfig, *, stop_at_step: Optional[int] = None) -> dict:
    """Run ILQL; returns the last metrics plus `output_dir`/`export_dir` paths."""
    out = common.start_run(cfg, cfg.run)
    mesh = common.make_mesh(cfg.mesh)
    loaded = common.load_model(cfg.model, mesh=mesh, head="lm")
    host_bs = common.host_batch_size(cfg.batch_size, mesh)
    shard, shards = shd.host_data_shard(mesh)
    encoded = load_encoded(cfg.data, loaded.tokenizer, task="sft")
    m = cfg.ilql
    train_batches = ilql_iterator(encoded, cfg.data, reward_field=m.reward_field, rewards_field=m.rewards_field,
                                  normalize=m.normalize_rewards, batch_size=host_bs, pad_id=pad_id_of(loaded.tokenizer),
                                  process_index=shard, process_count=shards)
    if distributed.is_main_process():
        print(f"[rlhf_jax] train data: {encoded.stats.summary()}", flush=True)
    total = common.total_steps_of(cfg.run, train_batches.batches_per_epoch)
    tx = make_optimizer(cfg.optim, total)
    heads_params, heads_sh = _heads(cfg, loaded.model.config, mesh)
    params = {"lm": loaded.params, "heads": heads_params}
    state, state_sh = create_train_state(params, tx, mesh=mesh, params_shardings={"lm": loaded.shardings,
                                                                                  "heads": heads_sh})
    heads = algo.ILQLHeads(loaded.model.config, two_qs=m.two_qs)
    step = make_step(cfg, loaded.model, heads, tx, total, mesh, state_sh)

    def describe(mt: StepMetrics) -> dict[str, float]:
        return {**common.base_metrics(mt), **algo.describe_aux(mt.aux)}

    loop = Loop(name="ilql", run=cfg.run, output_dir=out, total=total, data={"train": train_batches},
                step=batch_steps(step, train_batches, mesh, seed=cfg.run.seed), describe=describe,
                evaluate=make_evaluate(cfg, loaded, mesh), stop_at_step=stop_at_step,
                progress_keys=("loss", "loss_q", "loss_v"),
                export=(lambda s: common.export_model(loaded, s.params["lm"], out / "model")) if cfg.export else None)
    res = run_loop(loop, state)
    result = {**res.latest, "output_dir": str(out), "steps": int(res.state.step), "history": res.history}
    if res.export_dir:
        result["export_dir"] = res.export_dir
    return result
