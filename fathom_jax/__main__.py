"""fathom-jax, the one command (also `python -m fathom_jax`):

  fathom-jax run --workload=memnet [...]      a run, as `python run.py`
  fathom-jax study --workloads=all [...]      a study (python -m fathom_jax.study)
  fathom-jax breakdown <trace_dir> [...]      op breakdown of any JAX trace
  fathom-jax diff <run A> <run B> [...]       two runs compared, with intervals
  fathom-jax peaks [...]                      the machine's matmul and copy peaks
  fathom-jax --version

`python -m fathom_jax --workload=...` (flags first, no subcommand) is a run, as before.
"""

import runpy
import sys

COMMANDS = ("run", "study", "breakdown", "diff", "peaks")


def _usage() -> str:
  return __doc__.split("\n\n")[1]


def main(argv=None) -> int:
  from fathom_jax import errors
  errors.follow_parent()
  argv = list(sys.argv[1:] if argv is None else argv)
  prog = "fathom-jax"
  from fathom_jax import flagparse
  if not argv or argv[0] in ("-h", "--help", "help"):
    flagparse.print_and_exit(f"usage: {prog} <command> [flags]; {prog} <command> --help lists "
                             f"a command's flags\n{_usage()}")
  if argv[0] == "--version":
    import fathom_jax
    flagparse.print_and_exit(f"fathom_jax {fathom_jax.__version__}")
  command, rest = (argv[0], argv[1:]) if not argv[0].startswith("-") else ("run", argv)
  if command not in COMMANDS:
    print(f"error: unknown command {command!r}; commands are: {', '.join(COMMANDS)} "
          f"(`{prog} --help`)", file=sys.stderr)
    return 2
  if command in ("breakdown", "diff"):
    from fathom_jax.analysis import __main__ as analysis
    return analysis.main([command, *rest])
  if command == "peaks":
    from fathom_jax import peaks
    return peaks.main(rest)
  sys.argv = [f"{prog} {command}", *rest]
  if command == "study":
    runpy.run_module("fathom_jax.study", run_name="__main__", alter_sys=True)
    return 0
  from fathom_jax import cli
  cli.run()
  return 0


if __name__ == "__main__":
  sys.exit(main())
