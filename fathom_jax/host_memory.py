"""How the host's allocator treats freed memory, set before JAX starts its threads.

XLA's CPU runtime allocates each execution's temporary buffer (645 MB for a ResNet-50 train
step at batch 8) and Eigen's scratch buffers with malloc, and frees them when the step ends.
glibc serves an allocation this large from a thread's arena by mmap and returns it to the
kernel on free, so every step faulted in and zeroed the same memory again: 185,000 page faults
and 0.3 CPU-seconds in the kernel per ResNet-50 step, 17% of the step. One arena that never
hands freed memory back reuses the same pages from step to step (ResNet-50 1.21x faster).

One arena is also one lock: steps of a few milliseconds, whose threads allocate small buffers
all the time, ran 5-15% slower with it (autoenc, deepq). So runs keep freed memory only for the
workloads that declare large buffers (`Workload.large_host_buffers`) at the paper sizes.
"""

import contextlib
import ctypes
import os
import sys

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# One arena: a thread arena's heaps are at most 64 MB, so larger blocks were mmap'd whatever
# M_MMAP_MAX said. No mmap'd blocks: they go back to the kernel when freed. No trimming (-1):
# the top of the heap is kept however much of it is free.
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))

HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
_GLIBC_MMAP_MAX = 65536  # glibc's default: blocks over the threshold are mapped

_kept = False


def _mallopt():
  mallopt = ctypes.CDLL(None).mallopt
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  return mallopt


def keep_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse in this process. Call it before JAX
  creates its threads (a thread keeps the arena it first allocated from). Returns whether the
  settings took effect: False off Linux or with another C library."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = _mallopt()
  except (OSError, AttributeError):
    return False
  global _kept
  _kept = all(mallopt(param, value) == 1 for param, value in _SETTINGS)
  return _kept


@contextlib.contextmanager
def large_blocks_returned(threshold_bytes: int = 32 << 20):
  """While active, a process that keeps freed memory maps each block of at least
  `threshold_bytes` that its heap's free memory cannot hold, and returns it to the kernel when
  freed, as a process that does not keep memory would; outside, the heap grows by it for good.

  For profiled steps: under the JAX profiler the one heap fragments, so each step's temporary
  buffer no longer fitted where the last one had been freed. The heap grew by it every step
  (157 MB for ResNet-50's batch-8 inference, 1.3 GB over 10 steps) and the step ran 2.5x
  slower, the time charged to whichever ops first touched the new pages. A mapped block costs
  a step its page faults, as without kept memory, and no more (fewer with huge pages,
  `restart_with_huge_pages`). Does nothing where freed memory is not kept."""
  if not _kept:
    yield
    return
  mallopt = _mallopt()
  mallopt(_M_MMAP_THRESHOLD, threshold_bytes)
  mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
  try:
    yield
  finally:
    mallopt(_M_MMAP_MAX, 0)


def _glibc_version() -> tuple[int, ...]:
  """(major, minor) of the C library, or () where it is not glibc."""
  try:
    version = ctypes.CDLL(None).gnu_get_libc_version
  except (OSError, AttributeError):
    return ()
  version.restype = ctypes.c_char_p
  return tuple(int(part) for part in version().decode().split(".")[:2])


def tunables_with_huge_pages(tunables: str) -> str | None:
  """GLIBC_TUNABLES with malloc's transparent-huge-page setting added, or None where it names
  one already (the user's choice stands)."""
  entries = [t for t in tunables.split(":") if t]
  if any(t.split("=", 1)[0] == HUGE_PAGES_TUNABLE for t in entries):
    return None
  return ":".join(entries + [f"{HUGE_PAGES_TUNABLE}=1"])


def restart_with_huge_pages() -> None:
  """Runs this process again, same interpreter and arguments, with glibc's malloc asking the
  kernel for transparent huge pages for its large blocks (tunables are read only at start-up).
  Returns, doing nothing, where that is set already or the C library is not glibc 2.35 or later.

  Each step's temporary buffers are hundreds of megabytes; in 4 KB pages a step that maps them
  afresh takes 210,000 page faults (ResNet-50's batch-8 train step). In 2 MB pages it takes
  about 1,000, and that step ran in 572 ms instead of 721; with kept memory, steps were within
  noise of those without huge pages. Where the kernel's policy is 'never', the request is
  ignored."""
  if not sys.platform.startswith("linux") or _glibc_version() < (2, 35):
    return
  tunables = tunables_with_huge_pages(os.environ.get("GLIBC_TUNABLES", ""))
  if tunables is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": tunables})


def huge_pages() -> bool:
  """Whether glibc's malloc was started asking for transparent huge pages."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  return f"{HUGE_PAGES_TUNABLE}=1" in tunables.split(":")


def kept() -> bool:
  """Whether this process keeps freed memory (`keep_freed_memory` took effect)."""
  return _kept


def wanted(setting: str, workloads, preset: str) -> bool:
  """Whether a process that runs these workloads at this preset keeps freed memory, for the
  --host_memory setting 'keep', 'return' or 'auto' (keep where any of them declares large
  buffers, at the paper sizes)."""
  if setting != "auto":
    return setting == "keep"
  return preset == "paper" and any(w.large_host_buffers for w in workloads)
