"""FLOPs and bytes of each HLO instruction, from shapes alone.

The counting follows XLA's own HloCostAnalysis, so that on programs without loops the module
totals agree with `compiled.cost_analysis()`:
  - elementwise arithmetic: one FLOP per output element; transcendental functions (exp, log,
    tanh, sqrt, power, ...) count one 'transcendental' per element instead, as in XLA;
  - dot: 2 x output elements x contracted size; convolution: 2 multiply-adds per valid
    (output, kernel) position pair, padding excluded, divided among feature groups;
  - reduce: (input elements - output elements) x the reducer's FLOPs; reduce-window:
    (window elements - 1) x output elements x the reducer's FLOPs;
  - data movement (copy, transpose, broadcast, slice, gather, ...) has no FLOPs;
  - a fusion costs what its body costs; a while loop costs its body and condition once per
    iteration (XLA counts one iteration), a conditional its most expensive branch.
Bytes are what an instruction reads and writes at its boundary (operands plus result); a fusion's
bytes are those of the fusion, not of its body.
"""

import dataclasses
import functools
import math
import re
from typing import Optional

from fathom_jax.analysis import hlo

TRANSCENDENTAL = frozenset({
    "exponential", "exponential-minus-one", "log", "log-plus-one", "logistic", "power", "sqrt",
    "rsqrt", "cbrt", "tanh", "sine", "cosine", "tan", "erf", "atan2",
})
ELEMENTWISE = TRANSCENDENTAL | frozenset({
    "add", "subtract", "multiply", "divide", "remainder", "maximum", "minimum", "and", "or", "xor",
    "not", "negate", "abs", "sign", "floor", "ceil", "round-nearest-afz", "round-nearest-even",
    "compare", "select", "clamp", "convert", "is-finite", "shift-left", "shift-right-logical",
    "shift-right-arithmetic", "popcnt", "count-leading-zeros", "real", "imag", "complex",
    "reduce-precision", "stochastic-convert",
})
# Opcodes that move or re-index data without arithmetic.
DATA_MOVEMENT = frozenset({
    "copy", "transpose", "broadcast", "reshape", "bitcast", "slice", "dynamic-slice",
    "dynamic-update-slice", "concatenate", "pad", "gather", "reverse", "iota", "copy-start",
    "copy-done", "bitcast-convert", "get-tuple-element", "tuple", "dynamic-reshape",
})
# Neither FLOPs nor bytes: they name or forward buffers.
FREE = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast",
                  "after-all", "add-dependency", "opt-barrier", "partition-id", "replica-id"})
COLLECTIVES = frozenset({
    "all-reduce", "all-reduce-start", "all-reduce-done", "all-gather", "all-gather-start",
    "all-gather-done", "reduce-scatter", "all-to-all", "collective-permute",
    "collective-permute-start", "collective-permute-done", "collective-broadcast", "send",
    "send-done", "recv", "recv-done", "ragged-all-to-all",
})
CONTROL_FLOW = frozenset({"while", "conditional", "call", "async-start", "async-update",
                          "async-done"})


@dataclasses.dataclass(frozen=True)
class Cost:
  flops: float = 0.0
  bytes: float = 0.0
  transcendentals: float = 0.0

  def __add__(self, other: "Cost") -> "Cost":
    return Cost(self.flops + other.flops, self.bytes + other.bytes,
                self.transcendentals + other.transcendentals)

  def scale(self, factor: float) -> "Cost":
    return Cost(self.flops * factor, self.bytes * factor, self.transcendentals * factor)

  @property
  def work(self) -> float:
    """Arithmetic work: FLOPs plus transcendental evaluations."""
    return self.flops + self.transcendentals


def _dims(text: str) -> list[int]:
  return [int(d) for d in re.findall(r"\d+", text or "")]


def dot_flops(inst: hlo.Instruction) -> float:
  lhs = inst.operand_shapes[0] if inst.operand_shapes else None
  contracted = math.prod(lhs.dims[d] for d in _dims(inst.attrs.get("lhs_contracting_dims"))
                         if lhs and d < len(lhs.dims)) if lhs else 1
  return 2.0 * inst.shape.arrays()[0].num_elements * contracted


