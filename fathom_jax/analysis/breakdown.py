"""Where a run's step time went: op events joined to HLO instructions, attributed, categorised.

Time attribution. Ops run on several threads (and while loops nest their body's events inside
the loop's own event), so summed durations can exceed the step. Each step window is cut into
segments at every event boundary; a segment's duration is shared equally by the innermost op
events active in it (a while/conditional/call event counts only where none of its body's events
runs). Attributed times therefore add up exactly to the covered time: the union of op intervals
inside the step, and `coverage` = covered time / step wall time says how much of the step the ops
explain (the rest is dispatch, synchronisation and idle threads).

Stalled steps. Where a trace has at least four annotated steps, a step that took more than
STALLED_STEP_FACTOR times their median is left out and listed in the summary: under the profiler
one step in ten can stall for a second (its ops that write out ran 20-30x slower), and they would
otherwise dominate the per-step averages of the typical step.
"""

import bisect
import collections
import dataclasses
import os
import statistics
from typing import Iterable, Optional

from fathom_jax import results
from fathom_jax.analysis import categories, components, cost, hlo, trace, xprof_check
from fathom_jax.errors import DataError

CONTAINERS = frozenset({"while", "conditional", "call"})
OPS_FILE = "ops.csv"
COMPONENT_FILE = "component.csv"
BREAKDOWN_FILE = "breakdown.json"
FIGURE_FILE = "breakdown.png"
UNMATCHED = "(not in HLO)"
STALLED_STEP_FACTOR = 1.5
MIN_STEPS_TO_LEAVE_OUT = 4


@dataclasses.dataclass
class OpStats:
  program: str
  name: str
  occurrences: int = 0
  attributed_ns: float = 0.0  # share of covered step time (see module docstring)
  busy_ns: float = 0.0  # summed event durations
  window_ns: dict = dataclasses.field(default_factory=dict)  # attributed ns by step window


@dataclasses.dataclass
class Program:
  key: str  # '<module>(<program id>)'
  module: hlo.Module
  model: cost.CostModel


def load_programs(traces: list[trace.Trace], hlo_files: Iterable[str] = ()) -> dict[str, Program]:
  """Programs from the HLO the traces embed, then from HLO text files (by module name)."""
  programs = {}
  for t in traces:
    for key, text in t.hlo_texts.items():
      if key not in programs:
        module = hlo.parse_module(text, f"{t.path}[{key}]")
        programs[key] = Program(key, module, cost.CostModel(module))
  for path in hlo_files:
    module = hlo.parse_file(path)
    if not any(p.module.name == module.name for p in programs.values()):
      programs[module.name] = Program(module.name, module, cost.CostModel(module))
  return programs


def _program_for(event: trace.OpEvent, programs: dict[str, Program]) -> Optional[Program]:
  program = programs.get(f"{event.module}({event.program_id})")
  if program is None:
    program = programs.get(event.module)
  return program


def _attribute(window: trace.Window, events: list[trace.OpEvent],
               is_container: list[bool]) -> tuple[dict[int, float], float]:
  """Attributed ns per event index inside `window`, and the covered ns."""
  bounds = []
  for idx, e in enumerate(events):
    start, end = max(e.start_ns, window.start_ns), min(e.end_ns, window.end_ns)
    if end > start:
      bounds.append((start, 1, idx))
      bounds.append((end, 0, idx))
  bounds.sort()
  active: dict[int, float] = {}
  share: dict[int, float] = collections.defaultdict(float)
  covered, last = 0.0, None
  for t, kind, idx in bounds:
    if active and last is not None and t > last:
      span = t - last
      covered += span
      leaves = [i for i in active if not is_container[i]]
      if not leaves:  # only loop/branch events: the innermost one
        leaves = [max(active, key=lambda i: active[i])]
      for i in leaves:
        share[i] += span / len(leaves)
    last = t
    if kind == 1:
      active[idx] = events[idx].start_ns
    else:
      active.pop(idx, None)
  return share, covered


