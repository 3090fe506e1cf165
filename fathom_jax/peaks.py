"""The machine's ceilings, measured: a large matmul (FLOP/s) and a large streaming copy (bytes/s).

MFU and the roofline compare a workload against these, measured in the same session, not against
a datasheet: on a shared or throttled machine the datasheet is not what a program can reach.

  python -m fathom_jax.peaks [--backend=cpu] [--dtype=float32] [--output=peaks.json]
"""

import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp

from fathom_jax import flagparse


def _best_time(f: Callable, *args, repeats: int) -> float:
  jax.block_until_ready(f(*args))  # compile and warm up
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(f(*args))
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peak(device, dtype: str = "float32", repeats: int = 5) -> float:
  """FLOP/s of the fastest of `repeats` large square matmuls."""
  n = 2048 if device.platform == "cpu" else 8192
  key = jax.random.key(0)
  a, b = (jax.device_put(jax.random.normal(jax.random.fold_in(key, i), (n, n), jnp.dtype(dtype)),
                         device) for i in range(2))
  return 2 * n**3 / _best_time(jax.jit(lambda x, y: x @ y), a, b, repeats=repeats)


def copy_peak(device, repeats: int = 5) -> float:
  """Bytes/s moved by the fastest of `repeats` reads-and-writes of an array far above cache size
  (x + 1: one read and one write per element, which XLA cannot elide)."""
  n = (64 if device.platform == "cpu" else 512) * 2**20  # float32 elements: 256 MiB / 2 GiB
  x = jax.device_put(jnp.zeros((n,), jnp.float32), device)
  return 2 * 4 * n / _best_time(jax.jit(lambda v: v + 1.0), x, repeats=repeats)


def measure(device, dtype: str = "float32") -> dict:
  return {"matmul_flops_per_s": matmul_peak(device, dtype), "copy_bytes_per_s": copy_peak(device),
          "dtype": dtype, "device_kind": device.device_kind, "platform": device.platform}


def main(argv=None) -> int:
  parser = flagparse.ArgumentParser(prog="python -m fathom_jax.peaks", description=__doc__)
  parser.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default=None)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--output", default=None, help="write the figures here as JSON")
  args = parser.parse_args(argv)
  from fathom_jax import environment, errors, results
  errors.follow_parent()
  with errors.one_line_errors():
    if args.output:
      folder = os.path.dirname(os.path.abspath(args.output))
      if os.path.isdir(args.output):
        raise errors.UsageError(f"--output {args.output} is a folder; give a file name")
      flagparse.check_output_dir(folder, "output")
    devices = environment.select_devices(args.backend)
    figures = measure(devices[0], args.dtype)
    if args.output:
      results.write_json_atomic(args.output, figures)
  print(f"matmul {figures['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s ({args.dtype}), "
        f"copy {figures['copy_bytes_per_s'] / 1e9:.1f} GB/s on {figures['device_kind']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
