"""The two taxonomies of the breakdown.

1. XLA categories, named as XLA's `HloInstruction::ToCategory` (and so xprof) names them ('loop
   fusion', 'custom fusion', 'data formatting', 'non-fusion elementwise', 'convolution', 'dot',
   'reduce', 'all-reduce', ...), refined by what a fusion holds: a fusion around a convolution is a
   'convolution fusion', around a dot a 'dot fusion'; a fusion that wraps a single operation (XLA's
   'wrapped_*' fusions) takes that operation's category; a library call (cuBLAS GEMM, cuDNN
   convolution) is 'dot' or 'convolution'.
2. Fathom's 2016 classes plus 'communication' and 'other'. Each HLO instruction has one class.
   Work whose HLO does not say what it is is recognised by metadata first: an op_name inside one
   of the class scopes of `fathom_jax.scopes` (the convention any program can use to state that
   an update is optimization, a draw random sampling, matmuls a convolution, a convolution a
   matrix product; the innermost wins), and random sampling also by a random-bits primitive
   (threefry2x32, random_bits, rng_bit_generator) or one of jax.random's samplers (jit(_uniform),
   jit(_bernoulli), jit(_normal), ...: dropout masks included) in the op_name. A parameter
   update written with optax and no scope (any flax/optax training loop) is found by its source:
   an op whose source file lies in the optax package, its losses apart, is optimization.

A fusion's time is split among the classes of its body by the cost rule (`COST_RULE`).
"""

import re
from typing import Optional

from fathom_jax import scopes
from fathom_jax.analysis import cost, hlo

ELEMENTWISE = "elementwise arithmetic"
MATRIX = "matrix operations"
REDUCTION = "reduction & expansion"
CONVOLUTION = "convolution"
RANDOM = "random sampling"
OPTIMIZATION = "optimization"
DATA_MOVEMENT = "data movement"
COMMUNICATION = "communication"
OTHER = "other"
CLASSES = (ELEMENTWISE, MATRIX, REDUCTION, CONVOLUTION, RANDOM, OPTIMIZATION, DATA_MOVEMENT,
           COMMUNICATION, OTHER)

COST_RULE = (
    "A fusion's time is split among the Fathom classes of the instructions in its body in "
    "proportion to each instruction's estimated work: FLOPs plus transcendental evaluations for "
    "arithmetic (2 per multiply-add for dots and convolutions, 1 per element for elementwise "
    "ops, 1 per reduced element for reductions); for data movement that copies elements "
    "(transpose, copy, slice, concatenate, pad, gather, scatter, select, dynamic slices, "
    "reverse), 1 per output element; nothing for broadcast, reshape, bitcast, iota, constants "
    "and parameters, which a fusion turns into index arithmetic. A fusion whose body has no work "
    "goes wholly to the class of its root instruction. Loop bodies count once per iteration.")

# The class a scope of fathom_jax.scopes states.
SCOPE_CLASSES = {scopes.OPTIMIZATION: OPTIMIZATION, scopes.RANDOM: RANDOM,
                 scopes.CONVOLUTION: CONVOLUTION, scopes.MATRIX: MATRIX}
# The random-bits primitives and jax.random's own jitted samplers, as op_names show them
# (dropout's mask comes from jit(_bernoulli)/jit(_uniform), in no scope of ours).
# An op traced inside optax (its update rules, not its loss functions).
OPTAX_UPDATE_SOURCE = re.compile(r"[/\\]optax[/\\](?!losses[/\\]|_src[/\\]loss\.py)")
RANDOM_OP_NAMES = re.compile(
    r"threefry|random_bits|rng_bit_generator|rng-bit-generator|"
    r"random_split|random_fold_in|random_seed|jit\(_(uniform|normal|normal_real|bernoulli|"
    r"randint|gamma|truncated_normal|categorical|gumbel|exponential|beta|dirichlet|poisson|"
    r"permutation|shuffle|choice)\)")

# Data movement that copies elements, so it has work of its own inside a fusion.
_COPYING = frozenset({"transpose", "copy", "slice", "dynamic-slice", "dynamic-update-slice",
                      "concatenate", "pad", "gather", "scatter", "select", "reverse",
                      "bitcast-convert"})
_MATRIX_OPS = frozenset({"dot", "cholesky", "triangular-solve"})
_REDUCTIONS = frozenset({"reduce", "reduce-window", "select-and-scatter", "scatter",
                         "all-reduce-scatter"})
_RANDOM_OPS = frozenset({"rng", "rng-bit-generator", "rng-get-and-update-state"})
_DATA_FORMATTING = frozenset({"transpose", "copy", "copy-start", "copy-done", "bitcast",
                              "reshape", "dynamic-reshape"})
_FUSION_KINDS = {"kLoop": "loop fusion", "kInput": "input fusion", "kOutput": "output fusion",
                 "kCustom": "custom fusion"}


# Custom calls of the TPU compiler that move data or compute nothing: a concatenation, packed
# gather and scatter indices, an assertion of their bounds, a reserved buffer.
_TPU_DATA_MOVEMENT_CALLS = ("ConcatBitcast", "GatherScatterIndicesBitpacked",
                            "AssumeGatherIndicesInBound", "AllocateBuffer")
# Async pairs whose start does the work (the done only waits): their category is the op's.
_ASYNC_PAIRS = {"slice-start": "slice", "slice-done": "slice"}


def is_matrix_product(inst: hlo.Instruction) -> bool:
  """A convolution with no spatial dimension: how the TPU compiler writes a dot."""
  if inst.opcode != "convolution":
    return False
  lhs = inst.attrs.get("dim_labels", "").split("_", 1)[0]
  return bool(lhs) and not any(c.isdigit() for c in lhs)