def split_stalled(steps: list[trace.Window], factor: Optional[float] = STALLED_STEP_FACTOR
                  ) -> tuple[list[trace.Window], list[trace.Window]]:
  """(typical steps, stalled steps): a stalled step took more than `factor` times the median
  step. None, or fewer than MIN_STEPS_TO_LEAVE_OUT steps, leaves every step in."""
  if factor is None or len(steps) < MIN_STEPS_TO_LEAVE_OUT:
    return steps, []
  limit = factor * statistics.median(w.duration_ns for w in steps)
  return ([w for w in steps if w.duration_ns <= limit],
          [w for w in steps if w.duration_ns > limit])


@dataclasses.dataclass
class Breakdown:
  ops: list[dict]
  summary: dict


def analyse(traces: list[trace.Trace], programs: dict[str, Program], top: int = 15,
            stalled_step_factor: Optional[float] = STALLED_STEP_FACTOR,
            component_depth: Optional[int] = components.DEPTHS["layer"]) -> Breakdown:
  steps = [w for t in traces for w in t.steps]
  median_step_ns = statistics.median(w.duration_ns for w in steps) if steps else None
  steps, stalled = split_stalled(steps, stalled_step_factor)
  source = "step annotations"
  events = [e for t in traces for e in t.events]
  if not events:
    raise DataError(f"{traces[0].path if traces else 'trace'}: the trace holds no XLA op events "
                    "(was anything run on a device while it was recorded?)")
  if not steps:
    source = "program executions"
    steps = _merge([w for t in traces for w in t.executions])
  events.sort(key=lambda e: e.start_ns)
  insts: list[Optional[hlo.Instruction]] = []
  progs: list[Optional[Program]] = []
  for e in events:
    program = _program_for(e, programs)
    progs.append(program)
    insts.append(program.module.instructions.get(e.op) if program else None)
  is_container = [i is not None and i.opcode in CONTAINERS for i in insts]

  stats: dict[tuple[str, str], OpStats] = {}
  wall = covered = 0.0
  step_programs = collections.Counter()
  starts = [e.start_ns for e in events]
  longest = max(e.duration_ns for e in events)
  window_wall = []
  for w_index, window in enumerate(steps):
    lo = bisect.bisect_left(starts, window.start_ns - longest)
    hi = bisect.bisect_right(starts, window.end_ns)
    idxs = [i for i in range(lo, hi) if events[i].end_ns > window.start_ns]
    share, cov = _attribute(window, [events[i] for i in idxs], [is_container[i] for i in idxs])
    wall += window.duration_ns
    window_wall.append(window.duration_ns)
    covered += cov
    for local, i in enumerate(idxs):
      e = events[i]
      key = (progs[i].key if progs[i] else f"{e.module}({e.program_id})", e.op)
      s = stats.setdefault(key, OpStats(*key))
      inside = e.start_ns >= window.start_ns and e.start_ns < window.end_ns
      s.occurrences += int(inside and e.first)
      s.attributed_ns += share.get(local, 0.0)
      if share.get(local):
        s.window_ns[w_index] = s.window_ns.get(w_index, 0.0) + share[local]
      s.busy_ns += min(e.end_ns, window.end_ns) - max(e.start_ns, window.start_ns)
      step_programs[key[0]] += share.get(local, 0.0)
  if wall <= 0:
    raise DataError(f"{traces[0].path}: the trace has no step with a positive duration")
  n_steps = len(steps)
  if source == "program executions" and step_programs:
    # Steps are the executions of the program that took the most time; others ran between them.
    main_key = max(step_programs, key=step_programs.get)
    n_steps = max(1, sum(main_key in w.name.split("+") for w in steps))

  samples = _Samples(len(steps))
  rows, by_class, by_category = [], collections.Counter(), collections.Counter()
  by_component: dict[tuple[str, str], dict] = {}
  by_scope: dict[tuple[str, str], dict] = {}  # the outermost scope or module, passes together
  by_kind: dict[tuple[str, str], dict] = {}  # whole paths, instances collapsed, passes together
  unmatched_ns = 0.0
  for (key, name), s in stats.items():
    program = programs.get(key) or next((p for p in programs.values()
                                         if key.startswith(p.module.name + "(")), None)
    inst = program.module.instructions.get(name) if program else None
    if inst is None:
      unmatched_ns += s.attributed_ns
      shares, category, raw, opcode = {categories.OTHER: 1.0}, UNMATCHED, UNMATCHED, ""
      flops = transcendentals = nbytes = 0.0
      source_loc = ""
      parts = {((UNMATCHED,), components.NO_PASS, categories.OTHER): 1.0}
    else:
      shares = categories.class_shares(inst, program.module, program.model)
      category = categories.refined_category(inst, program.module)
      raw = categories.xla_category(inst)
      opcode = inst.opcode
      c = program.model.instruction(inst.name)
      # A loop's work is on its body's rows; counting it here too would count it twice.
      if inst.opcode in CONTAINERS:
        c = cost.Cost()
      flops, transcendentals, nbytes = c.flops, c.transcendentals, c.bytes
      source_loc = inst.source
      parts = components.shares(inst, program.module, program.model)
    for cls, frac in shares.items():
      by_class[cls] += s.attributed_ns * frac
      samples.add("by_class", cls, s.window_ns, frac)
    by_category[category] += s.attributed_ns
    samples.add("by_xla_category", category, s.window_ns, 1.0)
    for part, frac in _path_shares(parts).items():
      samples.add("by_component", part, s.window_ns, frac)
    for (path, pass_, cls), frac in parts.items():
      for table, part in ((by_component, (components.name(path, component_depth), pass_)),
                          (by_scope, (components.name(path, 1), "")),
                          (by_kind, (components.kind(path), ""))):
        entry = table.setdefault(part, {"ns": 0.0, "flops": 0.0, "bytes": 0.0,
                                       "classes": collections.Counter()})
        entry["ns"] += s.attributed_ns * frac
        entry["flops"] += flops * s.occurrences * frac
        entry["bytes"] += nbytes * s.occurrences * frac
        entry["classes"][cls] += s.attributed_ns * frac
    main_class = max(shares, key=shares.get)
    rows.append({
        "program": key, "name": name, "opcode": opcode, "xla_category": category,
        "xla_category_raw": raw, "fathom_class": main_class,
        "class_shares": ";".join(f"{c}={f:.3f}" for c, f in sorted(shares.items(),
                                                                    key=lambda x: -x[1])),
        "occurrences": s.occurrences, "total_time_us": s.attributed_ns / 1e3,
        "busy_time_us": s.busy_ns / 1e3,
        "mean_time_us": s.busy_ns / 1e3 / max(s.occurrences, 1),
        "flops": flops, "transcendentals": transcendentals, "bytes": nbytes,
        "source": source_loc,
        "components": _component_column(parts),
    })
  rows.sort(key=lambda r: -r["total_time_us"])

  def table(counter):
    return {k: {"time_s": v / 1e9, "time_per_step_s": v / 1e9 / n_steps, "share_of_step": v / wall}
            for k, v in sorted(counter.items(), key=lambda kv: -kv[1])}

  executed_flops = sum(r["flops"] * r["occurrences"] for r in rows) / n_steps
  main_key = max(step_programs, key=step_programs.get) if step_programs else None
  main = programs.get(main_key) if main_key else None
  summary = {
      "steps": n_steps,
      "step_source": source,
      "device": ", ".join(sorted({t.device for t in traces})),
      "step_time_s": wall / 1e9 / n_steps,
      "median_step_time_s": median_step_ns / 1e9 if median_step_ns is not None else None,
      "stalled_steps_left_out": [{"name": w.name, "time_s": w.duration_ns / 1e9}
                                 for w in stalled],
      "wall_time_s": wall / 1e9,
      "covered_time_s": covered / 1e9,
      "coverage": covered / wall,
      "unmatched_share": unmatched_ns / wall,
      "by_class": table(by_class),
      "by_xla_category": table(by_category),
      "programs": sorted(step_programs, key=lambda k: -step_programs[k]),
      # FLOPs of the instructions the trace shows executing, per step (loop bodies per
      # iteration), beside the cost model's count for the step's program.
      "flops_per_step_executed": executed_flops,
      "model_flops_per_step": main.model.total().flops if main else None,
      "top_ops": [{k: r[k] for k in ("program", "name", "xla_category", "fathom_class",
                                     "total_time_us", "occurrences", "source")}
                  | {"share_of_step": r["total_time_us"] * 1e3 / wall} for r in rows[:top]],
      # How the optimizer's update was recognised: instructions of the executed programs
      # found by the optimization scope, or by their source file in optax (no scope).
      "optimization_found_by": _optimization_evidence(
          [programs[k] for k in step_programs if k in programs]),
      "component_depth": component_depth,
      "by_component": _component_table(by_component, n_steps, wall),
      "by_scope": {v["component"]: v for v in _component_table(by_scope, n_steps, wall).values()},
      "by_component_kind": {v["component"]: v
                            for v in _component_table(by_kind, n_steps, wall).values()},
      "component_rule": components.__doc__.strip().replace("\n", " "),
      # Per window (an annotated step, or merged program executions) attributed seconds: what a
      # comparison of two runs needs for its intervals. Components at full depth, 'path|pass'.
      "samples": {"unit": "step" if source == "step annotations" else "execution window",
                  "wall_s": [w / 1e9 for w in window_wall], **samples.as_dict()},
      "cost_rule": categories.COST_RULE,
      "attribution_rule": __doc__.split("Time attribution.")[1].strip().replace("\n", " "),
  }
  return Breakdown(rows, summary)


