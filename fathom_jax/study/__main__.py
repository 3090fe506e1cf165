"""python -m fathom_jax.study: plan, run (or resume) and report a study; see fathom_jax.study."""

import os
import subprocess
import sys
from typing import Optional, Sequence

from absl import app, flags

from fathom_jax import flagparse, native_logs, study
from fathom_jax.errors import UsageError


FLAGS = flags.FLAGS
flags.DEFINE_string("output_dir", "study", "The study folder (resumed if it exists).")
flags.DEFINE_string("workloads", "all", "Workloads of the suite: a comma list or 'all'.")
flags.DEFINE_string("preset", "tiny", "Size preset of every run.")
flags.DEFINE_integer("steps", 5, "Measured (and as many profiled) steps per run.")
flags.DEFINE_integer("warmup_steps", 2, "Untimed steps per run.")
flags.DEFINE_enum("backend", None, ["cpu", "gpu", "tpu"], "JAX backend of every run.")
flags.DEFINE_enum("implementation", None, ["reference", "tuned"],
                  "Implementation of every run (run.py's --implementation); default: tuned on "
                  "CPU, reference on GPU and TPU.")
flags.DEFINE_string("fusion_workloads", "all",
                    "Workloads whose train step also runs unfused and eagerly ('none' to skip).")
flags.DEFINE_string("thread_workloads", "all",
                    "Workloads measured at each CPU count ('none' to skip).")
flags.DEFINE_list("thread_counts", None,
                  "CPU counts of thread scaling; default 1, 2, 4, ... up to the CPUs available.")
flags.DEFINE_string("device_workloads", "all",
                    "Workloads measured at each device count ('none' to skip).")
flags.DEFINE_list("device_counts", None,
                  "Device counts of device scaling; default 1, 2, 4, 8 on the CPU (split into "
                  "devices), else 1, 2, 4, ... up to the devices of the backend.")
flags.DEFINE_string("implementation_workloads", "tuned",
                    "Workloads whose train step also runs as reference and as tuned, compared "
                    "class by class ('tuned': those with a tuned implementation, where the runs "
                    "are on the CPU; 'none' to skip).")
flags.DEFINE_list("targets", [],
                  "Devices this machine lacks that the suite's steps also compile for (run.py "
                  "--target; needs the 'targets' extra): h100, h200, tpu-v4, tpu-v5e, ...")
flags.DEFINE_integer("run_timeout_s", 3600, "Longest one run may take before it counts as failed.")
flags.DEFINE_bool("report_only", False, "Rebuild the report from the runs present; run nothing.")


flagparse.set_help(
    "usage: python -m fathom_jax.study --workloads=all [flags]  (also: fathom-jax study)", [
        ("what", ["workloads", "preset", "steps", "warmup_steps", "backend", "implementation"]),
        ("sections", ["fusion_workloads", "thread_workloads", "thread_counts",
                      "device_workloads", "device_counts", "implementation_workloads",
                      "targets"]),
        ("output", ["output_dir", "report_only", "run_timeout_s"]),
    ])


def _subset(value: str, suite: list[str], flag: str) -> tuple[str, ...]:
  from fathom_jax.workloads import registry
  if value.strip() == "none":
    return ()
  if value.strip() == "all":
    return tuple(suite)
  names = registry.expand(value, flag)
  outside = [n for n in names if n not in suite]
  if outside:
    raise UsageError(f"--{flag} names workloads outside --workloads: {', '.join(outside)}")
  return tuple(names)


def _counts(values: Sequence[str], flag: str, limit: Optional[int] = None) -> tuple[int, ...]:
  try:
    counts = tuple(sorted({int(v) for v in values}))
  except ValueError:
    raise UsageError(f"--{flag} must be a comma list of integers, got {','.join(values)}") from None
  if not counts or counts[0] < 1 or (limit is not None and counts[-1] > limit):
    bound = f" and at most {limit}" if limit is not None else ""
    raise UsageError(f"--{flag} must be positive{bound}, got {','.join(values)}")
  return counts


def _runs_on_cpu() -> bool:
  """Whether the study's runs will be on the CPU: --backend=cpu, or no backend named and no
  accelerator (its plugin installed and its devices present)."""
  from fathom_jax import environment
  if FLAGS.backend is not None:
    return FLAGS.backend == "cpu"
  return not environment.accelerators_present()


