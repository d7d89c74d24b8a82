"""What a compiled program does per call, read from its optimized HLO text: matmul FLOPs and the
bytes its collectives move, with loop bodies counted as often as they run.

XLA's `cost_analysis()` counts a `while` body once, so a model whose layers are a `lax.scan`
reports the FLOPs of one layer. Here every computation is weighed by how often it runs: a while
loop's body by its `known_trip_count` (XLA writes it into the loop's backend config), a fusion or
call by its caller's count, a conditional by its costliest branch.

    counts = analyze(compiled.as_text())
    counts.dot_flops, counts.collective_bytes, counts.collectives  # {"all-gather": (n, bytes)}
"""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "all-to-all",
  "ragged-all-to-all",
  "collective-permute",
  "collective-broadcast",
)
_BYTES = {
  "pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
  "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]\w*)\[([^\]]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLEES = re.compile(r"\b(?:body|calls|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str  # e.g. "f32[8,128]{1,0}" or a tuple "(s32[], f32[8]{0})"
  op: str
  operands: list[str]
  attrs: str


@dataclasses.dataclass
class Counts:
  """Per call of the program, on one device. A while loop of unknown trip count (the decode
  round's) counts once: its figures are per decoded token."""

  dot_flops: float = 0.0
  collective_bytes: float = 0.0
  collectives: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # op: [n, bytes]

  def add(self, other: Counts, times: float = 1.0) -> None:
    self.dot_flops += times * other.dot_flops
    self.collective_bytes += times * other.collective_bytes
    for op, (n, b) in other.collectives.items():
      mine = self.collectives.setdefault(op, [0.0, 0.0])
      mine[0] += times * n
      mine[1] += times * b


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape (a tuple's elements summed); layouts and `<=` bounds are ignored."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype not in _BYTES:
      continue  # token[], opaque types
    sizes = [int(d.strip().lstrip("<=")) for d in dims.split(",") if d.strip()]
    total += _BYTES[dtype] * math.prod(sizes)
  return total


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d.strip().lstrip("<=")) for d in m.group(2).split(",") if d.strip()] if m else []


def _matching(text: str, start: int) -> int:
  """Index just past the bracket closing the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    if text[i] in "([{":
      depth += 1
    elif text[i] in ")]}":
      depth -= 1
      if depth == 0:
        return i + 1
  raise ValueError(f"unbalanced HLO line: {text[:120]}")


def parse_instruction(line: str) -> Instruction | None:
  """`[ROOT] %name = SHAPE op(%a, %b), attrs` -> Instruction (None for other lines)."""
  m = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+) = ", line)
  if not m:
    return None
  rest = line[m.end() :]
  if rest.startswith("("):
    end = _matching(rest, 0)
  else:
    end = rest.index(" ")
  shape, rest = rest[:end], rest[end:].lstrip()
  op_match = re.match(r"([\w\-]+)\(", rest)
  if not op_match:
    return None
  close = _matching(rest, op_match.end() - 1)
  operands = re.findall(r"%([\w.\-]+)", rest[op_match.end() : close - 1])
  return Instruction(m.group(1), shape, op_match.group(1), operands, rest[close:])


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """Computations by name, and the entry computation's name."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header and "=" not in line.split("{")[0].split("(")[0]:
      current = header.group(1)
      computations[current] = []
      if line.startswith("ENTRY"):
        entry = current
      continue
    if current is not None:
      inst = parse_instruction(line)
      if inst is not None:
        computations[current].append(inst)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


def _own_counts(inst: Instruction, shapes: dict[str, str]) -> Counts:
  counts = Counts()
  base = inst.op.removesuffix("-start")
  if base in COLLECTIVES and not inst.op.endswith("-done"):
    moved = sum(shape_bytes(shapes.get(o, "")) for o in inst.operands)
    counts.collective_bytes = moved
    counts.collectives[base] = [1.0, moved]
  elif inst.op == "dot":
    lhs = _dims(shapes.get(inst.operands[0], ""))
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attrs)
    k = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i) if contracting else 1
    counts.dot_flops = 2.0 * math.prod(_dims(inst.shape)) * k
  return counts


def analyze(text: str) -> Counts:
  """FLOPs of every dot and bytes of every collective, per call of the entry computation."""
  computations, entry = parse_module(text)
  shapes = {i.name: i.shape for insts in computations.values() for i in insts}
  memo: dict[str, Counts] = {}

  def weigh(name: str, stack: tuple[str, ...] = ()) -> Counts:
    if name in memo:
      return memo[name]
    if name in stack or name not in computations:
      return Counts()
    total = Counts()
    for inst in computations[name]:
      total.add(_own_counts(inst, shapes))
      times = 1.0
      trip = _TRIP.search(inst.attrs)
      if inst.op == "while":
        times = float(trip.group(1)) if trip else 1.0
      for callee in _CALLEES.findall(inst.attrs):
        total.add(weigh(callee, stack + (name,)), times)
      branches = _BRANCHES.search(inst.attrs)
      if branches:
        options = [weigh(b, stack + (name,)) for b in re.findall(r"%([\w.\-]+)", branches.group(1))]
        total.add(max(options, key=lambda c: (c.dot_flops, c.collective_bytes)))
    memo[name] = total
    return total

  return weigh(entry)
