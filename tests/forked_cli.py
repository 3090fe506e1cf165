"""Command lines run as forks of one warm process, for the suite's many bad-input checks.

Each check is a command that must fail in one line with exit status 2 before it computes
anything; started as `python run.py ...` it spends its time importing JAX, Flax and the project
(about 2 s on a small machine), dozens of times. Here one server process imports them once and
forks a child per command: the child is a new process for that command (its own flags, backend,
file descriptors and exit status) that starts where a fresh interpreter would be after its
imports. The server never starts a JAX backend, so nothing in it is threaded when it forks.

Commands that compute (runs, profiles, studies) still start with `subprocess`.
"""

import json
import os
import subprocess
import sys
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Reads one JSON request per line: {"argv": [script or "-m", module, args...], "cwd", "env"};
# answers one JSON line: {"returncode", "stdout", "stderr"}.
_SERVER = r"""
import json, os, runpy, sys, tempfile
import jax, flax.linen, optax  # noqa: F401  (the imports every command pays for)
# Modules that define command-line flags (fathom_jax.cli, the study's __main__) stay unimported:
# each command defines its own, in its child.
import fathom_jax.runner, fathom_jax.study, fathom_jax.analysis.breakdown  # noqa: F401
from fathom_jax.workloads import registry
for name in registry.expand("all"):
  registry.get(name)

def child(request, out, err):
  os.chdir(request["cwd"])
  malloc = os.environ.get("GLIBC_TUNABLES")  # this process's, read by glibc at its start
  os.environ.clear()
  os.environ.update(request["env"])
  if malloc and "GLIBC_TUNABLES" not in os.environ:
    os.environ["GLIBC_TUNABLES"] = malloc
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  os.dup2(out.fileno(), 1)
  os.dup2(err.fileno(), 2)
  argv = request["argv"]
  sys.orig_argv = [sys.executable] + argv  # what a command that restarts itself runs again
  code = 0
  try:
    if argv[0] == "-m":
      sys.argv = [argv[1]] + argv[2:]
      runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
      sys.argv = list(argv)
      sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
      runpy.run_path(argv[0], run_name="__main__")
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if not isinstance(e.code, (int, type(None))):
      print(e.code, file=sys.stderr)
  except BaseException:
    import traceback
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)

for line in sys.stdin:
  request = json.loads(line)
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
      child(request, out, err)
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    answer = {"returncode": os.waitstatus_to_exitcode(status),
              "stdout": out.read().decode(errors="replace"),
              "stderr": err.read().decode(errors="replace")}
  print(json.dumps(answer), flush=True)
"""


class Server:
  """One warm process; `run(argv)` is `subprocess.run([sys.executable, *argv], ...)` for a
  command that stops early."""

  def __init__(self):
    from fathom_jax import host_memory
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    # Started as run.py restarts itself (huge pages for malloc), so that its children need not.
    tunables = host_memory.tunables_with_huge_pages(env.get("GLIBC_TUNABLES", ""))
    if tunables is not None:
      env["GLIBC_TUNABLES"] = tunables
    self._proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    self._lock = threading.Lock()

  def run(self, *argv, cwd=None, env=None, timeout=120) -> subprocess.CompletedProcess:
    request = {"argv": list(argv), "cwd": cwd or ROOT, "env": dict(env or os.environ)}
    with self._lock:
      self._proc.stdin.write(json.dumps(request) + "\n")
      self._proc.stdin.flush()
      timer = threading.Timer(timeout, self._proc.kill)
      timer.start()
      line = self._proc.stdout.readline()
      timer.cancel()
    if not line:
      raise RuntimeError(f"the command server stopped (after {timeout} s?) on {argv}")
    answer = json.loads(line)
    return subprocess.CompletedProcess([sys.executable, *argv], answer["returncode"],
                                       answer["stdout"], answer["stderr"])

  def close(self):
    self._proc.stdin.close()
    self._proc.wait(timeout=30)
