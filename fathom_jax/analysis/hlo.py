"""A parser for XLA's HLO text: optimised (`compiled.as_text()`), pre-optimisation
(`lowered.as_text(dialect="hlo")`), and the same text from any backend (CPU, GPU, TPU).

It keeps what the analysis needs: every computation and instruction (name, opcode, shape, operands,
fusion kind, called computations, custom-call target, backend config, raw attributes) and the
metadata (op_name, source file and line, through the FileNames/StackFrames tables when present).
"""

import dataclasses
import json
import math
import re
from typing import Optional

from fathom_jax.errors import DataError

# Bytes per element of each XLA primitive type (sub-byte types as fractions).
DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
    "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8,
    "c128": 16, "token": 0, "opaque": 0, "f4e2m1fn": 0.5, "f8e8m0fnu": 1,
}

_COMMENT = re.compile(r"/\*.*?\*/")
_ARRAY_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")
_OPCODE = re.compile(r"([a-z][a-z0-9\-_]*)\(")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*(\(.*\)\s*->\s*.*)?\{\s*$")
_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


@dataclasses.dataclass(frozen=True)
class Shape:
  """An array shape (dtype, dims) or a tuple of shapes (dtype 'tuple', elements)."""
  dtype: str
  dims: tuple[int, ...] = ()
  elements: tuple["Shape", ...] = ()

  @property
  def is_tuple(self) -> bool:
    return self.dtype == "tuple"

  @property
  def num_elements(self) -> int:
    """Elements of an array; of a tuple, the sum over its arrays."""
    if self.is_tuple:
      return sum(e.num_elements for e in self.elements)
    return math.prod(self.dims)

  @property
  def bytes(self) -> float:
    if self.is_tuple:
      return sum(e.bytes for e in self.elements)
    return self.num_elements * DTYPE_BYTES.get(self.dtype, 4)

  def arrays(self) -> list["Shape"]:
    return [a for e in self.elements for a in e.arrays()] if self.is_tuple else [self]

  def __str__(self) -> str:
    if self.is_tuple:
      return "(" + ", ".join(str(e) for e in self.elements) + ")"
    return f"{self.dtype}[{','.join(map(str, self.dims))}]"


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  shape: Shape
  operands: list[str]
  attrs: dict[str, str]  # raw attribute text, key -> value as printed
  computation: str = ""
  is_root: bool = False
  op_name: str = ""
  source_file: str = ""
  source_line: int = 0
  operand_shapes: list[Shape] = dataclasses.field(default_factory=list)  # filled by the module

  @property
  def fusion_kind(self) -> str:
    return self.attrs.get("kind", "")

  @property
  def custom_call_target(self) -> str:
    return _unquote(self.attrs.get("custom_call_target", ""))

  @property
  def called(self) -> list[str]:
    """Names of the computations this instruction calls (fusion body, loop body, reducer...)."""
    names = []
    for key in ("calls", "to_apply", "condition", "body", "true_computation",
                "false_computation", "branch_computations", "called_computations",
                "async_execution_thread_computations"):
      if key in self.attrs:
        names += [n.lstrip("%") for n in re.findall(r"%?[\w.\-]+", self.attrs[key].strip("{}"))]
    return names

  @property
  def backend_config(self) -> dict:
    """The backend config as a dict; {} when absent or not JSON."""
    text = self.attrs.get("backend_config", "")
    if text.startswith('"'):
      text = _unquote(text)
    try:
      value = json.loads(text) if text else {}
    except ValueError:
      return {}
    return value if isinstance(value, dict) else {}

  @property
  def source(self) -> str:
    return f"{self.source_file}:{self.source_line}" if self.source_file else ""


@dataclasses.dataclass
class Computation:
  name: str
  instructions: list[Instruction]
  is_entry: bool = False

  @property
  def root(self) -> Optional[Instruction]:
    for inst in self.instructions:
      if inst.is_root:
        return inst
    return self.instructions[-1] if self.instructions else None


@dataclasses.dataclass
class Module:
  name: str
  computations: dict[str, Computation]
  entry: str
  attrs: str = ""

  def __post_init__(self):
    self.instructions: dict[str, Instruction] = {}
    for comp in self.computations.values():
      for inst in comp.instructions:
        self.instructions.setdefault(inst.name, inst)
    for comp in self.computations.values():
      local = {i.name: i for i in comp.instructions}
      for inst in comp.instructions:
        inst.operand_shapes = [local[o].shape if o in local else self.instructions[o].shape
                               for o in inst.operands
                               if o in local or o in self.instructions]

  @property
  def entry_computation(self) -> Computation:
    return self.computations[self.entry]


# ---------------------------------------------------------------------------------------------
# Text scanning helpers.


def _unquote(text: str) -> str:
  if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
    return re.sub(r"\\(.)", r"\1", text[1:-1])
  return text


def _split_top(text: str, sep: str = ",") -> list[str]:
  """Splits at `sep` outside brackets and quotes."""
  parts, depth, start, i, n = [], 0, 0, 0, len(text)
  while i < n:
    c = text[i]
    if c == '"':
      i += 1
      while i < n and text[i] != '"':
        i += 2 if text[i] == "\\" else 1
    elif c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    elif c == sep and depth == 0:
      parts.append(text[start:i])
      start = i + 1
    i += 1
  parts.append(text[start:])
  return [p.strip() for p in parts if p.strip()]


def _matching(text: str, start: int) -> int:
  """Index of the bracket closing the one at `start` (quotes respected)."""
  pairs = {"(": ")", "[": "]", "{": "}"}
  stack, i, n = [], start, len(text)
  while i < n:
    c = text[i]
    if c == '"':
      i += 1
      while i < n and text[i] != '"':
        i += 2 if text[i] == "\\" else 1
    elif c in pairs:
      stack.append(pairs[c])
    elif stack and c == stack[-1]:
      stack.pop()
      if not stack:
        return i
    i += 1
  raise ValueError("unbalanced brackets")


def parse_shape(text: str) -> Shape:
  """'f32[2,3]{1,0}', 'pred[]', '(s32[], f32[4]{0})', 'f32[<=8]' -> Shape."""
  text = _COMMENT.sub("", text).strip()
  if text.startswith("("):
    inner = text[1:_matching(text, 0)]
    return Shape("tuple", (), tuple(parse_shape(p) for p in _split_top(inner)))
  m = _ARRAY_SHAPE.match(text)
  if m:
    dims = tuple(int(d) for d in re.findall(r"\d+", m.group(2)))
    return Shape(m.group(1), dims)
  if text in ("token[]", "token"):
    return Shape("token")
  raise ValueError(f"not a shape: {text[:40]!r}")


def _operand_names(text: str) -> list[str]:
  names = []
  for part in _split_top(text):
    # Older printers put the operand's shape before its name: 'f32[2]{0} %x'.
    token = part.split()[-1] if part.split() else ""
    if token:
      names.append(token.lstrip("%"))
  return names


def parse_instruction(line: str, computation: str = "") -> Instruction:
  line = _COMMENT.sub("", line).strip()
  is_root = line.startswith("ROOT ")
  if is_root:
    line = line[5:]
  name, eq, rest = line.partition(" = ")
  if not eq or not name or " " in name.strip():
    raise ValueError("no 'name = ...'")
  rest = rest.strip()
  if rest.startswith("("):
    end = _matching(rest, 0)
    shape_text, rest = rest[:end + 1], rest[end + 1:].strip()
  else:
    shape_text, _, rest = rest.partition(" ")
  shape = parse_shape(shape_text)
  m = _OPCODE.match(rest)
  if not m:
    raise ValueError("no opcode")
  opcode = m.group(1)
  close = _matching(rest, m.end() - 1)
  operand_text = rest[m.end():close]
  attrs = {}
  for part in _split_top(rest[close + 1:]):
    key, eq, value = part.partition("=")
    attrs[key.strip()] = value.strip() if eq else ""
  operands = [] if opcode in ("constant", "parameter", "iota") else _operand_names(operand_text)
  if opcode == "parameter":
    attrs.setdefault("parameter_number", operand_text.strip())
  elif opcode == "constant":
    attrs.setdefault("literal", operand_text.strip())
  inst = Instruction(name.strip().lstrip("%"), opcode, shape, operands, attrs, computation,
                     is_root)
  if "metadata" in attrs:
    meta = attrs["metadata"]
    op = re.search(r'op_name="((?:[^"\\]|\\.)*)"', meta)
    inst.op_name = _unquote(f'"{op.group(1)}"') if op else ""
    src = re.search(r'source_file="((?:[^"\\]|\\.)*)"', meta)
    if src:
      inst.source_file = src.group(1)
      line_m = re.search(r"source_line=(\d+)", meta)
      inst.source_line = int(line_m.group(1)) if line_m else 0
    frame = re.search(r"stack_frame_id=(\d+)", meta)
    if frame:
      attrs["stack_frame_id"] = frame.group(1)
  return inst


def _parse_table_row(line: str) -> tuple[int, object]:
  ident, _, rest = line.strip().partition(" ")
  rest = rest.strip()
  if rest.startswith('"'):
    return int(ident), _unquote(rest)
  fields = dict(re.findall(r"(\w+)=(\d+)", rest))
  return int(ident), {k: int(v) for k, v in fields.items()}


def _resolve_frames(tables: dict, instructions: list[Instruction]) -> None:
  """Fills source_file/source_line from stack_frame_id through the module's tables."""
  files, locations, frames = (tables.get("FileNames", {}), tables.get("FileLocations", {}),
                              tables.get("StackFrames", {}))
  for inst in instructions:
    # A cut line can leave the id with the metadata's closing brace: read its digits only.
    digits = re.match(r"\d+", str(inst.attrs.get("stack_frame_id", "")))
    frame = frames.get(int(digits.group(0))) if digits else None
    if not isinstance(frame, dict):  # none, or a damaged table row
      continue
    loc = locations.get(frame.get("file_location_id", 0))
    if isinstance(loc, dict) and not inst.source_file:
      name = files.get(loc.get("file_name_id", 0), "")
      inst.source_file = name if isinstance(name, str) else ""
      inst.source_line = loc.get("line", 0)


def parse_module(text: str, path: str = "<text>") -> Module:
  """Parses one HLO module; raises DataError naming `path` (and the line) if it is not HLO."""
  lines = text.splitlines()
  name, header, tables, computations = "", "", {}, {}
  entry, current, table = "", None, None
  for lineno, raw in enumerate(lines, 1):
    line = raw.strip()
    if not line or line.startswith("//"):
      table = None if not line else table
      continue
    if line.startswith("HloModule "):
      name = line[len("HloModule "):].split(",")[0].strip()
      header = line
      continue
    if current is None:
      if line in _TABLES:
        table = tables.setdefault(line, {})
        continue
      if table is not None and re.match(r"^\d+\s", line):
        try:
          key, value = _parse_table_row(line)
        except ValueError:
          raise DataError(f"{path}:{lineno}: malformed {line.split()[0]} table row") from None
        table[key] = value
        continue
      m = _COMPUTATION.match(line)
      if not m:
        raise DataError(f"{path}:{lineno}: not HLO text (expected a computation, got "
                        f"{line[:60]!r})")
      current = Computation(m.group(2), [], bool(m.group(1)))
      if current.is_entry:
        entry = current.name
      continue
    if line == "}":
      computations[current.name] = current
      current = None
      continue
    try:
      current.instructions.append(parse_instruction(line, current.name))
    except ValueError as e:
      raise DataError(f"{path}:{lineno}: not an HLO instruction ({e}): {line[:60]!r}") from None
  if current is not None:
    raise DataError(f"{path}: HLO text ends inside computation {current.name!r} (truncated?)")
  if not computations:
    raise DataError(f"{path}: not HLO text (no HloModule header or computations)")
  if not entry:
    entry = list(computations)[-1]  # XLA prints the entry computation last
    computations[entry].is_entry = True
  all_instructions = [i for c in computations.values() for i in c.instructions]
  _resolve_frames(tables, all_instructions)
  return Module(name or entry, computations, entry, header)


def parse_file(path: str) -> Module:
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError:
    raise DataError(f"{path}: not HLO text (not UTF-8)") from None
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  return parse_module(text, path)


def trip_count(inst: Instruction, module: Module) -> Optional[int]:
  """Iterations of a while loop: XLA's known_trip_count, else the constant its condition compares
  the induction variable against (loops counting up from 0 by 1); None when unknown."""
  config = inst.backend_config
  known = config.get("known_trip_count", {}).get("n")
  if known is not None:
    return int(known)
  cond = module.computations.get(inst.attrs.get("condition", "").lstrip("%"))
  if cond is None or cond.root is None:
    return None
  compare, caller = cond.root, None
  if compare.opcode == "fusion" and compare.called:  # XLA wraps the compare in a fusion
    caller, compare = compare, module.computations[compare.called[0]].root
  if compare is None or compare.opcode != "compare" or compare.attrs.get("direction") != "LT":
    return None
  bound = module.instructions.get(compare.operands[-1])
  if bound is not None and bound.opcode == "parameter" and caller is not None:
    index = int(bound.attrs.get("parameter_number", "-1") or -1)
    if 0 <= index < len(caller.operands):
      bound = module.instructions.get(caller.operands[index])
  return _constant_value(module, bound.name) if bound is not None else None


def _constant_value(module: Module, name: str) -> Optional[int]:
  inst = module.instructions.get(name)
  if inst is None or inst.opcode != "constant":
    return None
  m = re.fullmatch(r"-?\d+", inst.attrs.get("literal", ""))
  return int(m.group(0)) if m else None
