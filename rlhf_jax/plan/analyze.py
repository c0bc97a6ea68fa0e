"""Compile one planned program and read its per-chip memory, FLOPs and collectives.

    peak(program) = arguments + outputs − aliased (donated) + temporaries      (``memory_analysis``, per chip)
    peak(run, program) = peak(program) + resident buffers the program does not take as arguments

The resident buffers (train states, frozen models) live on the chips for the whole run; a program that does
not read them (the sampler does not read the optimizer state) still shares the HBM with them. Collectives are
read from the compiled HLO text: each all-gather / reduce-scatter / all-reduce / all-to-all /
collective-permute instruction once (an async ``-start``/``-done`` pair once), with the bytes of its result;
an instruction inside a loop body (the decode loop, the micro-batch scan) is counted once, not per trip.

On ``cpu-N`` a program also gets ``runtime_scratch``: XLA:CPU writes the result of a dot fused with its consumers
(the LM head's logits fused into log-softmax) into a buffer it allocates at run time, outside the buffer
assignment that ``memory_analysis`` reports. Measured here: the tiny DPO train step on 1 CPU device reports
15.9 MiB of temporaries and raises the resident set by 20.0 MiB; its largest fused dot is f32[256,4096] (4 MiB).
The plan adds the largest fused dot result of the program (the executions run one dot at a time per device).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
                "s4": 1, "u4": 1}
_INSTR = re.compile(r"=\s*(?P<type>\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+(?P<op>" + "|".join(COLLECTIVES)
                    + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")


def shape_bytes(type_text: str) -> int:
    """Bytes of an HLO result type (``bf16[1024,512]{1,0}`` or a tuple of them)."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """``{op: {"count": n, "bytes": b}}`` of the collective instructions in a compiled HLO module's text."""
    out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    for line in hlo_text.splitlines():
        m = _INSTR.search(line)
        if not m:
            continue
        nbytes = shape_bytes(m.group("type"))
        if m.group("start") and m.group("type").startswith("("):  # async start returns (operand, result, ...)
            parts = _ARRAY.findall(m.group("type"))
            nbytes = shape_bytes("{}[{}]".format(*parts[-1])) if parts else nbytes
        out[m.group("op")]["count"] += 1
        out[m.group("op")]["bytes"] += nbytes
    return {op: v for op, v in out.items() if v["count"]}


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s")
_DOT = re.compile(r"=\s*(?P<type>[a-z0-9]+\[[0-9,]*\])\S*\s+dot\(")


def fused_dot_scratch(hlo_text: str) -> int:
    """Bytes of the largest dot result inside a fused computation of a compiled HLO module's text."""
    name, best = "", 0
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():
            m = _COMPUTATION.match(line)
            name = m.group("name") if m else ""
            continue
        m = _DOT.search(line)
        if m and "fused" in name:
            best = max(best, shape_bytes(m.group("type")))
    return best


def _itemsize(dtype) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):  # a PRNG key: its uint32 words
        return 4 * math.prod(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)
    return jax.numpy.dtype(dtype).itemsize


def per_chip_bytes(tree: Any) -> int:
    """Largest bytes one device holds of an abstract (``ShapeDtypeStruct`` with sharding) or concrete pytree."""
    per: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        nbytes = math.prod(shape) * _itemsize(leaf.dtype)
        devices = sharding.device_set if sharding is not None else {None}
        for d in devices:
            per[d] = per.get(d, 0) + nbytes
    return max(per.values(), default=0)


@dataclasses.dataclass
class ProgramReport:
    """What one compiled program needs per chip."""

    name: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    code: int
    program_peak: int  # arguments + outputs − aliased + temporaries + runtime_scratch
    other_resident: int  # resident buffers not among the arguments
    peak: int  # program_peak + other_resident
    flops: float
    collectives: dict
    note: str = ""
    runtime_scratch: int = 0  # cpu-N: the largest fused dot result (allocated by XLA:CPU at run time)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def analyse(name: str, compiled: Any, *, other_resident: int, note: str = "", cpu: bool = False) -> ProgramReport:
    """A :class:`ProgramReport` of a ``jax.stages.Compiled`` (``cpu``: add XLA:CPU's runtime dot scratch)."""
    mem = compiled.memory_analysis()
    args, outs = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    text = compiled.as_text()
    scratch = fused_dot_scratch(text) if cpu else 0
    program_peak = args + outs - alias + temp + scratch
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per partition
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", 0.0))
    return ProgramReport(name=name, arguments=args, outputs=outs, aliased=alias, temporaries=temp,
                         code=int(mem.generated_code_size_in_bytes), program_peak=program_peak,
                         other_resident=other_resident, peak=program_peak + other_resident, flops=flops,
                         collectives=collectives(text), note=note, runtime_scratch=scratch)
