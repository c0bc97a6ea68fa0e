"""Device mesh, logical-axis rules and shardings: the only module that names mesh axes.

The mesh has three axes, always in this order:

* ``data``   — pure data parallelism: the batch is split, params are replicated.
* ``fsdp``   — fully-sharded data parallelism (ZeRO-3): the batch is split AND params / optimizer
  state are split along their ``embed`` dimension (all-gathered per layer by XLA).
* ``tensor`` — tensor (Megatron) parallelism: heads, MLP hidden units and vocab are split.

Model code names axes only logically (``"embed"``, ``"q_heads"``, ``"batch"``...); one rules table
(:data:`LOGICAL_RULES`) maps those names to mesh axes. Shardings are attached where a step is
jitted, never inside the math (MaxText / nanodo pattern).

The pattern every trainer follows::

    mesh = make_mesh(MeshConfig(data=-1, fsdp=2, tensor=1))
    p_sh = param_shardings(model, mesh)                            # logical specs -> NamedShardings
    params = create_sharded(init_fn, key, out_shardings=p_sh)      # born sharded, never replicated
    o_sh = opt_state_shardings(tx, p_sh, jax.eval_shape(init_fn, key), mesh)
    opt_state = create_sharded(tx.init, params, out_shardings=o_sh)
    step = jit_sharded(train_step, mesh,
                       in_shardings=(state_sh, batch_sharding(mesh)),
                       out_shardings=(state_sh, replicated(mesh)),
                       donate_argnums=(0,))                         # state buffers reused in place
    state, metrics = step(state, shard_batch(host_batch, mesh))

Explicit ``out_shardings`` for the optimizer state matter: left to propagation, the second step sees
different input shardings than the first and recompiles.

Frozen models (reference policy, reward model) may use a different table, e.g.
:data:`INFERENCE_RULES` (no fsdp on params: no all-gathers in a forward-only pass).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

#: Training layout: FSDP over ``embed``, tensor parallelism over heads / mlp / vocab,
#: batch over ``data`` x ``fsdp``. One rule per logical name (checked by :func:`validate_rules`).
LOGICAL_RULES: Rules = (
    # params
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

#: Layout for frozen, forward-only models: params split only over ``tensor`` (replicated over
#: ``data`` and ``fsdp``), so a forward pass needs no parameter all-gathers.
INFERENCE_RULES: Rules = tuple((k, None if k == "embed" else v) for k, v in LOGICAL_RULES)


# ----------------------------------------------------------------------------------------- mesh
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Shape of the ``(data, fsdp, tensor)`` device mesh.

    Attributes:
      data: Data-parallel replicas (batch split, params replicated). ``-1`` = all remaining devices.
      fsdp: Fully-sharded data parallelism (batch and params/optimizer state split). ``-1`` allowed.
      tensor: Tensor parallelism (heads, mlp, vocab split). ``-1`` allowed.

    At most one field may be ``-1``; the product must equal the number of devices.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self) -> None:
        for name in MESH_AXES:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
                raise ValueError(f"mesh.{name} must be a positive int or -1 (= the rest), got {v!r}")
        auto = [n for n in MESH_AXES if getattr(self, n) == -1]
        if len(auto) > 1:
            raise ValueError(f"at most one of mesh.data/fsdp/tensor may be -1, got -1 for {auto}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MeshConfig:
        """Builds from a mapping; an unknown key raises naming it."""
        unknown = sorted(set(d) - set(MESH_AXES))
        if unknown:
            raise ValueError(f"unknown mesh key(s) {unknown}; valid keys: {list(MESH_AXES)}")
        return cls(**dict(d))

    @classmethod
    def parse(cls, text: str) -> MeshConfig:
        """Parses ``"2,2,2"`` / ``"2x2x2"`` (data, fsdp, tensor) or ``"data=2,fsdp=-1"``."""
        parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
        try:
            if all("=" in p for p in parts):
                return cls.from_dict({k.strip(): int(v) for k, v in (p.split("=", 1) for p in parts)})
            if len(parts) == 3 and not any("=" in p for p in parts):
                return cls(*(int(p) for p in parts))
        except ValueError as e:
            raise ValueError(f"bad mesh spec {text!r}: {e}") from None
        raise ValueError(f"bad mesh spec {text!r}: want 'D,F,T' or 'data=D,fsdp=F,tensor=T'")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """Resolves ``-1`` against ``num_devices``; raises if the sizes do not multiply to it."""
        sizes = {n: getattr(self, n) for n in MESH_AXES}
        known = math.prod(v for v in sizes.values() if v != -1)
        for n, v in sizes.items():
            if v == -1:
                if num_devices % known:
                    raise ValueError(
                        f"mesh.{n}=-1: {num_devices} devices not divisible by the other axes' "
                        f"product {known} ({sizes})")
                sizes[n] = num_devices // known
        if math.prod(sizes.values()) != num_devices:
            raise ValueError(f"mesh {sizes} has {math.prod(sizes.values())} devices, "
                             f"but {num_devices} are available")
        return tuple(sizes[n] for n in MESH_AXES)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ``(data, fsdp, tensor)`` mesh with Auto axis types (jax.make_mesh defaults to
    Explicit). ``devices`` defaults to all global devices."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(cfg.shape(len(devices)), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


# ---------------------------------------------------------------------------------------- rules
def validate_rules(rules: Rules) -> dict[str, tuple[str, ...]]:
    """Checks a rules table (one rule per logical name, known mesh axes); returns name -> axes."""
    out: dict[str, tuple[str, ...]] = {}
    for entry in rules:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f"bad sharding rule {entry!r}: want (logical_name, mesh_axes)")
        name, axes = entry
        if name in out:
            raise ValueError(f"logical axis {name!r} has more than one sharding rule")
        axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        bad = [a for a in axes_t if a not in MESH_AXES]
        if bad:
            raise ValueError(f"rule for {name!r} names unknown mesh axes {bad}; mesh axes: {MESH_AXES}")
        out[name] = axes_t
    return out


def _mesh_spec(logical: P, table: dict[str, tuple[str, ...]], where: str) -> P:
    """Maps one logical PartitionSpec to a mesh PartitionSpec, strictly."""
    out: list[MeshAxes] = []
    used: set[str] = set()
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if not isinstance(name, str):
            raise ValueError(f"{where}: logical axis {name!r} must be a string or None")
        if name not in table:
            raise ValueError(f"{where}: logical axis {name!r} has no sharding rule "
                             f"(rules cover {sorted(table)})")
        axes = table[name]
        if used & set(axes):
            raise ValueError(f"{where}: mesh axes {sorted(used & set(axes))} used by two dims of {logical}")
        used |= set(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def _axes_size(mesh: Mesh, axes: MeshAxes) -> int:
    axes_t = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes_t)


def logical_to_shardings(logical_specs: Any, mesh: Mesh, *, shapes: Any = None,
                         rules: Rules = LOGICAL_RULES) -> Any:
    """Turns a pytree of logical PartitionSpecs into NamedShardings on ``mesh``.

    Args:
      logical_specs: Pytree whose leaves are ``PartitionSpec``s of logical names.
      mesh: The device mesh.
      shapes: Optional pytree of the same structure with ``.shape`` leaves (arrays or
        ``ShapeDtypeStruct``). When given, each spec must have one entry per dim and every sharded
        dim must be divisible by its mesh axes' total size.
      rules: Logical -> mesh axes table.

    Raises:
      ValueError: naming the pytree path and logical axis, for a logical name without a rule, a
        spec/rank mismatch, or an indivisible dim. Nothing is silently replicated.
    """
    table = validate_rules(rules)
    is_spec = lambda x: isinstance(x, P)  # noqa: E731

    def one(path, logical, shaped=None):
        where = f"param {jax.tree_util.keystr(path) or '<root>'}"
        if not isinstance(logical, P):
            raise ValueError(f"{where}: expected a PartitionSpec of logical names, got {logical!r}")
        spec = _mesh_spec(logical, table, where)
        if shaped is not None:
            shape = tuple(shaped.shape)
            if len(spec) != len(shape):
                raise ValueError(f"{where}: logical spec {logical} has {len(spec)} entries for an "
                                 f"array of shape {shape}")
            for dim, (size, axes, name) in enumerate(zip(shape, spec, logical)):
                n = _axes_size(mesh, axes)
                if size % n:
                    raise ValueError(f"{where}: dim {dim} (logical axis {name!r}) of size {size} is not "
                                     f"divisible by mesh axes {axes} of total size {n}")
        return NamedSharding(mesh, spec)

    if shapes is None:
        return jax.tree_util.tree_map_with_path(one, logical_specs, is_leaf=is_spec)
    return jax.tree_util.tree_map_with_path(one, logical_specs, shapes, is_leaf=is_spec)


def param_shardings(model: Any, mesh: Mesh, *, rules: Rules = LOGICAL_RULES) -> Any:
    """Shardings of ``rlhf_jax.models`` params (from ``models.logical_specs``), checked for divisibility."""
    from rlhf_jax import models  # models sit above sharding in the layering; imported lazily

    abstract = jax.eval_shape(functools.partial(models.init_params, model), jax.random.key(0))
    return logical_to_shardings(models.logical_specs(model), mesh, shapes=abstract, rules=rules)


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding (scalars, metrics, small state)."""
    return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------------------- batch
