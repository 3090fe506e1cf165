#!/usr/bin/env python3
"""Times every workload's train and inference steps and prints one table.

For each workload: compile time, median step time, throughput, model FLOPs per step (XLA's cost
analysis of the compiled step), achieved FLOP/s, and model FLOP utilisation (MFU) against the
peak of a large matmul of the same dtype measured in this same run.

  python benchmarks/bench_workloads.py --workloads=alexnet,vgg,residual --preset=paper
  python benchmarks/bench_workloads.py --workloads=all --preset=small --steps=5
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fathom_jax import environment, runner  # noqa: E402
from fathom_jax.workloads import registry  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workloads", "all", "Comma list of workloads, or 'all'.")
flags.DEFINE_string("modes", "train,infer", "Comma list of modes.")
flags.DEFINE_string("preset", "paper", "Size preset.")
flags.DEFINE_integer("batch_size", None, "Batch size for every workload; default: the preset's.")
flags.DEFINE_multi_string("batch", [], "Per-workload batch size, workload=N; repeatable.")
flags.DEFINE_integer("steps", 5, "Measured steps per run.")
flags.DEFINE_integer("warmup_steps", 2, "Untimed steps per run.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_enum("backend", None, ["cpu", "gpu", "tpu"], "JAX backend.")
flags.DEFINE_multi_string("override", [], "workload:field=value config override; repeatable.")


def matmul_peak(device, dtype: str, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` large square matmuls: the ceiling for MFU."""
  n = 2048 if device.platform == "cpu" else 8192
  key = jax.random.key(0)
  a = jax.device_put(jax.random.normal(key, (n, n), jnp.dtype(dtype)), device)
  b = jax.device_put(jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.dtype(dtype)),
                     device)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / min(times)


def _batch_sizes() -> dict:
  sizes = {}
  for item in FLAGS.batch:
    name, _, value = item.partition("=")
    sizes[name] = int(value)
  return sizes


def _overrides(name: str) -> tuple:
  return tuple(o.split(":", 1)[1] for o in FLAGS.override if o.split(":", 1)[0] == name)


def main(argv):
  del argv
  devices = environment.select_devices(FLAGS.backend)
  peak = matmul_peak(devices[0], FLAGS.dtype)
  env = environment.describe(devices)
  print(f"# {env['device_kind']} ({env['backend']}, {env['cpu_affinity']} cores), jax "
        f"{env['jax']}, {FLAGS.dtype}, preset {FLAGS.preset}; matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s")
  header = (f"{'workload':<9} {'mode':<5} {'batch':>5} {'compile s':>9} {'step ms':>9} "
            f"{'p10-p90 ms':>15} {'throughput':>22} {'GFLOP/step':>10} {'GFLOP/s':>8} {'MFU':>6}")
  print(header)
  print("-" * len(header))
  batches = _batch_sizes()
  for name in registry.expand(FLAGS.workloads):
    for mode in FLAGS.modes.split(","):
      spec = runner.RunSpec(
          workload=name, mode=mode, preset=FLAGS.preset, overrides=_overrides(name),
          batch_size=batches.get(name, FLAGS.batch_size), steps=FLAGS.steps,
          warmup_steps=FLAGS.warmup_steps, dtype=FLAGS.dtype, output_dir=None,
          backend=FLAGS.backend, quiet=True)
      r = runner.execute(spec)
      f = r["figures"]
      t = f["step_time_s"]
      flops = f["flops_per_step"] or 0.0
      mfu = flops / t["median"] / peak
      throughput = f"{f['examples_per_s']:.1f} {r['example_unit']}/s"
      print(f"{name:<9} {mode:<5} {r['config']['batch_size']:>5} "
            f"{f['lower_time_s'] + f['compile_time_s']:>9.2f} {t['median'] * 1e3:>9.2f} "
            f"{t['p10'] * 1e3:>7.2f}-{t['p90'] * 1e3:<7.2f} {throughput:>22} "
            f"{flops / 1e9:>10.3f} {flops / t['median'] / 1e9:>8.1f} {mfu:>6.1%}", flush=True)


if __name__ == "__main__":
  app.run(main)
