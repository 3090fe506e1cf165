"""Programs that run once (parameter initialisation, synthetic data), compiled for that.

On CPU, most of the compile time of a model's initialisation is LLVM optimising the random-bit
generator unrolled for every parameter; for a program that runs once that buys nothing, so it is
compiled at XLA's lowest backend optimisation level. The values are the same draws to the last
bit or two of float32 rounding, and the same from run to run. Elsewhere programs compile as JAX
compiles them.
"""

import math
from typing import Callable, Optional

import jax
import numpy as np

ONE_SHOT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


def compile_once(fn: Callable, *args, platform: Optional[str] = None, out_shardings=None):
  """fn jitted and compiled for `args` as a one-shot program for `platform` (default: JAX's
  default backend): the executable, to call with arguments like `args`. Static arguments are
  bound into `fn` (functools.partial) by the caller."""
  platform = platform or jax.default_backend()
  jitted = jax.jit(fn) if out_shardings is None else jax.jit(fn, out_shardings=out_shardings)
  options = ONE_SHOT_COMPILER_OPTIONS.get(platform)
  return jitted.lower(*args).compile(**({"compiler_options": options} if options else {}))


def run_once(fn: Callable, *args, platform: Optional[str] = None, out_shardings=None):
  """fn(*args), compiled as a one-shot program (compile_once) and run."""
  return compile_once(fn, *args, platform=platform, out_shardings=out_shardings)(*args)


def combined(*options: dict) -> dict:
  """XLA compile options merged; lists of disabled passes are joined, not overwritten."""
  merged: dict = {}
  for option in options:
    for key, value in option.items():
      if key == "xla_disable_hlo_passes" and merged.get(key):
        value = ",".join(dict.fromkeys(merged[key].split(",") + value.split(",")))
      merged[key] = value
  return merged


# How the step executes: as XLA compiles it; compiled with every fusion pass off, so each op is
# its own kernel; or dispatched op by op from Python, loops unrolled (the 2016 graph executors'
# view of the program).
EXECUTIONS = ("compiled", "unfused", "eager")
# Pass names of the fusion passes of XLA's CPU and GPU pipelines; unknown names are ignored.
FUSION_PASSES = ("fusion", "priority-fusion", "multi_output_fusion", "horizontal-loop-fusion",
                 "fusion-merger", "sibling-multi-output-fusion", "cpu-instruction-fusion")


_UNKNOWN_OPTION_ERRORS = ("No such compile option", "While setting option")


def compile_step(lowered, execution: str, model_options=None) -> tuple:
  """`lowered` compiled with `compile_options`, and None; or, where this XLA rejects one of the
  model's own options (they are speed choices, not semantics), compiled without them and a
  record of what was dropped and why."""
  try:
    return lowered.compile(**compile_options(execution, model_options)), None
  except jax.errors.JaxRuntimeError as e:
    message = str(e).strip()
    if not model_options or not any(m in message for m in _UNKNOWN_OPTION_ERRORS):
      raise
  compiled = lowered.compile(**compile_options(execution))
  return compiled, {"options": {k: str(v) for k, v in model_options.items()},
                    "error": message.splitlines()[0]}


def compile_options(execution: str, model_options=None) -> dict:
  """Keyword arguments of `Lowered.compile`: the model's own XLA options for this platform and
  mode, and for unfused runs the fusion passes turned off."""
  options = dict(model_options or {})
  if execution == "unfused":
    options = combined(options, {"xla_disable_hlo_passes": ",".join(FUSION_PASSES)})
  return {"compiler_options": options} if options else {}


def eager_step(step: Callable) -> Callable:
  """`step` dispatched primitive by primitive: jit disabled inside it, loops run in Python."""
  def run(*args):
    with jax.disable_jit():
      return step(*args)
  return run


