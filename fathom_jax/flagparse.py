"""Flag parsing for the command lines (run.py and the study with absl, the analysis and peaks
commands with argparse): a bad flag is one line on stderr and exit status 2, not a usage dump;
--help lists a command's flags in groups."""

import argparse
import os
import re
import sys
import tempfile

from absl import flags

from fathom_jax.errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
  """argparse, with a bad argument as one line on stderr and exit status 2."""

  def error(self, message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


_HELP: dict = {}  # the command's usage line and flag groups, set by the command's module
HELP_FLAGS = ("-h", "--help", "-?", "--helpshort")


def set_help(usage: str, groups: list[tuple[str, list[str]]]) -> None:
  """What --help prints: `usage`, then each group's flags with defaults and descriptions."""
  _HELP.update(usage=usage, groups=groups)


def _first_sentence(text: str, width: int) -> str:
  text = " ".join(text.split())
  end = text.find(". ")
  text = text if end < 0 else text[:end + 1]
  return text if len(text) <= width else text[:width - 3].rstrip() + "..."


def format_help() -> str:
  lines = [_HELP["usage"], ""]
  for title, names in _HELP["groups"]:
    lines.append(f"{title}:")
    for name in names:
      flag = flags.FLAGS[name]
      text = re.sub(r"^<[^>]*>: ", "", flag.help).replace(
          ";\n    repeat this option to specify a list of values", "")
      text = re.sub(r";\s*repeat this option to specify a list of values", " (repeatable)", text)
      default = flag.default_as_str.strip("'") if flag.default not in (None, []) else ""
      head = f"  --{name}" + (f"={default}" if default else "")
      choices = getattr(flag.parser, "enum_values", None)
      if choices:
        text = f"{'|'.join(choices)}: {text}"
      lines.append(f"{head:<30s} {_first_sentence(text, 80)}" if len(head) < 30 else
                   f"{head}\n{'':<30s} {_first_sentence(text, 80)}")
    lines.append("")
  lines.append("--helpfull lists every flag, absl's included.")
  return "\n".join(lines)


def print_and_exit(text: str, status: int = 0) -> None:
  """Prints `text` and exits; a reader that stops early (`| head`) is no error."""
  try:
    print(text)
    sys.stdout.flush()
  except BrokenPipeError:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
  if _HELP and any(a in HELP_FLAGS for a in argv[1:]):
    print_and_exit(format_help())
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


def check_coordinator_address(address: str) -> None:
  """host:port, [IPv6]:port; the port in 1..65535."""
  host, sep, port = address.rpartition(":")
  if not sep or not host or host in ("[", "[]") or not port.isdigit() or not 0 < int(port) < 65536:
    raise UsageError(f"--coordinator_address must be host:port with a port in 1..65535, got "
                     f"{address!r}")


def check_output_dir(path: str, flag: str = "output_dir") -> None:
  """The folder exists and takes files, or can be made: tried in its nearest existing folder, so
  that nothing is left behind when a later check fails."""
  if not path:
    raise UsageError(f"--{flag} is empty")
  target = os.path.abspath(path)
  if os.path.exists(target) and not os.path.isdir(target):
    raise UsageError(f"--{flag} {path} is a file, not a folder")
  existing = target
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UsageError(f"--{flag} {path} lies under {existing}, which is a file")
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".fathom-jax-check-", dir=existing))
  except OSError as e:
    raise UsageError(f"--{flag} {path} cannot be written: {e.strerror.lower()} "
                     f"({existing})") from None
