#!/usr/bin/env python3
"""Times every workload's train and inference steps and prints one table.

For each workload: compile time (lower + compile, checked against --max_compile_s), median step
time, throughput, model FLOPs per step, achieved FLOP/s, and model FLOP utilisation (MFU)
against the peak of a large matmul of the same dtype, measured just before that row's run (the
peak of a shared machine moves with its load: on 2 CPU cores it read 490 GFLOP/s idle and half
that with one other busy process).

Model FLOPs are counted from the compiled step's HLO by fathom_jax.analysis.cost, which
multiplies loop bodies by their trip counts; XLA's own cost analysis (the runner's
flops_per_step, shown as 'XLA GFLOP') counts a loop body once and so undercounts the recurrent
models. They are counted with direct convolutions: Winograd's algorithm, which the image models
use on CPU, does fewer multiplies for the same result, so their MFU can pass what the direct
form could reach. A run whose measured steps take less than --min_time_s in all is repeated with enough
steps to fill it, so that fast steps are not judged on a handful of samples.

  python benchmarks/bench_workloads.py --workloads=alexnet,vgg,residual --preset=paper
  python benchmarks/bench_workloads.py --workloads=all --preset=small --steps=5
"""

import dataclasses
import functools
import math
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
import jax  # noqa: E402

from fathom_jax import (  # noqa: E402
    compiling, environment, host_memory, model_steps, peaks, runner, tuned)
from fathom_jax.analysis import cost, hlo  # noqa: E402
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
flags.DEFINE_enum("implementation", None, ["reference", "tuned"],
                  "As run.py's flag; default: tuned on CPU, reference elsewhere.")
flags.DEFINE_multi_string("override", [], "workload:field=value config override; repeatable.")
flags.DEFINE_float("min_time_s", 2.0, "Measured time a run must fill; shorter runs are repeated "
                   "with more steps (at most --max_steps).")
flags.DEFINE_enum("host_memory", "auto", ["auto", "keep", "return"],
                  "Freed host memory, as run.py's flag: kept or returned to the kernel; auto runs "
                  "each workload in its own process with run.py's choice for it.")
flags.DEFINE_bool("huge_pages", True, "As run.py's flag: glibc's malloc asks for transparent huge "
                  "pages (the process starts again once with GLIBC_TUNABLES set).")
flags.DEFINE_bool("header", True, "Print the table's header.")
flags.DEFINE_integer("max_steps", 2000, "Upper bound on the steps of a repeated run.")
flags.DEFINE_float("max_compile_s", 20.0, "Compile time (lower + compile) a step must stay under; "
                   "rows over it are marked and the script exits with status 1.")


def _batch_sizes() -> dict:
  sizes = {}
  for item in FLAGS.batch:
    name, _, value = item.partition("=")
    sizes[name] = int(value)
  return sizes


def _overrides(name: str) -> tuple:
  return tuple(o.split(":", 1)[1] for o in FLAGS.override if o.split(":", 1)[0] == name)


def model_flops(spec: runner.RunSpec) -> float:
  """FLOPs of the step as the reference implementation writes it (direct convolutions, where the
  tuned one may use Winograd's algorithm), loops counted once per iteration."""
  config_overrides, _ = tuned.split_overrides(spec.workload, spec.overrides)
  resolved = runner.resolve(dataclasses.replace(spec, implementation="reference",
                                                overrides=config_overrides))
  model, batch_size = resolved.model, resolved.batch_size
  key = jax.random.key(0)
  batch = jax.eval_shape(lambda k: model.synthetic_batch(k, batch_size), key)
  if spec.mode == "train":
    state = jax.eval_shape(functools.partial(model_steps.init_train_state, model), key, batch)
    lowered = jax.jit(model_steps.make_train_step(model)).lower(state, batch)
  else:
    variables = jax.eval_shape(model.init, key, batch)
    lowered = jax.jit(model_steps.make_infer_step(model)).lower(variables, batch, key)
  platform = jax.devices(spec.backend)[0].platform
  compiled, _ = compiling.compile_step(
      lowered, spec.execution, model.compiler_options.get((platform, spec.mode), {}))
  return cost.CostModel(hlo.parse_module(compiled.as_text())).total().flops


def measure(spec: runner.RunSpec) -> dict:
  """The run's record; repeated with more steps when its measured steps fill < min_time_s."""
  record = runner.execute(spec)
  measured = sum(record["figures"]["step_times_s"])
  if measured < FLAGS.min_time_s and spec.steps < FLAGS.max_steps:
    median = record["figures"]["step_time_s"]["median"]
    steps = min(FLAGS.max_steps, math.ceil(FLAGS.min_time_s / median))
    if steps > spec.steps:
      record = runner.execute(dataclasses.replace(spec, steps=steps))
  return record