def batch_sharding(mesh: Mesh, *, rules: Rules = LOGICAL_RULES) -> NamedSharding:
    """Sharding of a batch leaf: leading dim over the ``"batch"`` rule's axes, the rest replicated."""
    return NamedSharding(mesh, _mesh_spec(P("batch"), validate_rules(rules), "batch"))


def host_data_shard(mesh: Mesh, *, rules: Rules = LOGICAL_RULES) -> tuple[int, int]:
    """Which slice of the global batch this host must load: ``(shard_index, num_shards)``.

    Equals ``(jax.process_index(), jax.process_count())`` when the batch axes span every host; when
    a host's devices repeat batch slices (e.g. tensor parallelism across hosts) hosts share a shard.
    A loader keeps rows ``shard_index::num_shards`` (or the ``shard_index``-th contiguous block).
    """
    batch_axes = validate_rules(rules).get("batch", ())
    idx = [MESH_AXES.index(a) for a in batch_axes]
    sizes = [mesh.devices.shape[i] for i in idx]
    me = jax.process_index()
    linear = sorted({int(np.ravel_multi_index(tuple(c[i] for i in idx), sizes)) if idx else 0
                     for c in np.argwhere(np.vectorize(lambda d: d.process_index == me)(mesh.devices))})
    per_host, total = len(linear), math.prod(sizes)
    if linear != list(range(linear[0], linear[0] + per_host)) or linear[0] % per_host:
        raise ValueError(f"process {me} holds non-contiguous batch slices {linear} of mesh "
                         f"{dict(mesh.shape)}; order mesh devices by process")
    return linear[0] // per_host, total // per_host