def _component_table(table: dict, n_steps: int, wall: float) -> dict:
  return {
      f"{comp}|{pass_}": {
          "component": comp, "pass": pass_, "time_per_step_s": v["ns"] / 1e9 / n_steps,
          "share_of_step": v["ns"] / wall, "flops_per_step": v["flops"] / n_steps,
          "bytes_per_step": v["bytes"] / n_steps,
          "by_class_s": {c: t / 1e9 / n_steps for c, t in v["classes"].most_common()}}
      for (comp, pass_), v in sorted(table.items(), key=lambda kv: -kv[1]["ns"])}


def _optimization_evidence(executed: list[Program]) -> dict:
  found = collections.Counter()
  for program in executed:
    for computation in program.module.computations.values():
      for inst in computation.instructions:
        evidence = categories.optimization_evidence(inst)
        if evidence:
          found[evidence] += 1
  return {"scope fathom.optimization": found["scope"],
          "source file in optax": found["optax source"]}


class _Samples:
  """Attributed ns per step window, by table and key."""

  def __init__(self, windows: int):
    self.windows = windows
    self.tables: dict[str, dict[str, list[float]]] = collections.defaultdict(dict)

  def add(self, table: str, key: str, window_ns: dict, fraction: float) -> None:
    series = self.tables[table].setdefault(key, [0.0] * self.windows)
    for w, ns in window_ns.items():
      series[w] += ns * fraction

  def as_dict(self) -> dict:
    return {table: {k: [float(f"{ns / 1e9:.9g}") for ns in v] for k, v in keys.items()}
            for table, keys in self.tables.items()}


