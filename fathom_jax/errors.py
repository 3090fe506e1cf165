"""Errors, and the one way every command reports them.

Exit statuses: 0 done; 1 the environment failed (a full disk, no permission, out of memory, a
run that could not finish); 2 the user's input was wrong (a flag, a path, a file's format);
130 interrupted by Ctrl-C; 143 terminated by SIGTERM. Each failure is one line on stderr;
`--debug` or FATHOM_JAX_DEBUG=1 shows the traceback of an unexpected one.
"""

import contextlib
import errno
import os
import signal
import sys
import threading
import traceback


class UsageError(Exception):
  """Bad user input: a flag, a preset, a config field, a path or a backend."""


class DataError(UsageError):
  """A dataset path that does not exist or whose files are not in the expected format."""


class RunFailed(Exception):
  """A run that started but could not finish: a non-finite loss, memory exhausted. The result
  file records it as failed; the command line exits 1."""


class Terminated(KeyboardInterrupt):
  """SIGTERM, handled as Ctrl-C is (an interrupted result), with its own exit status."""


EXIT_ENVIRONMENT, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143

# Errors of the machine, not of the input: named for what they are.
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this file system or its limit",
    errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system", errno.EIO: "input/output error",
    errno.ENOMEM: "out of memory",
}


# Errors of a path the user gave: the wrong kind of path, or none there.
_USAGE_ERRNOS = (errno.EISDIR, errno.ENOTDIR, errno.ENOENT, errno.ENAMETOOLONG)


def describe_os_error(e: OSError) -> str:
  cause = _ENVIRONMENT_ERRNOS.get(e.errno) or (e.strerror or type(e).__name__).lower()
  return f"{cause}: {e.filename}" if e.filename else cause


def os_error_in(message: str):
  """The OSError that a native library's error message reports by its C library text (XLA's
  profiler: 'RESOURCE_EXHAUSTED: <path>; No space left on device'), or None: a full disk must not
  read as memory exhausted."""
  for number in _ENVIRONMENT_ERRNOS:
    text = os.strerror(number)
    at = message.find(text)
    if at < 0:
      continue
    before = message[:at].rstrip("; :")
    path = before.rsplit(": ", 1)[-1] if ": " in before else None
    return OSError(number, text, path or None)
  return None


def debugging(flag: bool = False) -> bool:
  return flag or os.environ.get("FATHOM_JAX_DEBUG", "") not in ("", "0")


_received: list = []  # signals recorded by a deferring handler, not yet acted on


def _interruption(signum) -> KeyboardInterrupt:
  return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _raise_now(signum, frame):
  raise _interruption(signum)


def _record(signum, frame):
  """The first signal is recorded, for the command to act on at its next safe point (a signal
  raised inside a native call or a garbage-collection callback is lost or crashes the runtime);
  a second one interrupts at once."""
  if _received:
    raise _interruption(signum)
  _received.append(signum)


def pending() -> bool:
  return bool(_received)


def raise_if_interrupted() -> None:
  """At a safe point: the interruption a recorded signal asked for, if one did."""
  if _received:
    raise _interruption(_received[0])


@contextlib.contextmanager
def one_line_errors(debug: bool = False, interrupted: str = "", defer_signals: bool = False):
  """Runs a command's body; any failure leaves as one line on stderr and its exit status. SIGTERM
  is handled as Ctrl-C is (as `Terminated`, a KeyboardInterrupt). With `defer_signals`, the
  first of them is recorded and acted on where the body calls `raise_if_interrupted`."""
  if threading.current_thread() is threading.main_thread():
    _received.clear()
    handler = _record if defer_signals else _raise_now
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
  try:
    yield
  except UsageError as e:
    _exit(f"error: {e}", EXIT_USAGE)
  except RunFailed as e:
    _exit(f"error: {e}", EXIT_ENVIRONMENT)
  except Terminated:
    _exit("terminated" + (f": {interrupted}" if interrupted else ""), EXIT_TERMINATED)
  except KeyboardInterrupt:
    _exit("interrupted" + (f": {interrupted}" if interrupted else ""), EXIT_INTERRUPTED)
  except MemoryError:
    _exit("error: out of memory", EXIT_ENVIRONMENT)
  except OSError as e:
    if debugging(debug):
      traceback.print_exc()
    _exit(f"error: {describe_os_error(e)}",
          EXIT_USAGE if e.errno in _USAGE_ERRNOS and e.filename else EXIT_ENVIRONMENT)
  except Exception as e:  # a bug, or a failure no one foresaw: still one line, unless asked
    if debugging(debug):
      traceback.print_exc()
    cause = os_error_in(str(e))
    if cause is not None:
      _exit(f"error: {describe_os_error(cause)}", EXIT_ENVIRONMENT)
    first = (str(e).splitlines() or [""])[0]
    _exit(f"error: {type(e).__name__}: {first} (--debug or FATHOM_JAX_DEBUG=1 shows the "
          "traceback)", EXIT_ENVIRONMENT)


def _exit(message: str, status: int) -> None:
  try:
    sys.stdout.flush()
  except (OSError, ValueError):
    pass
  print(message, file=sys.stderr, flush=True)
  sys.exit(status)


PARENT_VARIABLE = "FATHOM_JAX_PARENT_PID"  # set by a study for the processes of its points


def follow_parent() -> None:
  """In a process a study started: the kernel sends it SIGKILL when the study dies, however the
  study dies (Linux), so no run of a killed study goes on measuring beside a resumed one. Set
  here, at the start of the child, not between fork and exec: the study has threads."""
  parent = os.environ.get(PARENT_VARIABLE)
  if not parent or not sys.platform.startswith("linux"):
    return
  try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return
  if parent.isdigit() and os.getppid() != int(parent):  # the study died before the call
    os._exit(EXIT_TERMINATED)