def local_batch_divisor(mesh: Mesh, *, rules: Rules = LOGICAL_RULES) -> int:
    """What a host-local batch's leading dim must be divisible by for :func:`shard_batch`."""
    n = _axes_size(mesh, batch_sharding(mesh, rules=rules).spec[0])
    return n // host_data_shard(mesh, rules=rules)[1]


def shard_batch(batch: Any, mesh: Mesh, *, rules: Rules = LOGICAL_RULES) -> Any:
    """Places a host-local batch pytree on ``mesh`` as global arrays split over the batch axes.

    Each host passes its own rows (see :func:`host_data_shard`); the global batch is the
    concatenation in shard order (``jax.make_array_from_process_local_data``). Single-host, the
    local batch is the global batch.

    Raises:
      ValueError: naming the leaf, axes and sizes if a leading dim is not divisible by the batch
        axes (or has no leading dim).
    """
    sharding = batch_sharding(mesh, rules=rules)
    axes = sharding.spec[0]
    n = _axes_size(mesh, axes)
    num_shards = host_data_shard(mesh, rules=rules)[1]
    local_shards = local_batch_divisor(mesh, rules=rules)

    def put(path, x):
        where = f"batch leaf {jax.tree_util.keystr(path) or '<root>'}"
        x = np.asarray(x)
        if x.ndim == 0:
            raise ValueError(f"{where} is a scalar: batch leaves need a leading batch dim")
        if x.shape[0] % local_shards:
            raise ValueError(f"{where}: batch size {x.shape[0]} on process {jax.process_index()} is not "
                             f"divisible by mesh axes {axes} (size {n}, {local_shards} on this host)")
        global_shape = (x.shape[0] * num_shards,) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree_util.tree_map_with_path(put, batch)