def _path_shares(parts: dict) -> collections.Counter:
  """An op's shares by whole component path and pass ('path|pass'), classes summed."""
  merged = collections.Counter()
  for (path, pass_, _), frac in parts.items():
    merged[f"{components.name(path, None)}|{pass_}"] += frac
  return merged


def _component_column(parts: dict) -> str:
  """An op's component shares ('path|pass=fraction;...'), for ops.csv."""
  return ";".join(f"{key}={frac:.3f}" for key, frac in _path_shares(parts).most_common())


def _merge(windows: list[trace.Window]) -> list[trace.Window]:
  """Overlapping executions (several devices, several programs) merged into one window."""
  merged: list[trace.Window] = []
  for w in sorted(windows, key=lambda w: w.start_ns):
    if merged and w.start_ns < merged[-1].end_ns:
      last = merged[-1]
      names = last.name if w.name in last.name.split("+") else f"{last.name}+{w.name}"
      merged[-1] = trace.Window(names, None, last.start_ns, max(last.end_ns, w.end_ns))
    else:
      merged.append(w)
  return merged


# ---------------------------------------------------------------------------------------------
# Outputs.

CSV_FIELDS = ("program", "name", "opcode", "xla_category", "xla_category_raw", "fathom_class",
              "class_shares", "occurrences", "total_time_us", "busy_time_us", "mean_time_us",
              "flops", "transcendentals", "bytes", "source", "components")
