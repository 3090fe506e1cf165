"""Command-line entry point: absl flags -> RunSpecs -> runner. Bad input is one line on stderr and
exit status 2."""

import logging
import sys

from absl import app, flags

from fathom_jax.errors import UsageError

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


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with its errors turned into one line and exit status 2."""
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}".splitlines()[0], file=sys.stderr)
    sys.exit(2)
  if len(rest) > 1:
    print(f"error: unexpected arguments: {' '.join(rest[1:])} (flags are --name=value)",
          file=sys.stderr)
    sys.exit(2)
  return rest


def specs_from_flags() -> list:
  from fathom_jax import runner
  from fathom_jax.workloads import registry
  modes = ["train", "infer"] if FLAGS.mode == "both" else [FLAGS.mode]
  return [
      runner.RunSpec(
          workload=name, mode=mode, preset=FLAGS.preset, overrides=tuple(FLAGS.override),
          batch_size=FLAGS.batch_size, steps=FLAGS.steps, warmup_steps=FLAGS.warmup_steps,
          seed=FLAGS.seed, dtype=FLAGS.dtype, data=FLAGS.data, output_dir=FLAGS.output_dir,
          backend=FLAGS.backend, quiet=FLAGS.quiet)
      for name in registry.expand(FLAGS.workload) for mode in modes
  ]


def main(argv: list[str]) -> None:
  del argv  # parse_flags rejects positional arguments
  # JAX logs each backend it fails to find (e.g. no libtpu) at INFO; that is not news to a user.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  from fathom_jax import runner
  try:
    specs = specs_from_flags()
    # Resolve every run first, so a bad preset or path fails before anything is written.
    resolved = [runner.resolve(spec) for spec in specs]
    from fathom_jax import environment
    environment.select_devices(FLAGS.backend)
    for spec, res in zip(specs, resolved):
      print(runner.format_summary(runner.execute(spec, res)), flush=True)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def run() -> None:
  app.run(main, flags_parser=parse_flags)
