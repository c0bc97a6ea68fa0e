"""The train state: step, trainable params, optimizer state, skipped-update count — born sharded.

The optax transformation is kept OUT of the state (passed to the step builder), so a `TrainState` is a
plain pytree of arrays: Orbax saves and restores it directly, and `jax.eval_shape` gives its abstract
target. Only trainable params live here; frozen models (a reference policy, a reward model) are separate
params pytrees passed to the step as arguments, so they never enter the optimizer.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rlhf_jax import sharding as shd
from rlhf_jax.models.lora import join, split_trainable, trainable


@flax.struct.dataclass
class TrainState:
    """Everything an optimizer step reads and writes.

    Attributes:
      step: int32 [], optimizer steps taken (skipped ones included, so data order and schedules
        stay aligned with the step counter).
      params: the model's parameters. For a LoRA tree (`rlhf_jax.models.lora`) only its trainable part
        (adapters, a scalar head) is optimized and checkpointed; the frozen base rides along, shared.
      opt_state: `tx.init(trainable(params))`.
      num_skipped: int32 [], updates skipped by the non-finite guard (policy "skip").
      ema: None, or an exponential moving average of the trainable params, updated after every applied
        optimizer step with `ema_decay` (`ops.ema_update`; DeepSpeed-Chat `--enable_ema`): sharded like them,
        checkpointed with the state.
      ema_decay: static; used only when `ema` is not None.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    num_skipped: jax.Array
    ema: Any = None
    ema_decay: float = flax.struct.field(pytree_node=False, default=0.0)


def ema_params(state: TrainState) -> Any:
    """The EMA model's full params: the EMA of the trainable part on the state's frozen base (LoRA), or the
    EMA tree itself (full fine-tune); None when the state keeps no EMA."""
    if state.ema is None:
        return None
    return join(state.ema, split_trainable(state.params)[1])


def init_train_state(params: Any, tx: optax.GradientTransformation, *,
                     ema_decay: Optional[float] = None) -> TrainState:
    """A fresh state at step 0 (pure; jit it with out_shardings to create it sharded)."""
    ema = None if ema_decay is None else jax.tree.map(jnp.copy, trainable(params))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable(params)),
                      num_skipped=jnp.zeros((), jnp.int32), ema=ema, ema_decay=ema_decay or 0.0)


def train_state_shardings(tx: optax.GradientTransformation, params_shardings: Any, abstract_params: Any,
                          mesh: Mesh, *, ema_decay: Optional[float] = None) -> TrainState:
    """A `TrainState` of NamedShardings: params as given, Adam moments and EMA like their params, scalars
    replicated."""
    rep = shd.replicated(mesh)
    return TrainState(step=rep, params=params_shardings,
                      opt_state=shd.opt_state_shardings(tx, trainable(params_shardings), trainable(abstract_params),
                                                        mesh),
                      num_skipped=rep, ema=None if ema_decay is None else trainable(params_shardings),
                      ema_decay=ema_decay or 0.0)


def create_train_state(params: Any, tx: optax.GradientTransformation, *, mesh: Optional[Mesh] = None,
                       params_shardings: Any = None,
                       ema_decay: Optional[float] = None) -> tuple[TrainState, Optional[TrainState]]:
    """Wrap already-placed params into a state whose optimizer state is created sharded.

    Args:
      params: trainable params, already placed with `params_shardings` (e.g. created with
        `sharding.create_sharded` or loaded onto the mesh); they are reused, not copied.
      tx: the optimizer.
      mesh: device mesh; None = default device, no explicit shardings.
      params_shardings: NamedShardings of `params` (required with `mesh`).
      ema_decay: keep an EMA of the trainable params (starting as a copy of them) with this decay; None = off.

    Returns:
      (state, state_shardings); `state_shardings` is None without a mesh.
    """
    if mesh is None:
        return init_train_state(params, tx, ema_decay=ema_decay), None
    if params_shardings is None:
        raise ValueError("create_train_state: params_shardings is required when a mesh is given")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shardings = train_state_shardings(tx, params_shardings, abstract, mesh, ema_decay=ema_decay)
    opt_state = shd.create_sharded(tx.init, trainable(params), out_shardings=shardings.opt_state)
    ema = None if ema_decay is None else shd.create_sharded(lambda p: jax.tree.map(jnp.copy, p), trainable(params),
                                                            out_shardings=shardings.ema)
    zero = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    state = TrainState(step=zero, params=params, opt_state=opt_state,
                       num_skipped=jax.device_put(jnp.zeros((), jnp.int32), shardings.num_skipped), ema=ema,
                       ema_decay=ema_decay or 0.0)
    return state, shardings

