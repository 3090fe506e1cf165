"""python -m fathom_jax.analysis breakdown <trace_dir> [--output_dir=DIR] [--hlo=FILE ...]
   python -m fathom_jax.analysis diff <run A> <run B> [--output_dir=DIR]

Op breakdown of any trace `jax.profiler.trace` wrote: ops.csv, component.csv, breakdown.json,
breakdown.png and a printed table. Steps come from step annotations
(jax.profiler.StepTraceAnnotation) where present, from program executions otherwise; an
annotated step that took more than 1.5x the median is left out as stalled (listed in
breakdown.json; --all_steps keeps it). The HLO is the one the trace embeds; HLO text files
beside the trace (*.optimized.hlo.txt, or XLA's *after_optimizations.txt from --xla_dump_to) or
given with --hlo serve where it does not. The diff compares two runs of one workload
(fathom_jax.analysis.diff). Bad input: one line on stderr, exit status 2.
"""

import glob
import os
import sys

from fathom_jax import flagparse

HLO_PATTERNS = ("*.optimized.hlo.txt", "*after_optimizations.txt")


def hlo_beside(trace_dir: str) -> list[str]:
  if not os.path.isdir(trace_dir):
    return []
  return sorted(p for pattern in HLO_PATTERNS
                for p in glob.glob(os.path.join(trace_dir, "**", pattern), recursive=True))


def main(argv=None) -> int:
  parser = flagparse.ArgumentParser(prog="python -m fathom_jax.analysis",
                   description="Op-category breakdown of a JAX profiler trace.")
  sub = parser.add_subparsers(dest="command", required=True)
  cmd = sub.add_parser("breakdown", help="ops.csv, breakdown.json, breakdown.png and a table")
  cmd.add_argument("trace_dir", help="a folder jax.profiler.trace wrote (or an .xplane.pb file)")
  cmd.add_argument("--output_dir", default=None, help="where to write (default: trace_dir)")
  cmd.add_argument("--hlo", action="append", default=[],
                   help="HLO text of a program the trace ran (if the trace embeds none)")
  cmd.add_argument("--title", default="", help="title of the table and figure")
  cmd.add_argument("--all_steps", action="store_true",
                   help="keep steps that took more than 1.5x the median step (left out by default)")
  cmd.add_argument("--component_depth", default="layer",
                   help="model components by the first N names of their op_name path: model, "
                        "block, layer, full or N (default: layer)")
  cmd = sub.add_parser("diff", help="two runs compared, with 95% intervals: diff.csv, diff.md, "
                                     "diff.png and a table")
  cmd.add_argument("a", help="run A: a run folder, a study point or a trace folder")
  cmd.add_argument("b", help="run B, compared against A (B - A)")
  cmd.add_argument("--output_dir", default="diff", help="where to write (default: ./diff)")
  cmd.add_argument("--component_depth", default="layer",
                   help="components compared at model, block, layer, full or N names "
                        "(default: layer)")
  args = parser.parse_args(argv)

  from fathom_jax.analysis import breakdown, components
  try:
    depth = components.depth_of(args.component_depth)
  except ValueError as e:
    parser.error(f"--component_depth: {e}")
  from fathom_jax import errors
  with errors.one_line_errors():
    if args.command == "diff":
      return _diff(args, depth)
    if args.output_dir:
      flagparse.check_output_dir(args.output_dir)
    unfinished = _unfinished_run(args.trace_dir)
    if unfinished:
      print(f"note: {unfinished}; the breakdown covers the steps its trace holds", flush=True)
    hlo_files = args.hlo + hlo_beside(args.trace_dir)
    output_dir = args.output_dir or (args.trace_dir if os.path.isdir(args.trace_dir)
                                     else os.path.dirname(os.path.abspath(args.trace_dir)))
    result, paths = breakdown.run(
        args.trace_dir, output_dir, hlo_files, args.title,
        stalled_step_factor=None if args.all_steps else breakdown.STALLED_STEP_FACTOR,
        component_depth=depth)
    print(breakdown.format_table(result.summary, args.title))
    for path in paths.values():
      print(f"  wrote {path}")
    return 0


def _unfinished_run(trace_dir: str) -> str:
  """Where `trace_dir` is a run folder whose result.json says it did not complete, what it
  says; otherwise '' (a completed run, or any other program's trace folder)."""
  from fathom_jax import results
  record = results.read_json_object(os.path.join(trace_dir, results.RESULT_FILE))
  if not record or "status" not in record or not results.unfinished(record):
    return ""
  return f"the run in {trace_dir} is {results.unfinished(record)}"


def _diff(args, depth) -> int:
  from fathom_jax.analysis import diff
  flagparse.check_output_dir(args.output_dir)
  _, table, paths = diff.run(args.a, args.b, args.output_dir, depth)
  print(table)
  for path in paths.values():
    print(f"  wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