def _gemm_flops(inst: hlo.Instruction) -> float:
  """A GPU library GEMM custom call: dimensions from its backend config."""
  numbers = inst.backend_config.get("gemm_backend_config", {}).get("dot_dimension_numbers", {})
  lhs = inst.operand_shapes[0] if inst.operand_shapes else None
  if lhs is None:
    return 0.0
  contracted = math.prod(lhs.dims[int(d)] for d in numbers.get("lhs_contracting_dimensions", [])
                         if int(d) < len(lhs.dims))
  return 2.0 * inst.shape.arrays()[0].num_elements * contracted


def _window(inst: hlo.Instruction) -> list[dict]:
  """window={size=3x3 stride=2x2 pad=1_1x1_1 lhs_dilate=.. rhs_dilate=..} -> one dict per dim."""
  text = inst.attrs.get("window", "").strip("{}")
  fields = dict(part.split("=", 1) for part in text.split() if "=" in part)
  n = len(fields.get("size", "").split("x")) if "size" in fields else 0

  def values(key, default):
    if key not in fields:
      return [default] * n
    return [tuple(int(v) for v in f.split("_")) if "_" in f else int(f)
            for f in fields[key].split("x")]

  sizes, strides, pads = values("size", 1), values("stride", 1), values("pad", (0, 0))
  lhs_dil, rhs_dil = values("lhs_dilate", 1), values("rhs_dilate", 1)
  return [dict(size=sizes[i], stride=strides[i], pad=pads[i], lhs_dilate=lhs_dil[i],
               rhs_dilate=rhs_dil[i]) for i in range(n)]


def _valid_pairs(in_size: int, out_size: int, w: dict) -> int:
  """(output, kernel) position pairs of one spatial dim that read real input, not padding."""
  dilated_in = (in_size - 1) * w["lhs_dilate"] + 1 if in_size else 0
  count = 0
  for o in range(out_size):
    for k in range(w["size"]):
      pos = o * w["stride"] + k * w["rhs_dilate"] - w["pad"][0]
      if 0 <= pos < dilated_in and pos % w["lhs_dilate"] == 0:
        count += 1
  return count


def _conv_roles(inst: hlo.Instruction):
  """(input, kernel, output) shapes of the forward convolution that `inst` computes or
  differentiates. A cuDNN call keeps the forward convolution's window and dim_labels whatever
  it computes: a backward-input call reads (dy, kernel) and writes dx, a backward-filter call
  reads (x, dy) and writes the kernel's gradient."""
  operands = inst.operand_shapes
  result = inst.shape.arrays()[0] if inst.shape.arrays() else None
  if len(operands) < 2 or result is None:
    return None
  target = inst.custom_call_target if inst.opcode == "custom-call" else ""
  if target.endswith("convBackwardInput"):
    return result, operands[1], operands[0]
  if target.endswith("convBackwardFilter"):
    return operands[0], result, operands[1]
  return operands[0], operands[1], result


def conv_flops(inst: hlo.Instruction) -> float:
  """Multiply-adds of a convolution (HLO op or cuDNN custom call), as XLA counts them. The
  gradients of a convolution multiply the same (output, kernel) position pairs as the
  convolution itself, so each cuDNN kind counts its forward convolution's pairs."""
  labels = inst.attrs.get("dim_labels", "")
  m = re.fullmatch(r"(\w+)_(\w+)->(\w+)", labels)
  roles = _conv_roles(inst)
  if not m or roles is None:
    return 0.0
  lhs_l, rhs_l, out_l = m.groups()
  lhs, rhs, out = roles
  if len(lhs_l) != len(lhs.dims) or len(rhs_l) != len(rhs.dims) or len(out_l) != len(out.dims):
    return 0.0
  window = _window(inst)
  spatial = [c for c in lhs_l if c.isdigit()]
  pairs = 1
  for i, c in enumerate(sorted(spatial)):
    w = window[i] if i < len(window) else dict(size=1, stride=1, pad=(0, 0), lhs_dilate=1,
                                                 rhs_dilate=1)
    pairs *= _valid_pairs(lhs.dims[lhs_l.index(c)], out.dims[out_l.index(c)], w)
  batch = out.dims[out_l.index("b")]
  out_features = out.dims[out_l.index("f")]
  # The kernel's input features are per feature group already. A batch-grouped convolution (a
  # grouped kernel's gradient) is not divided by its groups, as XLA counts it (conv_kinds in
  # tests/data/targets).
  in_features = rhs.dims[rhs_l.index("i")]
  return 2.0 * pairs * batch * out_features * in_features


