"""Profiled runs (`--profile`): after the unprofiled measured steps, the same number of steps run
again under the JAX profiler, each inside a step annotation, so the result file holds step times
with and without profiling. The run folder receives:

  plugins/profile/<session>/<host>.xplane.pb   the trace (`tensorboard --logdir <output_dir>`)
  hlo/<module>.optimized.hlo.txt               the program as compiled (compiled.as_text())
  hlo/<module>.unoptimized.hlo.txt             the program before XLA's passes
  hlo/<module>.analysis.json                   the compiler's cost and memory analyses
  ops.csv, breakdown.json, breakdown.png       the op breakdown (fathom_jax.analysis)
"""

import glob
import os
import resource
import shutil
import tempfile
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from fathom_jax import compiling, host_memory, results
from fathom_jax.errors import DataError

HLO_DIR = "hlo"


def module_name(hlo_text: str) -> str:
  first = hlo_text.split("\n", 1)[0]
  return first.split()[1].rstrip(",") if first.startswith("HloModule ") else "module"


def save_programs(run_dir: str, lowered, compiled) -> dict[str, str]:
  """Writes the optimised and pre-optimisation HLO and the compiler's analyses of one program."""
  folder = os.path.join(run_dir, HLO_DIR)
  os.makedirs(folder, exist_ok=True)
  optimized = compiled.as_text()
  name = module_name(optimized)
  paths = {kind: os.path.join(folder, f"{name}.{kind}") for kind in
           ("optimized.hlo.txt", "unoptimized.hlo.txt", "analysis.json")}
  results.write_text_atomic(paths["optimized.hlo.txt"], optimized)
  # With op_names: scopes classify.
  results.write_text_atomic(paths["unoptimized.hlo.txt"],
                            lowered.as_text(dialect="hlo", debug_info=True))
  results.write_json_atomic(paths["analysis.json"],
                            {"cost_analysis": compiling.cost_analysis(compiled),
                             "memory_analysis": compiling.memory_analysis(compiled)})
  return paths


def publish_trace(written: str, logdir: str) -> None:
  """Moves the profiling sessions the profiler finished writing under `written` into `logdir`,
  each folder in one rename, so a reader sees a session whole or not at all."""
  sessions = os.path.join("plugins", "profile")
  for session in sorted(glob.glob(os.path.join(written, sessions, "*"))):
    target = os.path.join(logdir, sessions)
    os.makedirs(target, exist_ok=True)
    os.replace(session, os.path.join(target, os.path.basename(session)))


