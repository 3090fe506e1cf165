"""The tuned implementation: the reference workloads rewritten where XLA's CPU backend measured
faster, one module per workload, with the layers, custom gradients and compiler options they
share beside them.

Each tuned model computes what its reference model computes (the same variables, names and
shapes; the same loss, gradients and outputs to float32 rounding: tests/test_implementations.py)
and changes only how XLA computes it. A piece applies only on a backend where it was measured to
pay; today that is the CPU, so the tuned implementation runs only there. The measurements are in
benchmarks/NOTES.md.

  layers     convolution, dense, batch norm and max pooling layers, materialize and relayout,
             and the XLA CPU options of the library kernels (Eigen, YNNPACK)
  winograd   3x3 convolutions by Winograd's algorithm
  softmax    cross-entropy, logits and argmax over large vocabularies
  <name>     the workload's tuned build(config, dtype, options) -> Model, and its Options: the
             choices that belong to the tuning, not to the paper's model (Winograd's algorithm,
             stages stored channels first), set like config fields with --override
"""

import dataclasses
import importlib

from fathom_jax import config as config_lib
from fathom_jax.errors import UsageError
from fathom_jax.workloads import base

PLATFORMS = ("cpu",)  # where the tuning was measured to pay
IMPLEMENTATIONS = ("reference", "tuned")
# Workloads with a tuned module; the others' tuned build is their reference build.
TUNED = ("alexnet", "vgg", "residual", "memnet", "seq2seq", "speech", "deepq")


def default(platform: str) -> str:
  """The implementation a run gets when it names none: tuned where it was measured."""
  return "tuned" if platform in PLATFORMS else "reference"


def choose(requested, platform: str) -> str:
  """The implementation to run on `platform`, or a UsageError for one that does not apply."""
  if requested is None:
    return default(platform)
  if requested not in IMPLEMENTATIONS:
    raise UsageError(f"unknown implementation {requested!r}; implementations are: "
                     f"{', '.join(IMPLEMENTATIONS)}")
  if requested == "tuned" and platform not in PLATFORMS:
    raise UsageError(f"--implementation=tuned applies on {', '.join(PLATFORMS)} only, where it "
                     f"was measured; on {platform} run --implementation=reference")
  return requested


def options_class(workload_name: str):
  """The dataclass of the workload's tuned options, or None where its tuning has none."""
  if workload_name not in TUNED:
    return None
  return getattr(importlib.import_module(f"fathom_jax.tuned.{workload_name}"), "Options", None)


def split_overrides(workload_name: str, overrides) -> tuple[tuple, tuple]:
  """(the workload config's overrides, the tuned options' overrides) of `field=value` strings."""
  options = options_class(workload_name)
  names = set(config_lib.field_names(options)) if options else set()
  mine = tuple(o for o in overrides if o.partition("=")[0].strip() in names)
  return tuple(o for o in overrides if o not in mine), mine


def make_options(workload_name: str, overrides=()):
  """The workload's tuned options with `field=value` overrides; None where its tuning has none."""
  options = options_class(workload_name)
  if options is None:
    if overrides:
      raise UsageError(f"override {overrides[0]!r}: {workload_name}'s tuning has no options")
    return None
  return config_lib.apply_overrides(options(), overrides)


def build(workload: base.Workload, config, dtype: str, options=None) -> base.Model:
  """The workload's tuned model, with `options` (make_options) or the defaults."""
  if workload.name not in TUNED:
    return workload.build(config, dtype)  # nothing measured to pay: the reference
  from fathom_jax.tuned import updates
  module = importlib.import_module(f"fathom_jax.tuned.{workload.name}")
  model = module.build(config, dtype) if options is None else module.build(config, dtype, options)
  return dataclasses.replace(model, before_update=updates.after_backward)