def _print_header(env: dict) -> None:
  print(f"# {env['device_kind']} ({env['backend']}, {env['cpu_affinity']} cores), jax "
        f"{env['jax']}, {FLAGS.dtype}, preset {FLAGS.preset}; MFU against the matmul peak "
        f"measured before each row; compile limit {FLAGS.max_compile_s:.0f} s; host: freed "
        f"memory kept or returned to the kernel (--host_memory={FLAGS.host_memory}), huge "
        f"pages {'asked for' if env['huge_pages'] else 'not asked for'}")
  header = (f"{'workload':<9} {'mode':<5} {'impl':<9} {'batch':>5} {'compile s':>10} "
            f"{'step ms':>9} "
            f"{'p10-p90 ms':>15} {'steps':>5} {'throughput':>22} {'GFLOP/step':>10} "
            f"{'XLA GFLOP':>10} {'GFLOP/s':>8} {'peak':>6} {'MFU':>6} {'host':>8}")
  print(header)
  print("-" * len(header), flush=True)


def _one_process_per_workload(names: list[str]) -> int:
  """Runs each workload in a child process with its own host-memory setting (it must be made
  before JAX starts its threads); returns the worst exit status."""
  passed = [a for a in sys.argv[1:] if not a.startswith(("--workloads", "--host_memory",
                                                         "--header", "--noheader"))]
  status = 0
  for name in names:
    keep = host_memory.wanted("auto", [registry.get(name)], FLAGS.preset)
    setting = "keep" if keep else "return"
    status = max(status, subprocess.run(
        [sys.executable, os.path.abspath(__file__), *passed, f"--workloads={name}",
         f"--host_memory={setting}", "--noheader"]).returncode)
  return status


def main(argv):
  del argv
  if FLAGS.huge_pages:
    host_memory.restart_with_huge_pages()  # before JAX starts its threads
  names = registry.expand(FLAGS.workloads)
  if FLAGS.host_memory == "auto" and len(names) > 1:
    _print_header(environment.describe(environment.select_devices(FLAGS.backend)))
    sys.exit(_one_process_per_workload(names))
  if host_memory.wanted(FLAGS.host_memory, [registry.get(n) for n in names], FLAGS.preset):
    host_memory.keep_freed_memory()  # before JAX starts its threads
  devices = environment.select_devices(FLAGS.backend)
  env = environment.describe(devices)
  if FLAGS.header:
    _print_header(env)
  host = "kept" if env["host_memory_reused"] else "returned"
  batches = _batch_sizes()
  slow_compiles = []
  for name in names:
    for mode in FLAGS.modes.split(","):
      spec = runner.RunSpec(
          workload=name, mode=mode, preset=FLAGS.preset, overrides=_overrides(name),
          batch_size=batches.get(name, FLAGS.batch_size), steps=FLAGS.steps,
          warmup_steps=FLAGS.warmup_steps, dtype=FLAGS.dtype, output_dir=None,
          backend=FLAGS.backend, quiet=True, implementation=FLAGS.implementation)
      peak = peaks.matmul_peak(devices[0], FLAGS.dtype)
      r = measure(spec)
      f = r["figures"]
      t = f["step_time_s"]
      flops = model_flops(spec)
      compile_s = f["lower_time_s"] + f["compile_time_s"]
      over = compile_s > FLAGS.max_compile_s
      if over:
        slow_compiles.append(f"{name} {mode}")
      throughput = f"{f['examples_per_s']:.1f} {r['example_unit']}/s"
      print(f"{name:<9} {mode:<5} {r['implementation']:<9} {r['config']['batch_size']:>5} "
            f"{compile_s:>9.2f}{'!' if over else ' '} {t['median'] * 1e3:>9.2f} "
            f"{t['p10'] * 1e3:>7.2f}-{t['p90'] * 1e3:<7.2f} {len(f['step_times_s']):>5} "
            f"{throughput:>22} {flops / 1e9:>10.3f} {(f['flops_per_step'] or 0) / 1e9:>10.3f} "
            f"{flops / t['median'] / 1e9:>8.1f} {peak / 1e9:>6.0f} "
            f"{flops / t['median'] / peak:>6.1%} {host:>8}", flush=True)
  if slow_compiles:
    print(f"# compile over {FLAGS.max_compile_s:.0f} s: {', '.join(slow_compiles)}")
    sys.exit(1)

if __name__ == "__main__":
  app.run(main)