def _implementation_workloads(suite: list[str]) -> tuple[str, ...]:
  from fathom_jax import tuned
  if FLAGS.implementation_workloads.strip() != "tuned":
    return _subset(FLAGS.implementation_workloads, suite, "implementation_workloads")
  # The tuned implementation runs on the CPU only: by default, compare where the runs are on it.
  if not _runs_on_cpu():
    return ()
  return tuple(w for w in suite if w in tuned.TUNED)


def _implementation() -> str:
  """Every run's implementation, named in its command: run.py's default where the runs are."""
  from fathom_jax import tuned
  if FLAGS.implementation:
    return FLAGS.implementation
  return tuned.default("cpu") if _runs_on_cpu() else "reference"


def _default_device_counts() -> tuple[int, ...]:
  """1, 2, 4, 8 CPU devices (the host split by --cpu_devices); on an accelerator, powers of two
  up to the devices it has, counted in a process of their own (a TPU is held by one process)."""
  if _runs_on_cpu():
    return (1, 2, 4, 8)
  backend = FLAGS.backend or ""
  proc = subprocess.run([sys.executable, "-c", f"import jax; print(jax.device_count({backend!r} "
                         "or None))"], capture_output=True, text=True, timeout=600)
  lines = proc.stdout.split()
  if proc.returncode != 0 or not lines or not lines[-1].isdigit():
    raise UsageError(f"cannot count the devices of backend {backend or 'default'}: "
                     f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
  return study.doublings(int(lines[-1]))


def _targets() -> tuple[str, ...]:
  from fathom_jax import targets
  names = tuple(dict.fromkeys(t.strip() for t in FLAGS.targets if t.strip()))
  for name in names:
    targets.require_plugin(targets.get(name), "targets")
  return names


def settings_from_flags() -> study.Settings:
  from fathom_jax import config as config_lib
  from fathom_jax.workloads import registry
  suite = registry.expand(FLAGS.workloads, "workloads")
  for name in suite:
    w = registry.get(name)
    config_lib.preset(w.presets, FLAGS.preset, w.name)
  for name in ("steps", "run_timeout_s"):
    if getattr(FLAGS, name) < 1:
      raise UsageError(f"--{name} must be positive, got {getattr(FLAGS, name)}")
  if FLAGS.warmup_steps < 0:
    raise UsageError(f"--warmup_steps must be >= 0, got {FLAGS.warmup_steps}")
  available = len(os.sched_getaffinity(0))
  threads = (_counts(FLAGS.thread_counts, "thread_counts", available) if FLAGS.thread_counts
             else study.doublings(available))
  device_workloads = _subset(FLAGS.device_workloads, suite, "device_workloads")
  if FLAGS.device_counts:
    devices = _counts(FLAGS.device_counts, "device_counts")
  else:
    devices = _default_device_counts() if device_workloads else ()
  return study.Settings(
      workloads=tuple(suite), preset=FLAGS.preset, steps=FLAGS.steps,
      warmup_steps=FLAGS.warmup_steps, backend=FLAGS.backend,
      implementation=_implementation(),
      fusion_workloads=_subset(FLAGS.fusion_workloads, suite, "fusion_workloads"),
      thread_workloads=_subset(FLAGS.thread_workloads, suite, "thread_workloads"),
      thread_counts=threads, device_workloads=device_workloads, device_counts=devices,
      device_batch={w: study.device_batch(w, FLAGS.preset, devices) for w in device_workloads},
      implementation_workloads=_implementation_workloads(suite), targets=_targets())


def main(argv: list[str]) -> None:
  del argv
  from fathom_jax import errors
  with errors.one_line_errors(interrupted="run the same command again to resume the study"):
    flagparse.check_output_dir(FLAGS.output_dir)
    native_logs.import_jax()
    if FLAGS.report_only:
      from fathom_jax.study import report
      if not os.path.exists(os.path.join(FLAGS.output_dir, study.STUDY_FILE)):
        raise UsageError(f"{FLAGS.output_dir} holds no study ({study.STUDY_FILE} is missing)")
      print(f"report: {report.build(FLAGS.output_dir)}")
      return
    study.execute(FLAGS.output_dir, settings_from_flags(), sys.argv[1:], FLAGS.run_timeout_s)


if __name__ == "__main__":
  app.run(main, flags_parser=flagparse.parse_flags)
