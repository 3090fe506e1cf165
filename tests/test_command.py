"""The user's surface: --help on every command, the fathom-jax command, --version."""

import os
import re
import subprocess
import sys

import pytest

import fathom_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FLAGS_OF = """
import sys, importlib
from absl import flags
module = importlib.import_module(sys.argv[1])
print(" ".join(sorted(f.name for f in flags.FLAGS.flags_by_module_dict()[module.__name__])))
"""


def _defined_flags(module: str) -> set[str]:
  proc = subprocess.run([sys.executable, "-c", _FLAGS_OF, module], capture_output=True,
                        text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr
  return set(proc.stdout.split())


@pytest.mark.parametrize("command, module", [
    (("run.py",), "fathom_jax.cli"),
    (("-m", "fathom_jax.study"), "fathom_jax.study.__main__"),
])
def test_help_lists_every_flag_grouped_in_under_60_lines(command, module, forked_cli):
  proc = forked_cli.run(*command, "--help", cwd=ROOT)
  assert proc.returncode == 0 and proc.stderr == "", proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) <= 60 and lines[0].startswith("usage: ")
  shown = re.findall(r"^  --(\w+)", proc.stdout, re.M)
  assert len(shown) == len(set(shown))
  assert set(shown) == _defined_flags(module)
  assert all(len(line) <= 120 for line in lines)
  # Groups with headings, and defaults beside their flags.
  assert len(re.findall(r"^\w[\w -]*:$", proc.stdout, re.M)) >= 3
  assert "--steps=" in proc.stdout


@pytest.mark.parametrize("args", [(), ("--help",)])
def test_the_command_lists_its_subcommands(args, forked_cli):
  proc = forked_cli.run("-m", "fathom_jax", *args)
  assert proc.returncode == 0
  for command in ("run", "study", "breakdown", "diff", "peaks"):
    assert f"fathom-jax {command} " in proc.stdout


def test_version_and_unknown_commands(forked_cli):
  proc = forked_cli.run("-m", "fathom_jax", "--version")
  assert proc.returncode == 0 and proc.stdout.strip() == f"fathom_jax {fathom_jax.__version__}"
  proc = forked_cli.run("-m", "fathom_jax", "nope")
  assert proc.returncode == 2 and proc.stderr.count("\n") == 1
  assert "unknown command 'nope'" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (("run", "--workload=nosuch"), "unknown workload"),
    (("--workload=nosuch",), "unknown workload"),  # flags first: a run, as before
    (("study", "--steps=0"), "--steps must be positive"),
    (("breakdown", "/no/such/folder"), "no such trace folder"),
    (("diff", "/no/such/a", "/no/such/b"), "does not exist"),
    (("peaks", "--dtype=int3"), "--dtype"),
])
def test_subcommands_reach_their_commands(args, message, forked_cli, tmp_path):
  proc = forked_cli.run("-m", "fathom_jax", *args, cwd=str(tmp_path))
  assert proc.returncode == 2, proc.stderr
  assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_the_console_script_is_installed():
  script = os.path.join(os.path.dirname(sys.executable), "fathom-jax")
  proc = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == f"fathom_jax {fathom_jax.__version__}"
