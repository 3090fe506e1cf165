"""Backend selection and a description of the machine and software a run used."""

import datetime
import functools
import os
import platform
import shlex
import socket
import subprocess
import sys

import jax

from fathom_jax import host_memory
from fathom_jax.errors import UsageError

BACKENDS = ("cpu", "gpu", "tpu")


# Accelerator plugins and the device files their hardware shows on Linux.
_PLUGINS = {
    "cuda": (("jax_cuda12_plugin", "jax_cuda13_plugin"), ("/dev/nvidia0", "/dev/nvidiactl")),
    "rocm": (("jax_rocm_plugin", "jax_rocm7_plugin"), ("/dev/kfd",)),
    "tpu": (("libtpu",), ("/dev/accel0", "/dev/vfio/0")),
}


def skip_absent_accelerators() -> None:
  """Starts JAX on the CPU alone where an accelerator plugin is installed (as for compiling to a
  --target) but no such device is: otherwise the plugin logs a traceback of its failed start
  before JAX falls back to the CPU. Call before JAX's first use of a backend; a JAX_PLATFORMS
  setting of the user's stands."""
  if os.environ.get("JAX_PLATFORMS"):
    return
  if not accelerators_present():
    jax.config.update("jax_platforms", "cpu")


def accelerators_present() -> list[str]:
  """The accelerator platforms whose plugin is installed and whose devices this machine has."""
  import importlib.util
  return [p for p, (modules, files) in _PLUGINS.items()
          if any(importlib.util.find_spec(m) is not None for m in modules)
          and any(os.path.exists(f) for f in files)]


def available_backends() -> list[str]:
  found = []
  for name in BACKENDS:
    try:
      if jax.devices(name):
        found.append(name)
    except RuntimeError:
      pass
  return found


def select_devices(backend: str | None) -> list:
  """The devices of `backend` (JAX's default backend when None), or a UsageError naming those present."""
  if backend is None:
    return jax.devices()
  try:
    return jax.devices(backend)
  except RuntimeError:
    raise UsageError(
        f"backend {backend!r} is not available on this machine; available: "
        f"{', '.join(available_backends()) or 'none'}") from None


def _version(module_name: str) -> str | None:
  try:
    module = __import__(module_name)
    return getattr(module, "__version__", None)
  except ImportError:
    return None


def _cpu_model() -> str:
  """The CPU's marketing name where the OS tells it (platform.processor() is often just 'x86_64')."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _checkout() -> dict:
  """The git commit of the checkout fathom_jax runs from, and whether its tree had changes;
  empty when it runs from an installed copy."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.exists(os.path.join(root, ".git")):
    return {}
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=10)
    status = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                            capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return {}
  if commit.returncode != 0 or status.returncode != 0:
    return {}
  return {"git_commit": commit.stdout.strip(), "git_dirty": bool(status.stdout.strip())}


def provenance() -> dict:
  """What produced a result: fathom_jax's version and checkout, the command line, and when it
  started (UTC, ISO 8601); the runner adds the duration when it ends."""
  import fathom_jax
  return {
      "fathom_jax": fathom_jax.__version__,
      **_checkout(),
      "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
      "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def describe(devices) -> dict:
  device = devices[0]
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:
    affinity = os.cpu_count()
  return {
      "python": sys.version.split()[0],
      "platform": platform.platform(),
      "processor": _cpu_model(),
      "hostname": socket.gethostname(),
      "cpu_count": os.cpu_count(),
      "cpu_affinity": affinity,
      "host_memory_reused": host_memory.kept(),
      "huge_pages": host_memory.huge_pages(),
      "jax": jax.__version__,
      "jaxlib": _version("jaxlib"),
      "flax": _version("flax"),
      "optax": _version("optax"),
      "numpy": _version("numpy"),
      "backend": device.platform,
      "device_kind": device.device_kind,
      "device_count": len(devices),
      "process_count": jax.process_count(),
  }