class CostModel:
  """Per-instruction costs of one module, memoised; loops multiplied by their trip counts."""

  def __init__(self, module: hlo.Module, count_loops_once: bool = False):
    self.module = module
    self.count_loops_once = count_loops_once

  @functools.lru_cache(maxsize=None)
  def computation(self, name: str) -> Cost:
    comp = self.module.computations.get(name)
    if comp is None:
      return Cost()
    total = Cost()
    for inst in comp.instructions:
      total = total + self.instruction(inst.name)
    return total

  def _reducer_flops(self, inst: hlo.Instruction) -> float:
    called = inst.called
    return self.computation(called[0]).flops if called else 1.0

  def flops(self, inst: hlo.Instruction) -> float:
    """FLOPs of one execution of `inst` (for control flow: of everything it runs)."""
    op = inst.opcode
    out = inst.shape
    if op in TRANSCENDENTAL:
      return 0.0
    if op in ELEMENTWISE:
      return float(out.arrays()[0].num_elements) if out.arrays() else 0.0
    if op == "dot":
      return dot_flops(inst)
    if op == "convolution":
      return conv_flops(inst)
    if op == "reduce":
      # A variadic reduce (argmax) is counted on its first input, as XLA does.
      inputs = inst.operand_shapes[0].num_elements if inst.operand_shapes else 0
      outputs = out.arrays()[0].num_elements
      return max(inputs - outputs, 0) * self._reducer_flops(inst)
    if op == "reduce-window":
      window = math.prod(w["size"] for w in _window(inst))
      outputs = out.arrays()[0].num_elements
      return (window - 1) * outputs * self._reducer_flops(inst)
    if op == "select-and-scatter":
      source = inst.operand_shapes[1].num_elements if len(inst.operand_shapes) > 1 else 0
      window = math.prod(w["size"] for w in _window(inst))
      return source * window
    if op == "scatter":
      updates = inst.operand_shapes[-1].num_elements if inst.operand_shapes else 0
      return updates * self._reducer_flops(inst)
    if op in ("all-reduce", "all-reduce-start", "reduce-scatter"):
      return out.num_elements * self._reducer_flops(inst)
    if op == "sort":
      n = inst.operand_shapes[0].num_elements if inst.operand_shapes else 0
      return n * math.log2(n) if n > 1 else 0.0
    if op == "fusion":
      called = inst.called
      return self.computation(called[0]).flops if called else 0.0
    if op == "custom-call":
      target = inst.custom_call_target
      if "gemm" in target or "matmul" in target:
        return _gemm_flops(inst)
      if "conv" in target:
        return conv_flops(inst)
      return sum(self.computation(c).flops for c in inst.called)
    if op == "while":
      body = sum(self.computation(c).flops for c in inst.called)
      return body * (1 if self.count_loops_once else (self.trip_count(inst) or 1))
    if op == "conditional":
      return max((self.computation(c).flops for c in inst.called), default=0.0)
    if op in ("call", "async-start"):
      return sum(self.computation(c).flops for c in inst.called)
    return 0.0

  def trip_count(self, inst: hlo.Instruction) -> Optional[int]:
    return hlo.trip_count(inst, self.module)

  def bytes(self, inst: hlo.Instruction) -> float:
    """Bytes read and written by one execution of `inst` at its boundary."""
    if inst.opcode in FREE:
      return 0.0
    if inst.opcode in ("while", "conditional", "call"):
      body = sum(self.computation(c).bytes for c in inst.called)
      if inst.opcode == "while" and not self.count_loops_once:
        body *= self.trip_count(inst) or 1
      return body
    return sum(s.bytes for s in inst.operand_shapes) + inst.shape.bytes

  def transcendentals(self, inst: hlo.Instruction) -> float:
    if inst.opcode in TRANSCENDENTAL:
      return float(inst.shape.arrays()[0].num_elements)
    if inst.opcode in ("fusion", "call", "conditional", "while", "custom-call", "async-start"):
      total = sum(self.computation(c).transcendentals for c in inst.called)
      if inst.opcode == "while" and not self.count_loops_once:
        total *= self.trip_count(inst) or 1
      return total
    return 0.0

  @functools.lru_cache(maxsize=None)
  def instruction(self, name: str) -> Cost:
    inst = self.module.instructions[name]
    return Cost(self.flops(inst), self.bytes(inst), self.transcendentals(inst))

  def total(self) -> Cost:
    return self.computation(self.module.entry)
