"""Hybrid-engine rollout layout: sample from a copy of the actor laid out for inference, not for training.

The actor trains FSDP-sharded (``sharding.LOGICAL_RULES``: weights split over ``fsdp`` along ``embed``), so every
forward pass all-gathers the weights it uses. In the sampler's decode ``while`` loop that is what the compiled
program does (checked in ``tests/rollout/test_layout.py`` on 8 CPU devices): with ``scan_layers`` the gathers stay
in the loop body, once per generated token and layer (they depend on the layer index); with unrolled layers
XLA:CPU's loop-invariant code motion hoisted them out of the loop (gathered once per call, besides the prefill's
own gathers, and kept whole for the whole decode). Where XLA instead splits a product over ``fsdp`` it adds
per-step activation collectives. Not checked on GPU/TPU.
DeepSpeed-Chat's hybrid engine, OpenRLHF and verl switch the actor to an inference layout for generation; so
does this module:

    inf_sh = inference_layout(model, mesh)                     # once (weights: tensor-parallel, rest replicated)
    ...
    rollout_params = reshard_for_inference(state.params, inf_sh)   # once per iteration: ONE all-gather program
    with sharding.mesh_context(mesh):                          # activation rules unchanged (training table)
        ro = generate(model, rollout_params, ids, mask, ..., param_shardings=inf_sh, batch_sharding=b_sh)
    del rollout_params                                         # free the copy before the update

That sampler has no weight all-gather anywhere, in the decode loop or out of it. Cost: per device the copy holds
``params / tensor`` bytes (vs ``params / (fsdp · tensor)`` for the training copy), alive from the reshard to the
end of generation; when that does not fit, pass a rules table that keeps part of the ``fsdp`` split
(``rollout.param_rules``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rlhf_jax import sharding
from rlhf_jax.rollout.decode import _Frozen

#: Default param rules for rollouts (= ``sharding.INFERENCE_RULES``): weights split only over ``tensor``.
ROLLOUT_PARAM_RULES: sharding.Rules = sharding.INFERENCE_RULES


def inference_rules(rules: sharding.Rules = sharding.LOGICAL_RULES, *,
                    keep_axes: tuple[str, ...] = ("tensor",)) -> sharding.Rules:
    """A param rules table derived from a training table: every rule keeps only the mesh axes in ``keep_axes``.

    ``inference_rules(sharding.LOGICAL_RULES)`` gives the same param shardings as ``sharding.INFERENCE_RULES``
    (weights tensor-parallel, replicated over ``data`` and ``fsdp``) and does so for any custom training table
    too (e.g. one that also splits ``mlp`` over ``fsdp``). Use the result for PARAMS only (its ``batch`` rule
    lost its ``fsdp`` axis too): generation keeps the training table as its activation rules.
    """
    sharding.validate_rules(rules)
    keep = set(keep_axes)
    bad = sorted(keep - set(sharding.MESH_AXES))
    if bad:
        raise ValueError(f"keep_axes names unknown mesh axes {bad}; mesh axes: {sharding.MESH_AXES}")

    def strip(axes: sharding.MeshAxes) -> sharding.MeshAxes:
        axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        kept = tuple(a for a in axes_t if a in keep)
        return None if not kept else kept[0] if len(kept) == 1 else kept

    return tuple((name, strip(axes)) for name, axes in rules)


def inference_layout(model: Any, mesh: Mesh, *, rules: sharding.Rules | None = None) -> Any:
    """Param shardings of ``model`` for sampling: a pytree of ``NamedSharding`` matching ``init_params(model)``.

    Args:
      model: a ``rlhf_jax.models.Transformer``.
      mesh: the trainer's ``(data, fsdp, tensor)`` mesh (the same devices as the training params).
      rules: param rules table in the format of ``sharding.LOGICAL_RULES`` (the trainers' ``rollout.param_rules``);
        default :data:`ROLLOUT_PARAM_RULES` (no ``fsdp`` split of weights, tensor parallel over ``tensor``).

    Raises:
      ValueError: from ``sharding.param_shardings`` for a bad table or a dim not divisible by its mesh axes.
    """
    return sharding.param_shardings(model, mesh, rules=ROLLOUT_PARAM_RULES if rules is None else rules)


@functools.lru_cache(maxsize=16)
def _reshard_fn(frozen_shardings: _Frozen):
    # jnp.copy: the outputs are always fresh buffers, even for leaves whose layout does not change (an identity
    # jit could forward its inputs); nothing is donated, so the training params stay valid.
    return jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=frozen_shardings.thaw())


def reshard_for_inference(params: Any, shardings: Any) -> Any:
    """A copy of ``params`` laid out as ``shardings`` (from :func:`inference_layout`), in new buffers.

    One compiled program per (tree structure, shardings) moves every leaf (XLA all-gathers the FSDP shards once);
    it works on multi-process global arrays (every process calls it, as with any jitted step). ``params`` is not
    donated and stays valid (the train step can donate it afterwards). Call it once per rollout phase, after the
    last update of the previous iteration, and drop the copy when generation is done.
    """
    if jax.tree.structure(params) != jax.tree.structure(shardings):
        raise ValueError("reshard_for_inference: params and shardings have different tree structures")
    return _reshard_fn(_Frozen.of(shardings))(params)


def bytes_per_device(tree: Any) -> int:
    """The largest number of bytes one device holds of ``tree``'s arrays (addressable shards; replicas count
    on every device that holds them)."""
    per: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        nbytes = math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        for device in leaf.sharding.addressable_devices:
            per[device] = per.get(device, 0) + nbytes
    return max(per.values(), default=0)
