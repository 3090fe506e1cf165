"""Workload names -> workloads. Modules are imported on first use, so a run pays only for the
workloads it asks for."""

import importlib
import importlib.util

from fathom_jax.errors import UsageError
from fathom_jax.workloads import base

# Paper order (Fathom, IISWC 2016, Table I).
_MODULES = {
    "seq2seq": "fathom_jax.workloads.seq2seq",
    "memnet": "fathom_jax.workloads.memnet",
    "speech": "fathom_jax.workloads.speech",
    "autoenc": "fathom_jax.workloads.autoenc",
    "residual": "fathom_jax.workloads.residual",
    "vgg": "fathom_jax.workloads.vgg",
    "alexnet": "fathom_jax.workloads.alexnet",
    "deepq": "fathom_jax.workloads.deepq",
    # Not one of 2016's eight: the model that reference suites are asked about first today.
    "transformer": "fathom_jax.workloads.transformer",
}


def available() -> list[str]:
  """Names of the workloads whose module is present in this installation."""
  return [name for name, module in _MODULES.items() if importlib.util.find_spec(module)]


def get(name: str) -> base.Workload:
  if name not in _MODULES or name not in available():
    raise UsageError(f"unknown workload {name!r}; workloads are: {', '.join(available())}")
  return importlib.import_module(_MODULES[name]).WORKLOAD


def expand(names: str, flag: str = "workload") -> list[str]:
  """'all', one name, or a comma list -> validated list of names (`flag` names the flag that
  gave them, for the error)."""
  names = names.strip()
  if names == "all":
    return available()
  wanted = [n.strip() for n in names.split(",")]
  if not any(wanted):
    raise UsageError(f"--{flag} is empty; give a name, a comma list or 'all'")
  if not all(wanted):
    raise UsageError(f"--{flag} {names!r} has an empty item; give names separated by commas")
  repeated = sorted({n for n in wanted if wanted.count(n) > 1})
  if repeated:
    raise UsageError(f"--{flag} names {', '.join(repeated)} more than once")
  for n in wanted:
    get(n)
  return wanted