def cost_analysis(compiled) -> dict:
  """XLA's cost analysis of a compiled program ('flops', 'bytes accessed', ...), {} where the
  backend has none."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # not every backend implements it
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return {k: float(v) for k, v in (cost or {}).items()}


def memory_analysis(compiled, names: Optional[tuple[str, ...]] = None) -> dict:
  """The compiler's memory figures of a compiled program (every '*_in_bytes', or `names`), {}
  where the backend has none."""
  try:
    stats = compiled.memory_analysis()
  except Exception:
    return {}
  if stats is None:
    return {}
  names = names or tuple(n for n in dir(stats) if n.endswith("_in_bytes"))
  return {n: int(getattr(stats, n)) for n in names
          if isinstance(getattr(stats, n, None), int)}



def bytes_needed(memory: dict) -> int:
  """What a compiled program needs on its device, from its memory figures (memory_analysis):
  arguments, outputs and temporaries, less the outputs that reuse their arguments' buffers."""
  return (memory.get("argument_size_in_bytes", 0) + memory.get("output_size_in_bytes", 0)
          + memory.get("temp_size_in_bytes", 0) - memory.get("alias_size_in_bytes", 0))


# Primitives whose results XLA keeps in a buffer of their own wherever they occur: a matrix
# product's or a convolution's output, and a loop's carried and stacked values.
_MATERIALISED = ("dot_general", "conv_general_dilated", "scan", "while")


def _value_bytes(aval) -> int:
  shape, dtype = getattr(aval, "shape", None), getattr(aval, "dtype", None)
  if shape is None or dtype is None:
    return 0
  try:
    itemsize = np.dtype(dtype).itemsize
  except TypeError:  # an extended dtype (a PRNG key): its data, not its Python object
    itemsize = getattr(dtype, "itemsize", 8)
  return math.prod(shape) * itemsize


def _sub_jaxprs(params: dict):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      inner = getattr(item, "jaxpr", item)  # a ClosedJaxpr holds its Jaxpr
      if hasattr(inner, "eqns"):
        yield inner


def largest_materialised_bytes(jaxpr) -> int:
  """The largest value among the results of the ops XLA always materialises (_MATERIALISED),
  anywhere in `jaxpr` (a Jaxpr or ClosedJaxpr), loop and function bodies included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  largest = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in _MATERIALISED:
      largest = max([largest] + [_value_bytes(v.aval) for v in eqn.outvars])
    for inner in _sub_jaxprs(eqn.params):
      largest = max(largest, largest_materialised_bytes(inner))
  return largest


def _used_inputs(jaxpr) -> list:
  """For each input of `jaxpr`, whether any op or output reads it: jit drops the others from
  the compiled program, so they take no memory."""
  read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
  read |= {id(v) for v in jaxpr.outvars}
  return [id(v) in read for v in jaxpr.invars]


def memory_floor_bytes(jaxpr, args: tuple, sharded_argnums: tuple, num_devices: int = 1) -> int:
  """A lower bound, from shapes alone, of the memory one device needs to run the traced `jaxpr`
  of a function of `args`: the arguments it reads (those in `sharded_argnums` split across
  `num_devices`, the others whole on every device) and, live beside them, the largest value it
  materialises, taken as split too. Fusion can keep other values out of memory, so nothing else
  counts; the compiler's own figure is never lower. It takes a trace, not a compile, so a batch
  that cannot fit is refused in seconds."""
  inner = getattr(jaxpr, "jaxpr", jaxpr)
  leaves = [(i in sharded_argnums, leaf) for i, arg in enumerate(args)
            for leaf in jax.tree.leaves(arg)]
  used = _used_inputs(inner)
  if len(used) != len(leaves):  # not this function's trace: count every argument
    used = [True] * len(leaves)
  whole = sum(_value_bytes(leaf) for (split, leaf), read in zip(leaves, used)
              if read and not split)
  split = sum(_value_bytes(leaf) for (split, leaf), read in zip(leaves, used) if read and split)
  split += largest_materialised_bytes(inner)
  return whole + -(-split // max(num_devices, 1))
