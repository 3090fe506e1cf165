"""Programs that run once (parameter initialisation, synthetic data), compiled for that.

On CPU, most of the compile time of a model's initialisation is LLVM optimising the random-bit
generator unrolled for every parameter; for a program that runs once that buys nothing, so it is
compiled at XLA's lowest backend optimisation level. The values are the same draws to the last
bit or two of float32 rounding, and the same from run to run. Elsewhere programs compile as JAX
compiles them.
"""

from typing import Callable, Optional

import jax

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

