"""Model components: where in the model an op's time went, from its `op_name` metadata.

JAX names every traced op by the scopes it ran in: the jitted function, transformations, Flax
module paths and `jax.named_scope`s, then the primitive, e.g.

    jit(train_step)/transpose(jvp(ResNet))/Bottleneck_3/Conv_1/conv_general_dilated

Read from the left, a component is that path with JAX's own machinery taken out: the program's
`jit(...)`, control flow (`while`, `body`, `cond`, `closed_call`, `branch_N_fun`), jnp's private
helpers (`jit(_take)`), and unnamed or einsum-labelled transformations (`vmap()`,
`vmap(BTNH,BSNH->BNTS)`); a transformation of a named thing keeps the name (`jvp(ResNet)` is
`ResNet`). The pass is read from the same wrappers: backward under `transpose(...)`, forward under
`jvp(...)`; ops under neither (a program that differentiates nothing, a training step's optimizer
update) have none. The last token, the
primitive, is not part of the component. Depth keeps the first N tokens: model (1), block (2),
layer (3), or all of them. A component's kind is its whole path with instance numbers
collapsed (`block_0`, `block_1` are `block_*`).

A fusion's time is split among the components of the instructions in its body by the cost rule
the classes use (`categories.COST_RULE`).
"""

import re
from typing import Optional

from fathom_jax.analysis import categories, cost, hlo

DEPTHS = {"model": 1, "block": 2, "layer": 3, "full": None}
TOP_LEVEL = "(top level)"  # ops named by no scope, module or function below the program
FORWARD, BACKWARD, NO_PASS = "forward", "backward", ""

_CONTROL = re.compile(r"^(while|body|cond|closed_call|core_call|remat|checkpoint|"
                      r"rematted_computation|branch_\d+_fun|scan|pjit|jit)$")
_WRAPPER = re.compile(r"^([A-Za-z_]\w*)\((.*)\)$")
_NAME = re.compile(r"^[A-Za-z][\w.\-\[\]'<>]*$")


def depth_of(value: str) -> Optional[int]:
  """A depth option: 'model', 'block', 'layer', 'full' or a positive integer; None is full."""
  if value in DEPTHS:
    return DEPTHS[value]
  if value.isdigit() and int(value) > 0:
    return int(value)
  raise ValueError(f"component depth must be one of {', '.join(DEPTHS)} or a positive integer, "
                   f"got {value!r}")


def _split(op_name: str) -> list[str]:
  """Tokens between top-level slashes: a slash inside parentheses stays in its token."""
  tokens, level, start = [], 0, 0
  for i, ch in enumerate(op_name):
    if ch == "(":
      level += 1
    elif ch == ")":
      level = max(level - 1, 0)
    elif ch == "/" and level == 0:
      tokens.append(op_name[start:i])
      start = i + 1
  tokens.append(op_name[start:])
  return [t for t in tokens if t]


def _unwrap(token: str) -> tuple[Optional[str], set[str]]:
  """(the named thing a token stands for or None, the transformations around it)."""
  seen = set()
  while True:
    m = _WRAPPER.match(token)
    if not m:
      break
    seen.add(m.group(1))
    token = m.group(2)
  if not token or token.startswith("_") or not _NAME.match(token) or _CONTROL.match(token):
    return None, seen
  return token, seen


def parse(op_name: str) -> tuple[tuple[str, ...], str]:
  """(component tokens, pass) of one op_name; XLA joins the names of merged ops with ';', and
  the first stands for them."""
  tokens = _split(op_name.split(";")[0].strip())
  while tokens and _WRAPPER.match(tokens[0]) and _WRAPPER.match(tokens[0]).group(1) in (
      "jit", "pjit"):
    tokens = tokens[1:]  # the program itself
  tokens = tokens[:-1]  # the primitive
  path, transformations = [], set()
  for token in tokens:
    name, seen = _unwrap(token)
    transformations |= seen
    if name is not None:
      path.append(name)
  if "transpose" in transformations:
    pass_ = BACKWARD
  elif "jvp" in transformations or "linearize" in transformations:
    pass_ = FORWARD
  else:
    pass_ = NO_PASS
  return tuple(path), pass_


def name(path: tuple[str, ...], depth: Optional[int]) -> str:
  """The component at `depth` (None: the whole path)."""
  kept = path if depth is None else path[:depth]
  return "/".join(kept) if kept else TOP_LEVEL


_INSTANCE = re.compile(r"_\d+$")


def kind(path: tuple[str, ...]) -> str:
  """The whole path with instance numbers collapsed (`GPT/block_*/attention`): the repeated
  blocks of a model summed as one kind of component."""
  return name(tuple(_INSTANCE.sub("_*", token) for token in path), None)


def shares(inst: hlo.Instruction, module: hlo.Module, model: cost.CostModel
           ) -> dict[tuple[tuple[str, ...], str, str], float]:
  """Fraction of `inst`'s time for each (component path, pass, Fathom class); sums to 1."""
  if inst.opcode != "fusion":
    (path, pass_), classes = parse(inst.op_name), categories.class_shares(inst, module, model)
    return {(path, pass_, cls): frac for cls, frac in classes.items()}
  weights: dict = {}
  for body_inst in categories.body_work(module, inst):
    w = categories.work(body_inst, model)
    if w > 0:
      key = (*parse(body_inst.op_name), categories.fathom_class(body_inst))
      weights[key] = weights.get(key, 0.0) + w
  total = sum(weights.values())
  if total <= 0:  # no counted work in the body: the fusion's own names and class
    comp = module.computations.get(inst.called[0]) if inst.called else None
    named = comp.root if comp is not None and comp.root is not None and comp.root.op_name \
        else inst
    (path, pass_), classes = parse(named.op_name), categories.class_shares(inst, module, model)
    return {(path, pass_, cls): frac for cls, frac in classes.items()}
  return {key: w / total for key, w in weights.items()}