COMPONENT_FIELDS = ("component", "pass", "time_per_step_ms", "share_of_step", "flops_per_step",
                    "bytes_per_step", "classes")


def write(result: Breakdown, output_dir: str, title: str = "") -> dict[str, str]:
  os.makedirs(output_dir, exist_ok=True)
  paths = {name: os.path.join(output_dir, name) for name in (OPS_FILE, BREAKDOWN_FILE,
                                                             FIGURE_FILE)}
  results.write_text_atomic(paths[OPS_FILE], results.csv_text(result.ops, CSV_FIELDS))
  results.write_text_atomic(os.path.join(output_dir, COMPONENT_FILE), results.csv_text(
      [{
          "component": v["component"], "pass": v["pass"],
          "time_per_step_ms": v["time_per_step_s"] * 1e3, "share_of_step": v["share_of_step"],
          "flops_per_step": v["flops_per_step"], "bytes_per_step": v["bytes_per_step"],
          "classes": ";".join(f"{c}={t * 1e3:.6g}" for c, t in v["by_class_s"].items())}
          for v in result.summary["by_component"].values()], COMPONENT_FIELDS))
  paths[COMPONENT_FILE] = os.path.join(output_dir, COMPONENT_FILE)
  results.write_json_atomic(paths[BREAKDOWN_FILE], result.summary)
  plot(result.summary, paths[FIGURE_FILE], title)
  return paths


def format_table(summary: dict, title: str = "", top_components: int = 10) -> str:
  stalled = summary.get("stalled_steps_left_out") or []
  left_out = (f"; {len(stalled)} stalled step{'s' * (len(stalled) > 1)} left out ("
              + ", ".join(f"{w['time_s'] * 1e3:,.1f}" for w in stalled)
              + f" ms against a median of {summary['median_step_time_s'] * 1e3:,.1f})"
              if stalled else "")
  lines = [f"== op breakdown{': ' + title if title else ''} ({summary['steps']} steps from "
           f"{summary['step_source']}, {summary['step_time_s'] * 1e3:.3f} ms/step, ops cover "
           f"{summary['coverage'] * 100:.1f}% of step time{left_out}) =="]
  for heading, key in (("Fathom class", "by_class"), ("XLA category", "by_xla_category")):
    lines.append(f"  {heading:<28s} {'ms/step':>10s} {'% of step':>10s}")
    for name, v in summary[key].items():
      lines.append(f"  {name:<28s} {v['time_per_step_s'] * 1e3:10.3f} "
                   f"{v['share_of_step'] * 100:9.1f}%")
    lines.append(f"  {'(not covered by ops)':<28s} "
                 f"{(1 - summary['coverage']) * summary['step_time_s'] * 1e3:10.3f} "
                 f"{(1 - summary['coverage']) * 100:9.1f}%")
  found = {how: n for how, n in (summary.get("optimization_found_by") or {}).items() if n}
  if found and "optimization" in summary["by_class"]:
    lines.append("  optimization found by: " + ", ".join(
        f"{how} ({n} instructions)" for how, n in found.items()))
  shown = list(summary.get("by_component", {}).values())[:top_components]
  if shown:
    depth = summary.get("component_depth")
    lines.append(f"  {'component (depth ' + str(depth or 'full') + ')':<44s} {'pass':<9s} "
                 f"{'ms/step':>10s} {'% of step':>10s}")
    for v in shown:
      label = v["component"] if len(v["component"]) <= 44 else "..." + v["component"][-41:]
      lines.append(f"  {label:<44s} {v['pass'] or '-':<9s} {v['time_per_step_s'] * 1e3:10.3f} "
                   f"{v['share_of_step'] * 100:9.1f}%")
  return "\n".join(lines)


