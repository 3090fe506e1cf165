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


def run_once(fn: Callable, *args, platform: Optional[str] = None, out_shardings=None):
  """fn(*args), jitted and compiled as a one-shot program for `platform` (default: JAX's default
  backend). Static arguments are bound into `fn` (functools.partial) by the caller."""
  platform = platform or jax.default_backend()
  jitted = jax.jit(fn) if out_shardings is None else jax.jit(fn, out_shardings=out_shardings)
  options = ONE_SHOT_COMPILER_OPTIONS.get(platform)
  compiled = jitted.lower(*args).compile(**({"compiler_options": options} if options else {}))
  return compiled(*args)


def combined(*options: dict) -> dict:
  """XLA compile options merged; lists of disabled passes are joined, not overwritten."""
  merged: dict = {}
  for option in options:
    for key, value in option.items():
      if key == "xla_disable_hlo_passes" and merged.get(key):
        value = ",".join(dict.fromkeys(merged[key].split(",") + value.split(",")))
      merged[key] = value
  return merged
