"""Command-line entry point: absl flags -> RunSpecs -> runner. Bad input is one line on stderr and
exit status 2."""

import logging

from absl import app, flags

from fathom_jax import host_memory, native_logs
from fathom_jax import errors
from fathom_jax.errors import UsageError
from fathom_jax import flagparse
from fathom_jax.flagparse import parse_flags

FLAGS = flags.FLAGS

flags.DEFINE_string("workload", "memnet", "Workload name, a comma list, or 'all'.")
flags.DEFINE_enum("mode", "train", ["train", "infer", "both"], "What to run.")
flags.DEFINE_enum("backend", None, ["cpu", "gpu", "tpu"], "JAX backend; default: what JAX picks.")
flags.DEFINE_string("preset", "paper", "Size preset: 'paper', or a smaller one ('small', 'tiny').")
flags.DEFINE_integer("batch_size", None, "Batch size; default: the preset's.")
flags.DEFINE_integer("steps", 10, "Measured steps.")
flags.DEFINE_integer("warmup_steps", 2, "Steps run before measuring, not timed.")
flags.DEFINE_integer("seed", 0, "Seed of parameters, data and sampling.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "Compute dtype; parameters and optimizer state stay float32.")
flags.DEFINE_string("data", "synthetic", "'synthetic', or the path of a real dataset.")
flags.DEFINE_string("output_dir", "runs", "Folder that receives one run folder per run.")
flags.DEFINE_multi_string("override", [], "Config field override, field=value; repeatable.")
flags.DEFINE_bool("quiet", False, "Print only the summaries.")
flags.DEFINE_bool("profile", False,
                  "After the measured steps, run as many again under the JAX profiler: trace, "
                  "HLO and op breakdown (ops.csv, breakdown.json, breakdown.png) in the run "
                  "folder; `tensorboard --logdir <output_dir>` opens the traces.")
flags.DEFINE_string("component_depth", "layer",
                    "With --profile: the breakdown's model components, by the first N names of "
                    "their op_name path: model, block, layer, full or N.")
flags.DEFINE_bool("debug", False,
                  "Show the traceback of an unexpected error (also FATHOM_JAX_DEBUG=1); without "
                  "it, every failure is one line.")
flags.DEFINE_bool("allow_nonfinite", False,
                  "Keep running past a NaN or infinite loss (default: stop the run, record it as "
                  "failed, exit 1).")
flags.DEFINE_integer("num_devices", None,
                     "Devices to run data-parallel over (global batch sharded, parameters "
                     "replicated); default: all devices of the backend.")
flags.DEFINE_enum("execution", "compiled", ["compiled", "unfused", "eager"],
                  "How the step runs: compiled by XLA; compiled with XLA's fusion passes off "
                  "(each op its own kernel); or eager, dispatched op by op from Python.")
flags.DEFINE_enum("implementation", None, ["reference", "tuned"],
                  "The workloads as written (reference: flax.linen layers, autodiff), or rewritten "
                  "where XLA's CPU backend measured faster (tuned: CPU only). Default: tuned on "
                  "CPU, reference on GPU and TPU.")
flags.DEFINE_enum("bad_samples", "fail", ["fail", "skip"],
                  "A damaged sample in a --data dataset (an image, a bAbI story, a WAV file, a "
                  "sentence pair): fail with an error naming it, or skip it and count it in the "
                  "summary. Damage to a whole file is an error either way.")
flags.DEFINE_enum("host_memory", "auto", ["auto", "keep", "return"],
                  "Memory the host's allocator frees: keep it for reuse (one glibc arena), or "
                  "return it to the kernel (glibc's default), which faults it in again every "
                  "step; auto keeps it where a workload's paper-size steps use large buffers "
                  "(see host_memory.py).")
flags.DEFINE_bool("huge_pages", True,
                  "Have glibc's malloc ask for transparent huge pages for large host buffers: "
                  "the process starts again once with GLIBC_TUNABLES set (Linux, glibc 2.35+; "
                  "a hugetlb setting already in GLIBC_TUNABLES stands).")
flags.DEFINE_string("target", None,
                    "Compile the step for a device this machine lacks (h100, h200, tpu-v4, "
                    "tpu-v5e, tpu-v5p, tpu-v6e) and run nothing: HLO, the compiler's analyses and "
                    "a static breakdown with an estimated step time (fathom_jax.targets).")
flags.DEFINE_integer("cpus", None,
                     "Pin the process to the first N CPUs it may use, before JAX starts (XLA's "
                     "CPU thread pools follow the mask): the CPU thread-scaling knob.")
flags.DEFINE_integer("cpu_devices", None,
                     "Split the host CPU into this many JAX devices (for data-parallel runs on one "
                     "machine).")
flags.DEFINE_bool("distributed", False,
                  "Join a multi-host run with jax.distributed.initialize; on TPU VMs and managed "
                  "clusters its defaults are detected, elsewhere give the three flags below.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def _pin_cpus(count: int) -> None:
  import os
  allowed = sorted(os.sched_getaffinity(0))
  if not 1 <= count <= len(allowed):
    raise UsageError(f"--cpus must be in [1, {len(allowed)}] (the CPUs this process may use), "
                     f"got {count}")
  os.sched_setaffinity(0, allowed[:count])


def _keep_host_memory() -> bool:
  from fathom_jax.workloads import registry
  try:
    workloads = [registry.get(n) for n in registry.expand(FLAGS.workload)]
  except UsageError:
    workloads = []  # reported with the other usage errors, once JAX is up
  return host_memory.wanted(FLAGS.host_memory, workloads, FLAGS.preset)


MAX_CPU_DEVICES = 256  # virtual devices of one host: beyond this XLA spends minutes creating them


def check_flags() -> None:
  """What can be checked before JAX starts: ranges, addresses, the output folder."""
  if FLAGS.cpu_devices is not None and not 0 < FLAGS.cpu_devices <= MAX_CPU_DEVICES:
    raise UsageError(f"--cpu_devices must be in [1, {MAX_CPU_DEVICES}], got {FLAGS.cpu_devices}")
  for name in ("num_processes", "num_devices"):
    value = getattr(FLAGS, name)
    if value is not None and not 0 < value <= 2**20:
      raise UsageError(f"--{name} must be in [1, {2**20}], got {value}")
  if FLAGS.coordinator_address is not None:
    flagparse.check_coordinator_address(FLAGS.coordinator_address)
  if FLAGS.output_dir:
    flagparse.check_output_dir(FLAGS.output_dir)


def _start_backends() -> None:
  """Settings that must precede JAX's first use of a backend."""
  import jax
  from fathom_jax import environment
  environment.skip_absent_accelerators()
  if FLAGS.cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
  multi_host = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  if FLAGS.distributed or any(v is not None for v in multi_host):
    if FLAGS.num_processes is not None and FLAGS.num_processes < 1:
      raise UsageError(f"--num_processes must be positive, got {FLAGS.num_processes}")
    if FLAGS.process_id is not None and FLAGS.num_processes is not None and not (
        0 <= FLAGS.process_id < FLAGS.num_processes):
      raise UsageError(f"--process_id must be in [0, {FLAGS.num_processes}), got "
                       f"{FLAGS.process_id}")
    try:
      jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                                 num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
    except (ValueError, RuntimeError) as e:
      raise UsageError(f"cannot join the multi-host run: {str(e).splitlines()[0]}") from None
  native_logs.start_backends()


flagparse.set_help(
    "usage: python run.py --workload=NAME[,NAME...] [flags]  (also: fathom-jax run)", [
        ("workload", ["workload", "preset", "mode", "batch_size", "override", "dtype", "data",
                      "bad_samples", "seed", "implementation"]),
        ("execution", ["backend", "steps", "warmup_steps", "execution", "num_devices",
                       "cpu_devices", "cpus", "host_memory", "huge_pages", "allow_nonfinite",
                       "target"]),
        ("multi-host", ["distributed", "coordinator_address", "num_processes", "process_id"]),
        ("profiling", ["profile", "component_depth"]),
        ("output", ["output_dir", "quiet", "debug"]),
    ])


def specs_from_flags() -> list:
  from fathom_jax import runner
  from fathom_jax.workloads import registry
  modes = ["train", "infer"] if FLAGS.mode == "both" else [FLAGS.mode]
  return [
      runner.RunSpec(
          workload=name, mode=mode, preset=FLAGS.preset, overrides=tuple(FLAGS.override),
          batch_size=FLAGS.batch_size, steps=FLAGS.steps, warmup_steps=FLAGS.warmup_steps,
          seed=FLAGS.seed, dtype=FLAGS.dtype, data=FLAGS.data, output_dir=FLAGS.output_dir,
          backend=FLAGS.backend, num_devices=FLAGS.num_devices,
          allow_nonfinite=FLAGS.allow_nonfinite, profile=FLAGS.profile, quiet=FLAGS.quiet,
          execution=FLAGS.execution, bad_samples=FLAGS.bad_samples,
          implementation=FLAGS.implementation, component_depth=FLAGS.component_depth)
      for name in registry.expand(FLAGS.workload) for mode in modes
  ]


def main(argv: list[str]) -> None:
  del argv  # parse_flags rejects positional arguments
  # JAX logs each backend it fails to find (e.g. no libtpu) at INFO; that is not news to a user.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  # Signals are acted on between phases and steps: raised inside XLA's compiler or a garbage
  # collection callback, one was lost (the run went on) or crashed the runtime at exit.
  with errors.one_line_errors(debug=FLAGS.debug, defer_signals=True,
                              interrupted="the result file records the steps that finished"):
    check_flags()
    if FLAGS.huge_pages:
      host_memory.restart_with_huge_pages()
    native_logs.import_jax()
    if _keep_host_memory():
      host_memory.keep_freed_memory()
    if FLAGS.cpus is not None:
      _pin_cpus(FLAGS.cpus)
    if FLAGS.target is not None:
      _compile_for_target()
      return
    import jax
    from fathom_jax import results, runner
    _start_backends()
    specs = specs_from_flags()
    # Resolve every run first, so a bad preset or path fails before anything is written.
    resolved = [runner.resolve(spec) for spec in specs]
    from fathom_jax import environment
    environment.select_devices(FLAGS.backend)
    errors.raise_if_interrupted()
    for spec, res in zip(specs, resolved):
      record = runner.execute(spec, res)
      if jax.process_index() == 0:
        print(results.format_summary(record), flush=True)


def _compile_for_target() -> None:
  """--target: the steps compiled for the target; usage errors raise, for main to report."""
  from fathom_jax import target_compile, targets
  target = targets.get(FLAGS.target)
  for name in ("backend", "cpu_devices", "num_devices", "num_processes", "coordinator_address"):
    if getattr(FLAGS, name) is not None:
      raise UsageError(f"--{name} chooses devices to run on; --target runs nothing")
  if FLAGS.profile:
    raise UsageError("--profile traces a run; --target runs nothing (its breakdown is static)")
  specs = specs_from_flags()
  for spec in specs:  # every request is checked before anything is compiled or written
    target_compile.check_request(spec, target)
  targets.prepare_process()
  devices = targets.devices(target)
  for spec in specs:
    errors.raise_if_interrupted()
    target_compile.compile_for_target(spec, target, devices)
  errors.raise_if_interrupted()


def run() -> None:
  app.run(main, flags_parser=parse_flags)
