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

import ctypes
import sys

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# One arena: a thread arena's heaps are at most 64 MB, so larger blocks were mmap'd whatever
# M_MMAP_MAX said. No mmap'd blocks: they go back to the kernel when freed. No trimming (-1):
# the top of the heap is kept however much of it is free.
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))

_kept = False


def keep_freed_memory() -> bool:
  """Makes glibc's malloc keep freed memory for reuse in this process. Call it before JAX
  creates its threads (a thread keeps the arena it first allocated from). Returns whether the
  settings took effect: False off Linux or with another C library."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  global _kept
  _kept = all(mallopt(param, value) == 1 for param, value in _SETTINGS)
  return _kept


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