def local_rows(batch: Any) -> Any:
    """This host's rows of batch-sharded global arrays, as numpy: the inverse of :func:`shard_batch`.

    Reads only the process's addressable shards (one copy per batch slice; tensor-parallel replicas are
    skipped), so it never fetches another host's data. Numpy leaves pass through unchanged.
    """
    def get(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        slices = {}
        for s in x.addressable_shards:
            slices.setdefault(s.index[0].start or 0, s)
        return np.concatenate([np.asarray(slices[k].data) for k in sorted(slices)], axis=0)

    return jax.tree.map(get, batch)


# ------------------------------------------------------------------------------ creation and jit
def create_sharded(init_fn: Callable[..., Any], *args: Any, out_shardings: Any) -> Any:
    """Runs ``init_fn(*args)`` under ``jit`` so its outputs are born sharded (never materialised
    whole on one device). Get ``out_shardings`` from ``jax.eval_shape(init_fn, *args)``."""
    return jax.jit(init_fn, out_shardings=out_shardings)(*args)


def opt_state_shardings(tx: optax.GradientTransformation, params_shardings: Any,
                        abstract_params: Any, mesh: Mesh) -> Any:
    """Explicit shardings for ``tx.init(params)``: param-shaped leaves (Adam moments...) follow
    their param's sharding, other leaves (step counts) are replicated.

    Raises:
      ValueError: if a param-position leaf does not have its param's shape (e.g. factored
        second moments), naming the path — give those shardings explicitly.
    """
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    rep = replicated(mesh)
    shardings = optax.tree_map_params(tx, lambda _leaf, sh: sh, abstract_state, params_shardings,
                                      transform_non_params=lambda _: rep,
                                      is_leaf=lambda x: isinstance(x, NamedSharding))

    def check(path, leaf, sh):
        spec_rank = len(sh.spec)
        if spec_rank > len(leaf.shape) or any(
                d % _axes_size(mesh, a) for d, a in zip(leaf.shape, sh.spec)):
            raise ValueError(f"optimizer state {jax.tree_util.keystr(path)} of shape {leaf.shape} "
                             f"cannot take sharding {sh.spec}")
        return sh

    return jax.tree_util.tree_map_with_path(check, abstract_state, shardings)


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Iterator[Mesh]:
    """``jax.set_mesh(mesh)`` + ``nn.logical_axis_rules(rules)``: activates the model's
    ``nn.with_logical_constraint`` annotations. Must be entered outside ``jit``."""
    validate_rules(rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh


def jit_sharded(fn: Callable[..., Any], mesh: Mesh, *, in_shardings: Any, out_shardings: Any,
                donate_argnums: int | Sequence[int] = (), static_argnums: int | Sequence[int] = (),
                rules: Rules = LOGICAL_RULES, compiler_options: dict[str, Any] | None = None) -> Callable[..., Any]:
    """``jax.jit`` with explicit in/out shardings and donation, called under :func:`mesh_context`.

    Every call (hence every trace) runs with the mesh and ``rules`` active, so activation
    constraints resolve the same way for every trainer. Donate the train state
    (``donate_argnums=(0,)``) so its buffers are updated in place. The jitted function is
    available as ``.jitted`` (for ``.lower`` or ``._cache_size()``). ``compiler_options``: XLA options for
    this program only (e.g. :func:`gradient_compiler_options`).
    """
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=donate_argnums, static_argnums=static_argnums,
                     compiler_options=compiler_options)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with mesh_context(mesh, rules):
            return jitted(*args, **kwargs)

    call.jitted = jitted  # type: ignore[attr-defined]
    return call