def library_kind(inst: hlo.Instruction) -> Optional[str]:
  """'dot' or 'convolution' for a library custom call (cuBLAS, cuDNN, oneDNN...), else None."""
  if inst.opcode != "custom-call":
    return None
  target = inst.custom_call_target.lower()
  if "conv" in target:
    return "convolution"
  if any(k in target for k in ("gemm", "matmul", "cublas", "dot")):
    return "dot"
  return None


def xla_category(inst: hlo.Instruction) -> str:
  """XLA's own category (HloInstruction::ToCategory)."""
  if inst.opcode in _DATA_FORMATTING:
    return "data formatting"
  if is_matrix_product(inst):
    return "dot"
  if inst.opcode in _ASYNC_PAIRS:
    return _ASYNC_PAIRS[inst.opcode]
  if inst.opcode in cost.ELEMENTWISE:
    return "non-fusion elementwise"
  if inst.opcode == "fusion":
    return _FUSION_KINDS.get(inst.fusion_kind, "fusion")
  return inst.opcode


def _body_work(module: hlo.Module, computation: str) -> list[hlo.Instruction]:
  """The instructions with work in a fusion body, nested fusions expanded."""
  out = []
  comp = module.computations.get(computation)
  for inst in comp.instructions if comp else []:
    if inst.opcode == "fusion" or inst.opcode == "call":
      for called in inst.called:
        out += _body_work(module, called)
    elif inst.opcode not in cost.FREE and inst.opcode not in ("broadcast", "reshape", "iota"):
      out.append(inst)
  return out


def body_work(module: hlo.Module, fusion: hlo.Instruction) -> list[hlo.Instruction]:
  """The instructions with work in the body of `fusion`, nested fusions expanded."""
  return [i for c in fusion.called for i in _body_work(module, c)]


def refined_category(inst: hlo.Instruction, module: hlo.Module) -> str:
  """XLA's category, refined by what a fusion's body holds."""
  library = library_kind(inst)
  if library:
    return library
  if inst.opcode != "fusion":
    return xla_category(inst)
  body = body_work(module, inst)
  if any((i.opcode == "convolution" and not is_matrix_product(i))
         or library_kind(i) == "convolution" for i in body):
    return "convolution fusion"
  if any(i.opcode == "dot" or is_matrix_product(i) or library_kind(i) == "dot" for i in body):
    return "dot fusion"
  if len(body) == 1:
    return xla_category(body[0])  # a wrapped single op counts as unfused
  if not body:  # only broadcasts, reshapes, iotas: the root says what it is
    comp = module.computations.get(inst.called[0]) if inst.called else None
    if comp is not None and comp.root is not None:
      return xla_category(comp.root)
  return xla_category(inst)


def fathom_class(inst: hlo.Instruction) -> str:
  """The Fathom class of one (non-fusion) instruction."""
  op = inst.opcode
  if op in cost.COLLECTIVES:
    return COMMUNICATION
  scope = scopes.innermost(inst.op_name)
  if scope is not None:
    return SCOPE_CLASSES[scope]
  if OPTAX_UPDATE_SOURCE.search(inst.source_file or ""):
    return OPTIMIZATION
  if op in _RANDOM_OPS or RANDOM_OP_NAMES.search(inst.op_name or ""):
    return RANDOM
  library = library_kind(inst)
  if op in _MATRIX_OPS or library == "dot" or is_matrix_product(inst):
    return MATRIX
  if op == "convolution" or library == "convolution":
    return CONVOLUTION
  if op in _REDUCTIONS:
    return REDUCTION
  if op == "select":
    return DATA_MOVEMENT  # Fathom's 2016 table files Select under data movement
  if op in cost.ELEMENTWISE:
    return ELEMENTWISE
  if op in cost.DATA_MOVEMENT or op in ("infeed", "outfeed") or op in _ASYNC_PAIRS:
    return DATA_MOVEMENT
  if op == "custom-call" and inst.custom_call_target in _TPU_DATA_MOVEMENT_CALLS:
    return DATA_MOVEMENT
  return OTHER


def optimization_evidence(inst: hlo.Instruction) -> Optional[str]:
  """How an instruction was found to be optimization: 'scope' or 'optax source'; None if not."""
  if scopes.innermost(inst.op_name) == scopes.OPTIMIZATION:
    return "scope"
  if scopes.innermost(inst.op_name) is None and OPTAX_UPDATE_SOURCE.search(inst.source_file or ""):
    return "optax source"
  return None


def work(inst: hlo.Instruction, model: cost.CostModel) -> float:
  """An instruction's weight under COST_RULE."""
  if inst.opcode in cost.FREE or inst.opcode in ("broadcast", "reshape", "iota"):
    return 0.0
  c = model.instruction(inst.name)
  if inst.opcode in _COPYING and not c.work:
    return float(inst.shape.arrays()[0].num_elements) if inst.shape.arrays() else 0.0
  return c.work


def class_shares(inst: hlo.Instruction, module: hlo.Module,
                 model: cost.CostModel) -> dict[str, float]:
  """Fraction of `inst`'s time that goes to each Fathom class (sums to 1)."""
  if inst.opcode != "fusion":
    return {fathom_class(inst): 1.0}
  weights: dict[str, float] = {}
  for body_inst in body_work(module, inst):
    w = work(body_inst, model)
    if w > 0:
      cls = fathom_class(body_inst)
      weights[cls] = weights.get(cls, 0.0) + w
  total = sum(weights.values())
  if total <= 0:
    comp = module.computations.get(inst.called[0]) if inst.called else None
    root = comp.root if comp else None
    # The fusion's own metadata may still mark it (an optimizer or sampling scope).
    return {fathom_class(root) if root is not None else fathom_class(inst): 1.0}
  return {cls: w / total for cls, w in weights.items()}