def plot(summary: dict, path: str, title: str = "") -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 1, figsize=(10, 4.2))
  palette = plt.get_cmap("tab20").colors
  # Classes keep their colour from figure to figure; categories take the rest in order.
  class_colors = {c: palette[2 * i % 20] for i, c in enumerate(categories.CLASSES)}
  for ax, key, label in ((axes[0], "by_class", "Fathom class"),
                         (axes[1], "by_xla_category", "XLA category")):
    items = list(summary[key].items())
    if len(items) > 9:
      rest = sum(v["share_of_step"] for _, v in items[9:])
      items = items[:9] + [("(other categories)", {"share_of_step": rest})]
    left = 0.0
    for i, (name, v) in enumerate(items):
      width = v["share_of_step"] * 100
      color = (class_colors.get(name) if key == "by_class"
               else [c for j, c in enumerate(palette) if j not in (14, 15)][i % 18])
      ax.barh(0, width, left=left, color=color, label=name)
      left += width
    ax.barh(0, 100 - left, left=left, color="#dddddd", label="(not covered by ops)")
    ax.set_xlim(0, 100)
    ax.set_yticks([])
    ax.set_title(label, fontsize=9, loc="left")
    ax.legend(fontsize=7, ncol=3, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
  axes[1].set_xlabel("% of step time")
  fig.suptitle(title or "op breakdown", fontsize=10)
  fig.tight_layout()
  results.save_figure(fig, path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def run(trace_dir: str, output_dir: Optional[str] = None, hlo_files: Iterable[str] = (),
        title: str = "", stalled_step_factor: Optional[float] = STALLED_STEP_FACTOR,
        component_depth: Optional[int] = components.DEPTHS["layer"]
        ) -> tuple[Breakdown, dict[str, str]]:
  """The whole pipeline on a trace folder: read, join, attribute, write."""
  traces = trace.read_all(trace_dir)
  programs = load_programs(traces, hlo_files)
  if not programs:
    raise DataError(f"{trace_dir}: the trace embeds no HLO and no HLO text files were found "
                    "beside it (dump them with XLA_FLAGS=--xla_dump_to=<trace_dir>)")
  result = analyse(traces, programs, stalled_step_factor=stalled_step_factor,
                   component_depth=component_depth)
  try:
    rows = xprof_check.hlo_stats([t.path for t in traces])
  except Exception as e:  # a cross-check only: never the reason a breakdown fails
    result.summary["xprof_check"] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
  else:
    result.summary["xprof_check"] = xprof_check.compare(result.ops, rows,
                                                        result.summary["steps"])
    if result.summary["stalled_steps_left_out"]:
      # xprof's totals span every step; ours leave the stalled ones out.
      result.summary["xprof_check"]["stalled_steps_in_xprof_only"] = len(
          result.summary["stalled_steps_left_out"])
  paths = write(result, output_dir or trace_dir, title)
  return result, paths
