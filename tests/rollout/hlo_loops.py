"""Reading compiled (partitioned) HLO text: which collectives run inside a `while` loop (not collected by pytest).

Used by `layout_worker.py` on the sampler's program (`rollout.lower_generate(...).compile().as_text()`):

    comps = parse_computations(hlo)                 # name -> Computation (instructions in order)
    (loop,) = top_level_whiles(comps)               # the decode loop (nested loops are inside its body)
    gathers = collectives_in(comps, loop.body, ("all-gather", "all-gather-start"))

`collectives_in` searches the body computation and every computation it calls, recursively (fusions, nested
while bodies and conditions, conditionals' branches, reducers, async wrappers).
"""

from __future__ import annotations

import dataclasses
import math
import re

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLED_ONE = re.compile(r"\b(?:calls|body|condition|to_apply|true_computation|false_computation|scatter|select|"
                         r"comparator)=%?([\w.\-]+)")
_CALLED_MANY = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str  # the result shape text, e.g. "f32[32,96]{1,0}" or "(s32[], f32[4])"
    opcode: str
    operands: tuple[str, ...]  # operand instruction names (compiled HLO prints names only)
    attrs: str  # everything after the operand list
    line: str

    @property
    def arrays(self) -> list[tuple[str, tuple[int, ...]]]:
        """(dtype, dims) of every array in the result shape (one for an array, several for a tuple)."""
        return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(self.shape)]

    @property
    def called(self) -> list[str]:
        names = _CALLED_ONE.findall(self.attrs)
        for group in _CALLED_MANY.findall(self.attrs):
            names += [n.strip().lstrip("%") for n in group.split(",") if n.strip()]
        return names


@dataclasses.dataclass
class Computation:
    name: str
    entry: bool
    instructions: list[Instruction]

    def by_name(self) -> dict[str, Instruction]:
        return {i.name: i for i in self.instructions}


def _split_shape(rest: str) -> tuple[str, str]:
    """`rest` = "SHAPE opcode(...)..." -> (SHAPE, "opcode(...)..."); a tuple shape may nest parentheses."""
    rest = rest.strip()
    if rest.startswith("("):
        depth = 0
        for k, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: k + 1], rest[k + 1:].strip()
        raise ValueError(f"unbalanced tuple shape in {rest[:200]!r}")
    shape, _, tail = rest.partition(" ")
    return shape, tail.strip()


def _parse_instruction(line: str) -> Instruction | None:
    m = _INSTR.match(line)
    if not m:
        return None
    name, rest = m.groups()
    shape, tail = _split_shape(rest)
    op = re.match(r"([\w\-]+)\(", tail)
    if not op:
        return None
    depth, k = 0, op.end() - 1
    for k in range(op.end() - 1, len(tail)):
        depth += tail[k] == "("
        depth -= tail[k] == ")"
        if depth == 0:
            break
    operand_text = tail[op.end(): k]
    operands = tuple(re.findall(r"%([\w.\-]+)", operand_text))
    return Instruction(name, shape, op.group(1), operands, tail[k + 1:], line)


def parse_computations(hlo: str) -> dict[str, Computation]:
    """All computations of an HLO module's text, by name."""
    comps: dict[str, Computation] = {}
    current: Computation | None = None
    for line in hlo.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = Computation(m.group(2), bool(m.group(1)), [])
            continue
        if line.strip() == "}":
            comps[current.name] = current
            current = None
            continue
        instr = _parse_instruction(line)
        if instr is not None:
            current.instructions.append(instr)
    if not any(c.entry for c in comps.values()):
        raise ValueError("no ENTRY computation in the HLO text")
    return comps


@dataclasses.dataclass(frozen=True)
class WhileLoop:
    instruction: Instruction
    computation: str  # where the while instruction sits
    body: str
    condition: str


def _while_of(instr: Instruction, where: str) -> WhileLoop:
    body = re.search(r"\bbody=%?([\w.\-]+)", instr.attrs).group(1)
    cond = re.search(r"\bcondition=%?([\w.\-]+)", instr.attrs).group(1)
    return WhileLoop(instr, where, body, cond)


def reachable(comps: dict[str, Computation], root: str, *, through_loops: bool = True) -> list[str]:
    """Computations called from `root`, recursively, `root` first (optionally not entering while loops)."""
    seen, order, stack = set(), [], [root]
    while stack:
        name = stack.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        order.append(name)
        for instr in comps[name].instructions:
            if instr.opcode == "while" and not through_loops:
                continue
            stack.extend(reversed(instr.called))
    return order


def top_level_whiles(comps: dict[str, Computation]) -> list[WhileLoop]:
    """While loops reached from ENTRY without entering another loop (the sampler has exactly one: the decode)."""
    (entry,) = [c.name for c in comps.values() if c.entry]
    return [_while_of(i, name) for name in reachable(comps, entry, through_loops=False)
            for i in comps[name].instructions if i.opcode == "while"]


@dataclasses.dataclass(frozen=True)
class Collective:
    instruction: Instruction
    computation: str
    operand_arrays: tuple[tuple[str, tuple[int, ...]], ...]  # the operands' (dtype, dims)

    @property
    def result_arrays(self) -> list[tuple[str, tuple[int, ...]]]:
        arrays = self.instruction.arrays
        if self.instruction.opcode.endswith("-start") and len(arrays) > len(self.operand_arrays):
            return arrays[len(self.operand_arrays):]  # async start: (operands..., results...)
        return arrays


def collectives_in(comps: dict[str, Computation], root: str, opcodes: tuple[str, ...]) -> list[Collective]:
    """Instructions with one of `opcodes` in `root` and everything it calls (recursively)."""
    out = []
    for name in reachable(comps, root):
        index = comps[name].by_name()
        for instr in comps[name].instructions:
            if instr.opcode in opcodes:
                ops = tuple(a for o in instr.operands if o in index for a in index[o].arrays)
                out.append(Collective(instr, name, ops))
    return out


def weight_like(collective: Collective, weight_sizes: set[int]) -> bool:
    """A collective moves weights if one of its results has the element count of a (≥ 2-D) weight and at least
    two non-unit dims (XLA may have bitcast [D, H, hd] to [D, H·hd]; decode activations have a unit dim per
    token and a per-device batch of a few rows, so a test picks sizes that cannot collide)."""
    return any(math.prod(dims) in weight_sizes and sum(d > 1 for d in dims) >= 2
               for _, dims in collective.result_arrays)
