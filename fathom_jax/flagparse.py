"""absl flag parsing for the command lines (run.py, the study): a bad flag is one line on stderr
and exit status 2, not absl's usage dump."""

import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}".splitlines()[0], file=sys.stderr)
    sys.exit(2)
  if len(rest) > 1:
    print(f"error: unexpected arguments: {' '.join(rest[1:])} (flags are --name=value)",
          file=sys.stderr)
    sys.exit(2)
  return rest
