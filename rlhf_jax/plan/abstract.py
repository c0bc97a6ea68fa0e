"""Abstract stand-ins for everything a run puts on the mesh: params from ``config.json`` only (no weights read),
train states, batches, keys — ``jax.ShapeDtypeStruct``s carrying the shardings the trainer would give them."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlhf_jax import sharding as shd
from rlhf_jax.train.state import init_train_state, train_state_shardings


class Planned(NamedTuple):
    """One program of a run, ready to lower.

    Attributes:
      name: as printed in the table.
      fn: a ``sharding.jit_sharded`` callable (lowered through ``.jitted``), a ``jax.jit`` object, or a callable
        ``() -> jax.stages.Lowered`` (the sampler, lowered by ``rollout.lower_generate``).
      args: abstract arguments.
      uses: resident groups (keys of ``RunPrograms.resident``) this program takes among its arguments.
      live: resident groups alive while it runs (None = all of them).
      rules: logical-axis rules active at the call.
      note: shown under the table.
    """

    name: str
    fn: Any
    args: tuple = ()
    uses: tuple[str, ...] = ()
    live: Optional[tuple[str, ...]] = None
    rules: shd.Rules = shd.LOGICAL_RULES
    note: str = ""


@dataclasses.dataclass
class RunPrograms:
    """Every program of one run and the buffers that stay on the chips between them."""

    command: str
    mesh: Any
    resident: dict[str, Any]  # group name -> abstract pytree (per-chip bytes computed from the shardings)
    programs: list[Planned]
    extra: dict[str, int] = dataclasses.field(default_factory=dict)  # other contributors, per-chip bytes (KV cache)


def attach(tree: Any, shardings: Any) -> Any:
    """``tree``'s shapes and dtypes with ``shardings`` (one sharding, or a tree prefix of ``tree`` with one per subtree)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
    is_sh = lambda x: isinstance(x, jax.sharding.Sharding)  # noqa: E731
    return jax.tree.map(lambda s, sub: attach(sub, s), shardings, tree, is_leaf=is_sh)  # shardings: a tree prefix


def spec(shape: tuple, dtype: Any, sharding: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def key_spec(mesh) -> jax.ShapeDtypeStruct:
    """An abstract PRNG key, replicated (the steps' ``key`` argument)."""
    k = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=shd.replicated(mesh))


@dataclasses.dataclass
class AbstractModel:
    """What ``train.run.load_model`` returns, with abstract params (``LoadedModel`` minus the tokenizer)."""

    model: Any
    params: Any
    shardings: Any

    @property
    def eos_ids(self) -> tuple[int, ...]:
        import numpy as np

        eos = self.model.config.eos_token_id
        return tuple(np.atleast_1d(0 if eos is None else eos).tolist())


def abstract_model(model_cfg, *, mesh, head: str, path: Optional[str] = None, dtype: Optional[str] = None,
                   param_dtype: Optional[str] = None, rules: shd.Rules = shd.LOGICAL_RULES) -> AbstractModel:
    """``load_model(model_cfg, mesh=mesh, head=head, rules=rules)`` without reading weights: the model from
    ``<path>/config.json``, its params as ``ShapeDtypeStruct``s with the same shardings."""
    from rlhf_jax import models

    dt = jnp.dtype(dtype or model_cfg.dtype)
    pdt = param_dtype or (model_cfg.param_dtype if dtype is None else None)
    config = models.ModelConfig.from_hf(path or model_cfg.path, dtype=dt,
                                        param_dtype=dt if pdt is None else jnp.dtype(pdt),
                                        remat=model_cfg.remat, scan_layers=model_cfg.scan_layers)
    model = models.Transformer(config, head=head)
    shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
    shardings = shd.param_shardings(model, mesh, rules=rules)
    return AbstractModel(model, attach(shapes, shardings), shardings)


def frozen(params: Any, dtype: str) -> Any:
    """``online.sampler.frozen_copy``'s result: floats cast to ``dtype``, same shardings."""
    dt = jnp.dtype(dtype)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, dt if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype, sharding=x.sharding), params)


def abstract_state(params: Any, shardings: Any, tx, mesh) -> tuple[Any, Any]:
    """``create_train_state(params, tx, mesh=mesh, params_shardings=shardings)`` on abstract params:
    (abstract state, state shardings)."""
    plain = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    state_sh = train_state_shardings(tx, shardings, plain, mesh)
    return attach(jax.eval_shape(lambda p: init_train_state(p, tx), plain), state_sh), state_sh


def outputs(fn: Callable, args: tuple, shardings: Any, *, mesh, rules: shd.Rules = shd.LOGICAL_RULES) -> Any:
    """Abstract outputs of a jitted ``fn`` (``jax.eval_shape`` under the mesh), given ``shardings``."""
    jitted = getattr(fn, "jitted", fn)
    with shd.mesh_context(mesh, rules):
        out = jax.eval_shape(jitted, *args)
    return attach(out, shardings)


def split_state(name: str, state: Any) -> dict[str, Any]:
    """A train state as two resident groups: ``<name> params`` and ``<name> optimizer state``."""
    return {f"{name} params": state.params, f"{name} optimizer state": (state.opt_state, state.step, state.num_skipped)}


def total_steps(run) -> int:
    """Steps for the optimizer's schedule (its length does not change any program's memory)."""
    return run.total_steps if run.total_steps is not None else 1000
