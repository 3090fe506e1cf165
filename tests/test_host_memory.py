"""Freed host memory is kept for reuse: a second allocation of the same size faults no pages."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates, touches and frees 256 MB twice from a worker thread, as XLA's runtime does with a
# step's temporary buffer, and prints the page faults of each round (pages of 4 KB, or 2 MB where
# the kernel backs the buffer with huge pages).
_PROBE = """
import ctypes, resource, sys, threading
sys.path.insert(0, {root!r})
from fathom_jax import host_memory
kept = {keep} and host_memory.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
faults = []
def rounds():
  for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = libc.malloc(256 << 20)
    ctypes.memset(buffer, 1, 256 << 20)
    libc.free(buffer)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=rounds)
thread.start()
thread.join()
print(kept, *faults)
"""


def _faults(keep: bool) -> tuple[bool, int, int]:
  out = subprocess.run([sys.executable, "-c", _PROBE.format(root=ROOT, keep=keep)],
                       capture_output=True, text=True, check=True, timeout=120).stdout.split()
  return out[0] == "True", int(out[1]), int(out[2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_not_faulted_in_again():
  kept, first, second = _faults(keep=True)
  assert kept and first >= 100 and second < first // 10
  # The default: the second round faults the buffer in again.
  kept, first, second = _faults(keep=False)
  assert not kept and second > first // 2