def capture(run_dir: Optional[str], mode: str, steps: int, prepare: Callable[[], Any],
            run: Callable[[Any], Any], programs: Optional[tuple[Any, Any]],
            unprofiled_times: list[float],
            say: Callable[[str], None], title: str = "",
            component_depth: str = "layer", phase_tokens: Optional[dict] = None) -> dict:
  """Runs `steps` steps under the profiler and analyses the trace.

  prepare() -> inputs of one step (not timed, outside the step annotation);
  run(inputs) runs the step to completion (timed, inside the annotation).
  programs: (lowered, compiled) of the step, whose HLO and analyses are saved; None when the step
  runs no single program (eager execution).
  Without a run folder (other hosts of a multi-host run) the trace goes to a temporary folder
  and is discarded: every process must still run the steps.
  """
  from fathom_jax.analysis import breakdown, components

  keep = run_dir is not None
  # The profiler writes its trace itself, not whole-or-nothing: into a hidden folder, whose
  # sessions move into the run folder once written (readers' globs skip hidden folders).
  trace_dir = tempfile.mkdtemp(prefix=".tmp-trace-" if keep else "fathom-profile-", dir=run_dir)
  if keep and programs is not None:
    save_programs(run_dir, *programs)
  options = jax.profiler.ProfileOptions()
  # Op events and step annotations are level-1 host events; Python function events and the
  # level-2 detail (thread-pool regions) slowed memnet's paper step by 10-15% here, level 1 by 4%.
  options.python_tracer_level = 0
  options.host_tracer_level = 1
  times, faults = [], []
  try:
    # Kept freed memory fragments under the profiler (see host_memory.large_blocks_returned).
    with host_memory.large_blocks_returned():
      jax.profiler.start_trace(trace_dir, profiler_options=options)
      try:
        for i in range(steps):
          inputs = prepare()
          with jax.profiler.StepTraceAnnotation(mode, step_num=i):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            run(inputs)
            times.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
      finally:
        jax.profiler.stop_trace()  # writes the trace; raises where it could not (a full disk)
        if keep:  # the trace of the steps that ran, interrupted or not
          publish_trace(trace_dir, run_dir)
  finally:
    shutil.rmtree(trace_dir, ignore_errors=True)
  profiled, unprofiled = results.percentiles(times), results.percentiles(unprofiled_times)
  # Medians, and minima, which a busy machine disturbs less.
  summary = {"step_times_s": times, "step_time_s": profiled,
             "overhead": profiled["median"] / unprofiled["median"] - 1,
             "overhead_of_min": profiled["min"] / unprofiled["min"] - 1,
             "page_faults_per_step": float(np.median(faults)),
             "large_blocks_returned": host_memory.kept()}
  ms = lambda t: f"{t * 1e3:.3f} ms"
  overhead = (f"  step time under the profiler: median {ms(profiled['median'])}, unprofiled "
              f"{ms(unprofiled['median'])} ({summary['overhead'] * 100:+.1f}%); min "
              f"{ms(profiled['min'])} vs {ms(unprofiled['min'])} "
              f"({summary['overhead_of_min'] * 100:+.1f}%); page faults "
              f"{summary['page_faults_per_step']:,.0f} a step"
              + (" (large blocks mapped afresh, not kept)" if host_memory.kept() else ""))
  if not keep:
    return summary
  hlo_files = sorted(glob.glob(os.path.join(run_dir, HLO_DIR, "*.optimized.hlo.txt")))
  try:
    result, paths = breakdown.run(run_dir, run_dir, hlo_files, title,
                                  component_depth=components.depth_of(component_depth))
  except DataError as e:
    print(f"no op breakdown: {e}\n{overhead}", flush=True)
    return {**summary, "error": str(e)}
  s = result.summary
  summary.update(
      trace_dir=run_dir, coverage=s["coverage"], steps_analysed=s["steps"],
      stalled_steps_left_out=len(s["stalled_steps_left_out"]),
      # FLOPs of the step by our model, every loop iteration counted (XLA's count takes one).
      model_flops_per_step=s["model_flops_per_step"],
      class_shares={k: v["share_of_step"] for k, v in s["by_class"].items()},
      xla_category_shares={k: v["share_of_step"] for k, v in s["by_xla_category"].items()},
      files={k: os.path.relpath(v, run_dir) for k, v in paths.items()})
  phase_lines = ""
  if phase_tokens:
    summary["phases"] = phases(s, phase_tokens)
    phase_lines = "\n" + format_phases(summary["phases"])
  # A summary, so printed even when quiet.
  print(breakdown.format_table(s, title) + phase_lines + "\n" + overhead, flush=True)
  return summary


def phases(breakdown_summary: dict, tokens_per_step: dict) -> dict:
  """Time, work and bytes moved per step and per token of each phase of a step: the outermost
  named scopes `tokens_per_step` names (e.g. a language model's prefill and decode), from the
  breakdown's ops under the profiler. Bytes over time is the bandwidth the phase drew."""
  out = {}
  for name, tokens in tokens_per_step.items():
    v = breakdown_summary["by_scope"].get(name)
    if v is None:
      continue
    t = v["time_per_step_s"]
    out[name] = {
        "tokens_per_step": tokens, "time_per_step_s": t, "share_of_step": v["share_of_step"],
        "time_per_token_s": t / tokens, "tokens_per_s": tokens / t if t > 0 else None,
        "flops_per_step": v["flops_per_step"], "bytes_per_step": v["bytes_per_step"],
        "bytes_per_token": v["bytes_per_step"] / tokens,
        "flops_per_byte": v["flops_per_step"] / v["bytes_per_step"] if v["bytes_per_step"]
        else None,
        "bytes_per_s": v["bytes_per_step"] / t if t > 0 else None,
        "by_class_s": v["by_class_s"]}
  return out


def format_phases(table: dict) -> str:
  lines = [f"  {'phase':<12s} {'ms/step':>9s} {'tokens':>7s} {'us/token':>9s} {'MB/token':>9s} "
           f"{'FLOP/byte':>9s} {'GB/s':>7s}"]
  for name, v in table.items():
    lines.append(
        f"  {name:<12s} {v['time_per_step_s'] * 1e3:9.3f} {v['tokens_per_step']:7d} "
        f"{v['time_per_token_s'] * 1e6:9.2f} {v['bytes_per_token'] / 1e6:9.3f} "
        f"{v['flops_per_byte'] or 0:9.2f} {(v['bytes_per_s'] or 0) / 1e9:7.2f}")
  return "\n".join(lines)
