"""Generic jitted train/eval steps: gradient accumulation by (sum, count) and a non-finite guard.

A trainer supplies only a loss function

    loss_fn(params, batch, key) -> ((loss_sum, count), aux)

that returns the SUM of its per-token (or per-sequence) losses over the rows it was given, the number of
terms in that sum, and a pytree `aux` of extra SUMS (e.g. correct-pair counts). The step splits the
optimizer batch into M micro-batches, runs `lax.scan` over them accumulating gradients of the loss SUM,
the sums and the counts, and divides once:

    g = (sum_m grad L_m) / max(sum_m N_m, 1),        loss = (sum_m L_m) / max(sum_m N_m, 1)

so the update is the gradient of the token-mean over the whole optimizer batch, independent of M and of
the number of devices (Tunix / OpenRLHF fix for the "mean of micro-batch means" bug).

Non-finite guard: when the loss or any gradient is NaN/Inf the update is not applied (params and
optimizer state keep their old values, chosen inside `jit` with `jnp.where`); `StepMetrics.finite` is
False. With policy "skip" the step is counted in `TrainState.num_skipped` and training goes on; with
"stop" the host raises `NonFiniteError` when it reads that step's metrics (one step late, see
`check_finite`), before any later checkpoint is written, so the last good checkpoint is untouched.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import ops
from rlhf_jax import sharding as shd
from rlhf_jax.models import lora
from rlhf_jax.runtime import xla
from rlhf_jax.train.state import TrainState

LossFn = Callable[[Any, Any, jax.Array], tuple[tuple[jax.Array, jax.Array], Any]]
NAN_POLICIES = ("stop", "skip")


class StepMetrics(NamedTuple):
    """What one optimizer step reports (device arrays until fetched).

    Attributes:
      loss: token-mean loss over the optimizer batch, sum / max(count, 1).
      count: number of loss terms (tokens or sequences) in the optimizer batch.
      grad_norm: global L2 norm of the averaged gradient, before any clipping in `tx`.
      finite: True when the loss and every gradient entry are finite (else the update was not applied).
      num_skipped: running count of skipped updates (`TrainState.num_skipped` after this step).
      step: the step index this metric belongs to (state.step before the update).
      lr: learning rate used at this step (None when no schedule was given).
      aux: the loss function's auxiliary SUMS over the optimizer batch.
    """

    loss: jax.Array
    count: jax.Array
    grad_norm: jax.Array
    finite: jax.Array
    num_skipped: jax.Array
    step: jax.Array
    lr: Optional[jax.Array]
    aux: Any


class NonFiniteError(RuntimeError):
    """Raised on the host when a step produced a NaN/Inf loss or gradient under policy "stop"."""


def split_micro_batches(batch: Any, num_micro_batches: int, *, group_size: int = 1) -> Any:
    """Reshape every leaf [B, ...] to [M, B/M, ...]; blocks of ``group_size`` contiguous rows are dealt
    round-robin: micro-batch m holds blocks m, m+M, m+2M, ... (rows m, m+M, ... when ``group_size`` = 1).

    Strided (not contiguous) rows keep each micro-batch spread over all devices when B is sharded in
    contiguous blocks, so the split is a local reshape with no communication; blocks keep groups of rows
    that share a prompt (GRPO's G samples) in one micro-batch. :func:`join_micro_batches` inverts it.
    """

    def split(x):
        if x.shape[0] % (num_micro_batches * group_size):
            raise ValueError(f"batch dimension {x.shape[0]} is not divisible by num_micro_batches={num_micro_batches}"
                             + (f" x group_size={group_size}" if group_size > 1 else ""))
        blocks = x.reshape(x.shape[0] // (num_micro_batches * group_size), num_micro_batches, group_size, *x.shape[1:])
        return jnp.swapaxes(blocks, 0, 1).reshape(num_micro_batches, -1, *x.shape[1:])

    return jax.tree.map(split, batch)


def join_micro_batches(micro: Any, *, group_size: int = 1) -> Any:
    """The inverse of :func:`split_micro_batches`: [M, B/M, ...] back to [B, ...] in the original row order."""

    def join(x):
        m, rows = x.shape[:2]
        blocks = x.reshape(m, rows // group_size, group_size, *x.shape[2:])
        return jnp.swapaxes(blocks, 0, 1).reshape(m * rows, *x.shape[2:])

    return jax.tree.map(join, micro)


def scan_sum(fn: Callable, params: Any, xs: Any, *args) -> tuple[Any, Any]:
    """``(Σ_k a_k, stacked y_k)`` of ``(a_k, y_k) = fn(params, xs[k], *args)`` over the leading axis of ``xs``
    (``lax.scan``; floating sums start from float32 zeros): gradient accumulation over micro-batches."""
    first = jax.tree.map(lambda x: x[0], xs)
    acc_shape, _ = jax.eval_shape(lambda: fn(params, first, *args))
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.promote_types(a.dtype, jnp.float32)), acc_shape)

    def body(acc, x):
        a, y = fn(params, x, *args)
        return jax.tree.map(jnp.add, acc, a), y

    return jax.lax.scan(body, zeros, xs)


def all_finite(*trees: Any) -> jax.Array:
    """True when every entry of every leaf is finite (the non-finite guard)."""
    leaves = [jnp.all(jnp.isfinite(x)) for tree in trees for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def apply_if_finite(tx: optax.GradientTransformation, state: TrainState, grads: Any, finite: jax.Array) -> TrainState:
    """One optimizer step, applied only when ``finite`` (else params and optimizer state keep their values,
    chosen inside ``jit``) and counted in ``num_skipped`` when not."""
    params, frozen = lora.split_trainable(state.params)  # LoRA: grads and updates cover the adapters only
    updates, new_opt_state = tx.update(grads, state.opt_state, params)
    new_params = _tree_where(finite, optax.apply_updates(params, updates), params)
    ema = state.ema
    if ema is not None:  # EMA of the actor (DeepSpeed-Chat --enable_ema), after each applied step
        ema = _tree_where(finite, ops.ema_update(ema, new_params, decay=state.ema_decay), ema)
    return state.replace(
        step=state.step + 1,
        params=lora.join(new_params, frozen),
        opt_state=_tree_where(finite, new_opt_state, state.opt_state),
        num_skipped=state.num_skipped + jnp.where(finite, 0, 1).astype(jnp.int32),
        ema=ema,
    )


def _tree_where(pred: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def accumulate_gradients(loss_fn: LossFn, params: Any, batch: Any, key: jax.Array, *,
                         num_micro_batches: int) -> tuple[jax.Array, jax.Array, Any, Any]:
    """Sum (loss_sum, count, aux, grad of loss_sum) over micro-batches with `lax.scan`.

    Returns:
      (loss_sum, count, aux_sums, grad_sums); gradients are accumulated in float32.
    """

    def value_and_grad(p, mb, k):
        def f(p_):
            (loss_sum, count), aux = loss_fn(p_, mb, k)
            return loss_sum.astype(jnp.float32), (count.astype(jnp.float32), aux)

        (loss_sum, (count, aux)), grads = lora.value_and_grad(f, has_aux=True)(p)
        return loss_sum, count, aux, jax.tree.map(lambda g: g.astype(jnp.float32), grads)

    if num_micro_batches == 1:
        return value_and_grad(params, batch, jax.random.fold_in(key, 0))

    micro = split_micro_batches(batch, num_micro_batches)

    def body(p, xs):
        mb, m = xs
        return value_and_grad(p, mb, jax.random.fold_in(key, m)), None

    totals, _ = scan_sum(body, params, (micro, jnp.arange(num_micro_batches)))
    return totals


def train_step_fn(loss_fn: LossFn, *, tx: optax.GradientTransformation, num_micro_batches: int = 1,
                  lr_schedule: Optional[Callable[[jax.Array], jax.Array]] = None) -> Callable:
    """The un-jitted step `(state, batch, key) -> (state, StepMetrics)`; see the module docstring.

    `key` is the run's base PRNG key; the step folds in `state.step` (and the micro-batch index), so
    randomness depends only on (seed, step) and a resumed run draws the same numbers.
    """
    if num_micro_batches < 1:
        raise ValueError(f"num_micro_batches must be >= 1, got {num_micro_batches}")

    def step(state: TrainState, batch: Any, key: jax.Array) -> tuple[TrainState, StepMetrics]:
        key = jax.random.fold_in(key, state.step)
        loss_sum, count, aux, grad_sums = accumulate_gradients(
            loss_fn, state.params, batch, key, num_micro_batches=num_micro_batches)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sums, lora.trainable(state.params))
        loss = loss_sum / denom
        finite = jnp.isfinite(loss) & all_finite(grads)
        new_state = apply_if_finite(tx, state, grads, finite)
        metrics = StepMetrics(
            loss=loss, count=count, grad_norm=optax.tree.norm(grads), finite=finite,
            num_skipped=new_state.num_skipped, step=state.step,
            lr=None if lr_schedule is None else jnp.asarray(lr_schedule(state.step), jnp.float32), aux=aux)
        return new_state, metrics

    return step


def make_train_step(loss_fn: LossFn, *, tx: optax.GradientTransformation, num_micro_batches: int = 1,
                    lr_schedule: Optional[Callable[[jax.Array], jax.Array]] = None, mesh: Any = None,
                    state_shardings: Any = None, donate: bool = True, compute_dtype: Any = "float32",
                    stored_dtypes: Any = ()) -> Callable:
    """Jit `train_step_fn` once, with explicit shardings and the state donated.

    Args:
      loss_fn: `(params, batch, key) -> ((loss_sum, count), aux_sums)`.
      tx: the optax optimizer (kept out of the state so the state is a plain array pytree).
      num_micro_batches: M; the batch's leading dimension must divide by M.
      lr_schedule: optional schedule, evaluated at `state.step` for logging.
      mesh: device mesh; with it the step is jitted by `sharding.jit_sharded` (batch leaves split over
        the batch axes, key and metrics replicated, mesh + logical rules active at every call).
      state_shardings: a `TrainState` of shardings (from `create_train_state`); required with `mesh`.
      donate: donate the input state buffers (the caller must not reuse the old state).
      compute_dtype, stored_dtypes: the model's compute dtype and its params' storage dtypes, for the XLA
        options (`runtime.xla.compiler_options`).

    Returns:
      jitted `(state, batch, key) -> (new_state, StepMetrics)`.
    """
    step = train_step_fn(loss_fn, tx=tx, num_micro_batches=num_micro_batches, lr_schedule=lr_schedule)
    donate_argnums = (0,) if donate else ()
    options = xla.compiler_options(compute_dtype=compute_dtype, stored_dtypes=stored_dtypes, gradient=True)
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums, compiler_options=options)
    if state_shardings is None:
        raise ValueError("make_train_step: state_shardings is required when a mesh is given")
    rep = shd.replicated(mesh)
    return shd.jit_sharded(step, mesh, in_shardings=(state_shardings, shd.batch_sharding(mesh), rep),
                           out_shardings=(state_shardings, rep), donate_argnums=donate_argnums,
                           compiler_options=options)


def make_eval_step(eval_fn: Callable[..., Any], *, mesh: Any = None, params_shardings: Any = None,
                   num_params: int = 1, compute_dtype: Any = "float32", stored_dtypes: Any = ()) -> Callable:
    """Jit `eval_fn(*params, batch) -> pytree of sums` (the host adds them up over the eval set).

    With a mesh, the first `num_params` arguments take `params_shardings` (a tuple of `num_params`
    sharding pytrees when `num_params > 1`), the batch is split over the batch axes, outputs replicated.
    """
    options = xla.compiler_options(compute_dtype=compute_dtype, stored_dtypes=stored_dtypes)
    if mesh is None:
        return jax.jit(eval_fn, compiler_options=options)
    p_sh = (params_shardings,) if num_params == 1 else tuple(params_shardings)
    rep = shd.replicated(mesh)
    return shd.jit_sharded(eval_fn, mesh, in_shardings=(*p_sh, shd.batch_sharding(mesh)), out_shardings=rep,
                           compiler_options=options)


def check_finite(metrics: StepMetrics, *, nan_policy: str) -> None:
    """Host-side guard on FETCHED metrics: raise `NonFiniteError` under "stop" if the step was not finite."""
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    if nan_policy == "stop" and not bool(metrics.finite):
        raise NonFiniteError(
            f"non-finite loss or gradient at step {int(metrics.step)} (loss={float(metrics.loss)}, "
            f"grad_norm={float(metrics.grad_norm)}); the update was not applied and no later checkpoint "
            "was written. Lower the learning rate, check the data, or set run.nan_policy=skip.")
