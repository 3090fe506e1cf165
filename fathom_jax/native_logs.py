"""Native log lines that tell a user nothing, kept off the terminal.

With an accelerator plugin installed on a machine without its hardware (the 'targets' extra on a
CPU machine), importing JAX and starting its backends make the plugin's C++ code log that it found
no driver, before Python can say anything. Those lines break the promise that a bad command is
one line on stderr. Errors still surface: as Python exceptions, after stderr is restored.
"""

import contextlib
import os
import sys


@contextlib.contextmanager
def silenced():
  """File descriptor 2 points at /dev/null inside the block (native code writes there)."""
  sys.stderr.flush()
  saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(null, 2)
  try:
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(null)


def import_jax():
  """`import jax` with the plugins' native start-up lines discarded."""
  with silenced():
    import jax
  return jax


def start_backends():
  """JAX's backends started with the plugins' native lines discarded; a backend that fails to
  start is reported later, by the code that asks for it."""
  jax = import_jax()
  with silenced():
    try:
      jax.devices()
    except RuntimeError:
      pass
