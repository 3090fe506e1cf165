"""Host memory: freed memory kept for reuse (a second allocation of the same size faults no
pages), large blocks mapped afresh while profiling, and huge pages asked of glibc's malloc."""

import os
import subprocess
import sys

import pytest

from fathom_jax import host_memory

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


# Rounds as above, from the main thread, of 256 MB, then of 512 MB (more than the heap holds free)
# inside host_memory.large_blocks_returned(), then of 512 MB after it.
_PROFILED_PROBE = """
import ctypes, resource, sys
sys.path.insert(0, {root!r})
from fathom_jax import host_memory
assert host_memory.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
def faults(mb):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  buffer = libc.malloc(mb << 20)
  ctypes.memset(buffer, 1, mb << 20)
  libc.free(buffer)
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
rounds = [faults(256), faults(256)]
with host_memory.large_blocks_returned():
  rounds += [faults(512), faults(512)]
print(*rounds, faults(512), faults(512))
"""


def _without_tunables() -> dict:
  return {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_are_mapped_afresh_only_inside_the_context():
  out = subprocess.run([sys.executable, "-c", _PROFILED_PROBE.format(root=ROOT)],
                       capture_output=True, text=True, check=True, timeout=120,
                       env=_without_tunables()).stdout.split()
  first, second, inside_1, inside_2, after_1, after_2 = map(int, out)
  assert first >= 100 and second < first // 10
  # Inside, a block the kept heap cannot hold is mapped, returned when freed, and faulted in
  # again by the next round, where the heap would have grown by it.
  assert inside_1 > first and inside_2 > first
  # After, the heap grows by it once and serves it again.
  assert after_1 > first // 2 and after_2 < first // 10


def test_tunables_with_huge_pages():
  assert host_memory.tunables_with_huge_pages("") == "glibc.malloc.hugetlb=1"
  assert (host_memory.tunables_with_huge_pages("glibc.malloc.arena_max=2")
          == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
  # A setting the user made stands, whatever its value.
  assert host_memory.tunables_with_huge_pages("glibc.malloc.hugetlb=0") is None
  assert host_memory.tunables_with_huge_pages("a.b=1:glibc.malloc.hugetlb=2") is None


_RESTART_PROBE = """
import os, sys
sys.path.insert(0, {root!r})
with open({log!r}, "a") as f:
  f.write(os.environ.get("GLIBC_TUNABLES", "-") + " " + " ".join(sys.argv[1:]) + "\\n")
from fathom_jax import host_memory
host_memory.restart_with_huge_pages()
print(host_memory.huge_pages())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory._glibc_version() < (2, 35),
                    reason="glibc 2.35's malloc.hugetlb tunable")
def test_restart_with_huge_pages_runs_the_process_again_once(tmp_path):
  log = tmp_path / "starts.txt"
  proc = subprocess.run([sys.executable, "-c", _RESTART_PROBE.format(root=ROOT, log=str(log)),
                         "--flag=1"], capture_output=True, text=True, timeout=120,
                        env={**_without_tunables(), "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.split() == ["True"]
  # Started twice, with the same arguments, the user's tunables kept.
  assert log.read_text().splitlines() == [
      "glibc.malloc.arena_max=4 --flag=1",
      "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1 --flag=1"]


def _thp_possible() -> bool:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[never]" not in f.read()
  except OSError:
    return False


@pytest.mark.skipif(not _thp_possible() or host_memory._glibc_version() < (2, 35),
                    reason="transparent huge pages and glibc 2.35's malloc.hugetlb tunable")
def test_huge_pages_cut_the_page_faults_of_a_mapped_buffer():
  def faults(tunables):
    env = {**_without_tunables(), **({"GLIBC_TUNABLES": tunables} if tunables else {})}
    out = subprocess.run([sys.executable, "-c", _PROBE.format(root=ROOT, keep=False)],
                         capture_output=True, text=True, check=True, timeout=120,
                         env=env).stdout.split()
    return int(out[2])  # the second round: the block mapped afresh and faulted in again
  small_pages, huge_pages = faults(""), faults("glibc.malloc.hugetlb=1")
  assert small_pages >= (256 << 20) // 4096 // 2  # most of its 65,536 pages of 4 KB
  assert huge_pages < small_pages // 8
