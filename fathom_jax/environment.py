"""Backend selection and a description of the machine and software a run used."""

import os
import platform
import socket
import sys

import jax

from fathom_jax import host_memory
from fathom_jax.errors import UsageError

BACKENDS = ("cpu", "gpu", "tpu")


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
