"""A breakdown of a compiled program without running it: FLOPs, bytes and an estimated time per
Fathom class and per XLA category, from the HLO alone.

Every op the program launches is counted as often as it runs (loop bodies times their trip
counts; a conditional's costliest branch). An op's estimated time is the larger of its FLOPs
over the device's peak and its bytes over the device's memory bandwidth: a roofline bound with
perfect overlap and no launch cost, so it is a floor, always labelled an estimate. Matrix work
(dots, convolutions, GEMM and convolution library calls) is held to the matrix peak; everything
else to the vector peak where the device states one, else to memory bandwidth alone.
"""

import dataclasses
from typing import Iterator, Optional

from fathom_jax.analysis import categories, components, cost, hlo

STATIC_FILE = "static.json"  # a run folder's static breakdown (run.py --target)

# Launched ops that do no work of their own: they name, forward or sequence buffers, or wait for
# the async op their start launched (whose start carries the work).
_NOT_LAUNCHED = cost.FREE | frozenset({
    "while", "conditional", "call", "async-update", "async-done", "copy-done", "slice-done",
    "all-reduce-done", "all-gather-done", "collective-permute-done", "send-done", "recv-done"})
_MATRIX_CLASSES = (categories.MATRIX, categories.CONVOLUTION)


@dataclasses.dataclass(frozen=True)
class Peaks:
  """What the estimate divides by: FLOP/s of matrix units and of vector units (None where not
  stated) and bytes/s of device memory."""
  matrix_flops_per_s: float
  memory_bytes_per_s: float
  vector_flops_per_s: Optional[float] = None


def launched_ops(module: hlo.Module, model: Optional[cost.CostModel] = None
                 ) -> Iterator[tuple[hlo.Instruction, float]]:
  """(op, times it runs per execution of the program) for every op the program launches."""
  model = model or cost.CostModel(module)

  def walk(computation: str, times: float):
    comp = module.computations.get(computation)
    if comp is None:
      return
    for inst in comp.instructions:
      if inst.opcode == "while":
        trips = hlo.trip_count(inst, module) or 1
        for called in inst.called:
          yield from walk(called, times * trips)
      elif inst.opcode == "conditional":
        branches = sorted(inst.called, key=lambda c: model.computation(c).work, reverse=True)
        if branches:
          yield from walk(branches[0], times)
      elif inst.opcode in ("call", "async-start"):
        for called in inst.called:
          yield from walk(called, times)
      elif inst.opcode not in _NOT_LAUNCHED:
        yield inst, times
  yield from walk(module.entry, 1.0)


def _seconds(flops: float, nbytes: float, matrix: bool, peaks: Peaks) -> float:
  compute = peaks.matrix_flops_per_s if matrix else peaks.vector_flops_per_s
  flop_time = flops / compute if compute else 0.0
  return max(flop_time, nbytes / peaks.memory_bytes_per_s)


def analyse(module: hlo.Module, peaks: Peaks) -> dict:
  """Per class and per XLA category: FLOPs, bytes and estimated seconds per execution; op,
  fusion and library-call counts; the estimated step time."""
  model = cost.CostModel(module)
  by_class: dict[str, dict] = {}
  by_category: dict[str, dict] = {}
  by_component: dict[str, dict] = {}  # 'path|pass' at full depth
  launches = fusions = library_calls = 0
  total_seconds = 0.0

  def add(table, key, flops, nbytes, seconds):
    row = table.setdefault(key, {"flops": 0.0, "bytes": 0.0, "estimated_s": 0.0})
    row["flops"] += flops
    row["bytes"] += nbytes
    row["estimated_s"] += seconds

  for inst, times in launched_ops(module, model):
    c = model.instruction(inst.name)
    shares = categories.class_shares(inst, module, model)
    matrix_share = sum(v for k, v in shares.items() if k in _MATRIX_CLASSES)
    # Matrix and other work of one kernel, each held to its own unit; the kernel takes the
    # longer of the two, or the memory time.
    flops, nbytes = c.flops * times, c.bytes * times
    seconds = max(_seconds(flops * matrix_share, nbytes, True, peaks),
                  _seconds(flops * (1 - matrix_share), nbytes, False, peaks))
    for cls, share in shares.items():
      add(by_class, cls, flops * share, nbytes * share, seconds * share)
    add(by_category, categories.refined_category(inst, module), flops, nbytes, seconds)
    for (path, pass_, _), share in components.shares(inst, module, model).items():
      add(by_component, f"{components.name(path, None)}|{pass_}", flops * share,
          nbytes * share, seconds * share)
    launches += times
    fusions += times * (inst.opcode == "fusion")
    library_calls += times * (inst.opcode == "custom-call")
    total_seconds += seconds
  total_flops = sum(r["flops"] for r in by_class.values())
  for table in (by_class, by_category):
    for row in table.values():
      row["share_of_estimated_time"] = row["estimated_s"] / total_seconds if total_seconds else 0.0
  return {
      "estimate": True,
      "method": "per op: max(FLOPs / peak, bytes / memory bandwidth), summed; loops by trip count",
      "peaks": dataclasses.asdict(peaks),
      "flops": total_flops,
      "bytes": sum(r["bytes"] for r in by_class.values()),
      "estimated_step_s": total_seconds,
      "ops_launched": launches,
      "fusions_launched": fusions,
      "library_calls_launched": library_calls,
      "classes": dict(sorted(by_class.items(), key=lambda kv: -kv[1]["estimated_s"])),
      "xla_categories": dict(sorted(by_category.items(), key=lambda kv: -kv[1]["estimated_s"])),
      "components": dict(sorted(by_component.items(), key=lambda kv: -kv[1]["estimated_s"])),
  }


def format_table(summary: dict, title: str = "") -> str:
  """The classes and categories by estimated time, as printed after a target compile."""
  us = lambda s: f"{s * 1e6:12.1f}"
  heading = "== static breakdown (estimate)"
  lines = [f"{heading}: {title}" if title else heading,
           f"  estimated step {summary['estimated_step_s'] * 1e3:.3g} ms, "
           f"{summary['flops'] / 1e9:.3g} GFLOP, {summary['bytes'] / 1e9:.3g} GB, "
           f"{summary['ops_launched']:.0f} ops launched ({summary['fusions_launched']:.0f} "
           f"fusions, {summary['library_calls_launched']:.0f} library calls)"]
  for heading, table in (("Fathom class", summary["classes"]),
                         ("XLA category", summary["xla_categories"])):
    lines.append(f"  {heading:<28}  est. us/step   GFLOP       GB  % of est.")
    for name, row in table.items():
      lines.append(f"  {name:<28}{us(row['estimated_s'])} {row['flops'] / 1e9:9.3f} "
                   f"{row['bytes'] / 1e9:8.3f} {row['share_of_estimated_time'] * 100:9.1f}%")
  return "\n".join(lines)
