"""The report of a study folder (see fathom_jax.study): Markdown, figures (PNG) and tables (CSV).

Sections: the suite's runs and breakdowns, training versus inference, similarity (cosine distance,
average-linkage dendrograms), fused versus per-op execution, CPU thread scaling with an Amdahl fit,
device scaling with communication time, and a roofline against the peaks measured in the study.
Each section uses the points that finished; missing or failed ones are listed, not guessed.
"""

import csv
import dataclasses
import glob
import json
import os
from typing import Optional, Sequence

import numpy as np

from fathom_jax import results
from fathom_jax.analysis import (breakdown, categories, hlo, roofline, scaling, similarity,
                                 static)
from fathom_jax.errors import DataError, UsageError

REPORT_FILE = "report.md"
FIGURES = "figures"
TABLES = "tables"
CLASSES = categories.CLASSES
EXECUTIONS = ("compiled", "unfused", "eager")


@dataclasses.dataclass
class Run:
  """A point of the study with what its run left on disk."""
  point: object  # fathom_jax.study.Point
  status: str  # 'completed', 'failed' or 'missing'
  error: Optional[str] = None
  record: Optional[dict] = None
  summary: Optional[dict] = None  # breakdown.json
  ops: Optional[list] = None  # ops.csv rows
  command: str = ""
  run_dir: Optional[str] = None

  @property
  def step_s(self) -> float:
    return self.record["figures"]["step_time_s"]["median"]

  def class_ms(self, cls: str) -> float:
    """The class's share of the profiled step, applied to the unprofiled step time: the tracer
    slows steps of many small ops, so its absolute times would overstate every class."""
    entry = (self.summary or {}).get("by_class", {}).get(cls)
    return entry["share_of_step"] * self.step_s * 1e3 if entry else 0.0

  @property
  def ops_per_step(self) -> float:
    return sum(int(r["occurrences"]) for r in self.ops) / self.summary["steps"]

  @property
  def bytes_per_step(self) -> float:
    return sum(float(r["bytes"]) * int(r["occurrences"]) for r in self.ops) / self.summary["steps"]


def _settings(saved: dict):
  from fathom_jax import study
  fields = {f.name: f for f in dataclasses.fields(study.Settings)}
  values = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields}
  return study.Settings(**values)


def load(study_dir: str) -> tuple[dict, list[Run], Optional[dict]]:
  """(study.json, runs in plan order, peaks or None)."""
  from fathom_jax import study
  path = os.path.join(study_dir, study.STUDY_FILE)
  try:
    with open(path) as f:
      meta = json.load(f)
    settings = _settings(meta["settings"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise DataError(f"{path}: not a readable study file ({type(e).__name__})") from None
  runs = []
  measuring = study.measuring_points(settings)
  for point in study.plan(settings):
    outcome = study.point_outcome(study.point_dir(study_dir, measuring[point.id]))
    run = Run(point, "missing", command=meta.get("points", {}).get(point.id, ""))
    if outcome is not None:
      run.status, run.error = outcome["status"], outcome.get("error")
      if outcome.get("run_dir"):
        run.run_dir = outcome["run_dir"]
        run.record = results.read_result(run.run_dir)
        if point.kind == "target":
          run.summary = _static(outcome["run_dir"])
        else:
          run.summary, run.ops = _breakdown(outcome["run_dir"])
        if run.status == "completed" and run.summary is None:
          run.status, run.error = "failed", "the run left no op breakdown"
    runs.append(run)
  peaks_path = os.path.join(study_dir, study.RUNS_DIR, study.PEAKS_POINT, "peaks.json")
  return meta, runs, results.read_json_object(peaks_path)


def _static(run_dir: str) -> Optional[dict]:
  return results.read_json_object(os.path.join(run_dir, static.STATIC_FILE))


def _breakdown(run_dir: str) -> tuple[Optional[dict], Optional[list]]:
  summary_path = os.path.join(run_dir, breakdown.BREAKDOWN_FILE)
  ops_path = os.path.join(run_dir, breakdown.OPS_FILE)
  if not (os.path.exists(summary_path) and os.path.exists(ops_path)):
    return None, None
  summary = results.read_json_object(summary_path)
  if summary is None:
    return None, None
  with open(ops_path, newline="") as f:
    ops = list(csv.DictReader(f))
  return summary, ops


# ---------------------------------------------------------------------------------------------
# Tables: lists of dicts, written as CSV and rendered as Markdown.


def _write_csv(path: str, rows: list[dict]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  results.write_text_atomic(path, results.csv_text(rows))


def _fmt(value) -> str:
  if value is None:
    return "–"
  if isinstance(value, float):
    if not np.isfinite(value):
      return "–"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
  return str(value)


def markdown_table(rows: list[dict], columns: Optional[list[str]] = None) -> str:
  if not rows:
    return "_no finished runs_\n"
  columns = columns or list(rows[0])
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def _completed(runs: list[Run], kind: str) -> list[Run]:
  return [r for r in runs if r.point.kind == kind and r.status == "completed"]


# ---------------------------------------------------------------------------------------------
# Sections. Each returns (rows, facts) from runs; plotting is separate.


def phase_rows(runs: list[Run], peaks: Optional[dict]) -> list[dict]:
  """One row per named phase of a suite run's step (a language model's prefill and decode):
  profiled time per step and per token, bytes moved per token, FLOPs per byte against the
  machine's balance point (matmul peak over copy bandwidth), the bandwidth drawn, and the
  class that took the most of the phase."""
  balance = (peaks["matmul_flops_per_s"] / peaks["copy_bytes_per_s"]) if peaks else None
  rows = []
  for r in _completed(runs, "suite"):
    for phase, v in ((r.record.get("figures", {}).get("profile") or {}).get("phases")
                     or {}).items():
      classes = v.get("by_class_s") or {}
      top = max(classes, key=classes.get) if classes else ""
      intensity = v.get("flops_per_byte")
      rows.append({
          "workload": r.point.workload, "mode": r.point.mode, "phase": phase,
          "ms_per_step": v["time_per_step_s"] * 1e3, "tokens_per_step": v["tokens_per_step"],
          "us_per_token": v["time_per_token_s"] * 1e6,
          "mb_per_token": v["bytes_per_token"] / 1e6, "flops_per_byte": intensity,
          "gb_per_s": (v["bytes_per_s"] or 0) / 1e9,
          "share_of_copy_peak": (v["bytes_per_s"] / peaks["copy_bytes_per_s"]
                                 if peaks and v.get("bytes_per_s") else None),
          "bound": ("" if balance is None or intensity is None else
                    "memory" if intensity < balance else "compute"),
          "top_class": top,
          "top_class_share": classes[top] / v["time_per_step_s"] if top and
          v["time_per_step_s"] > 0 else None})
  return rows


def suite_rows(runs: list[Run], peaks: Optional[dict]) -> list[dict]:
  peak = peaks["matmul_flops_per_s"] if peaks else None
  rows = []
  for r in _completed(runs, "suite"):
    f = r.record["figures"]
    flops = r.summary.get("model_flops_per_step") or f.get("flops_per_step")
    rows.append({
        "workload": r.point.workload, "mode": r.point.mode, "batch": r.record["config"]["batch_size"],
        "step_ms": r.step_s * 1e3, "throughput_per_s": f["examples_per_s"],
        "unit": r.record["example_unit"], "model_gflop_per_step": (flops or 0) / 1e9,
        "gflop_per_s": (flops or 0) / r.step_s / 1e9,
        "mfu": (flops or 0) / r.step_s / peak if peak else None,
        "coverage": r.summary["coverage"],
        "profiling_overhead": f.get("profile", {}).get("overhead"),
        **{f"share:{c}": r.summary["by_class"].get(c, {}).get("share_of_step", 0.0)
           for c in CLASSES},
    })
  return rows


def train_vs_infer_rows(runs: list[Run]) -> list[dict]:
  by_key = {(r.point.workload, r.point.mode): r for r in _completed(runs, "suite")}
  rows = []
  for workload in dict.fromkeys(r.point.workload for r in runs if r.point.kind == "suite"):
    train, infer = by_key.get((workload, "train")), by_key.get((workload, "infer"))
    if not (train and infer):
      continue
    per_example = lambda r: r.step_s / r.record["config"]["batch_size"]
    rows.append({
        "workload": workload, "train_ms": train.step_s * 1e3, "infer_ms": infer.step_s * 1e3,
        "train_batch": train.record["config"]["batch_size"],
        "infer_batch": infer.record["config"]["batch_size"],
        # Per example, so batch sizes that differ between modes (deepq acts one state at a
        # time) compare fairly.
        "train_over_infer_per_example": per_example(train) / per_example(infer),
        "train_top_class": _top_class(train), "infer_top_class": _top_class(infer),
    })
  return rows


def _top_class(run: Run) -> str:
  by_class = run.summary["by_class"]
  return max(by_class, key=lambda c: by_class[c]["time_s"]) if by_class else ""


def similarity_of(runs: list[Run], mode: str) -> tuple[list[str], np.ndarray]:
  shares = {r.point.workload: {c: v["time_s"] for c, v in r.summary["by_class"].items()}
            for r in _completed(runs, "suite") if r.point.mode == mode}
  return similarity.class_vectors(shares, CLASSES)


def fusion_rows(runs: list[Run]) -> list[dict]:
  compiled = {r.point.workload: r for r in _completed(runs, "suite") if r.point.mode == "train"}
  rows = []
  for workload in dict.fromkeys(r.point.workload for r in runs if r.point.kind == "fusion"):
    variants = {"compiled": compiled.get(workload)}
    for r in _completed(runs, "fusion"):
      if r.point.workload == workload:
        variants[r.point.execution] = r
    base = variants["compiled"]
    for execution in EXECUTIONS:
      r = variants.get(execution)
      if r is None:
        continue
      rows.append({
          "workload": workload, "execution": execution, "step_ms": r.step_s * 1e3,
          "slowdown_vs_compiled": r.step_s / base.step_s if base else None,
          "ops_per_step": r.ops_per_step, "mb_moved_per_step": r.bytes_per_step / 1e6,
          "coverage": r.summary["coverage"],
          "classes_present": sum(1 for c in CLASSES if r.class_ms(c) > 0),
          **{f"ms:{c}": r.class_ms(c) for c in CLASSES},
      })
  return rows


def component_kind_rows(runs: list[Run], top: int = 5) -> list[dict]:
  """Per suite run, the `top` kinds of model component by time (repeated blocks summed, e.g.
  `GPT/block_*/attention`), each with its classes: what the class view sums over."""
  rows = []
  for r in _completed(runs, "suite"):
    kinds = (r.summary or {}).get("by_component_kind") or {}
    for name, v in list(kinds.items())[:top]:
      classes = v["by_class_s"]
      main = max(classes, key=classes.get) if classes else ""
      rows.append({
          "workload": r.point.workload, "mode": r.point.mode, "component": name,
          "share_of_step": v["share_of_step"], "ms_per_step": v["time_per_step_s"] * 1e3,
          "classes": "; ".join(f"{c} {t / v['time_per_step_s']:.0%}" for c, t in classes.items()
                               if v["time_per_step_s"] > 0 and t / v["time_per_step_s"] >= 0.05),
          "main_class": main})
  return rows


def component_diff_rows(runs: list[Run], top: int = 5) -> list[dict]:
  """Per model component (layer depth), the changes a diff finds significant between the train
  step compiled and unfused, compiled and eager, and as reference and tuned: the `top` largest
  increases and decreases of each pair, and how many components could not be matched."""
  from fathom_jax.analysis import diff
  compiled = {r.point.workload: r for r in _completed(runs, "suite") if r.point.mode == "train"}
  pairs = []
  for r in _completed(runs, "fusion"):
    if r.point.workload in compiled:
      pairs.append((f"compiled -> {r.point.execution}", compiled[r.point.workload], r))
  by_impl: dict = {}
  for r in _completed(runs, "implementation"):
    by_impl.setdefault(r.point.workload, {})[r.point.implementation] = r
  for workload, impls in by_impl.items():
    if {"reference", "tuned"} <= set(impls):
      pairs.append(("reference -> tuned", impls["reference"], impls["tuned"]))
  rows = []
  for comparison, a, b in pairs:
    try:
      sides = [diff.read_side(r.run_dir, label) for r, label in ((a, "A"), (b, "B"))]
    except (UsageError, OSError):  # a run without per-step samples: nothing to compare
      continue
    compared = [c for c in diff.compare(*sides) if c["table"] == "component"]
    significant = [c for c in compared if c["matched"] == "both" and c["significant"]]
    increases = sorted((c for c in significant if c["diff_ms"] > 0), key=lambda c: -c["diff_ms"])
    decreases = sorted((c for c in significant if c["diff_ms"] < 0), key=lambda c: c["diff_ms"])
    unmatched = sum(c["matched"] != "both" for c in compared)
    for c in increases[:top] + decreases[:top]:
      rows.append({"workload": a.point.workload, "comparison": comparison,
                   "component": c["name"], "a_ms": c["a_ms"], "b_ms": c["b_ms"],
                   "diff_ms": c["diff_ms"], "ci_low_ms": c["ci_low_ms"],
                   "ci_high_ms": c["ci_high_ms"], "unmatched_components": unmatched})
  return rows


def fusion_findings(rows: list[dict]) -> list[str]:
  """Plain sentences on what fusion removes and where the per-op view misleads."""
  findings = []
  by = {(r["workload"], r["execution"]): r for r in rows}
  for workload in dict.fromkeys(r["workload"] for r in rows):
    compiled, unfused, eager = (by.get((workload, e)) for e in EXECUTIONS)
    if compiled and unfused:
      shrunk = sorted(((unfused[f"ms:{c}"] - compiled[f"ms:{c}"], c) for c in CLASSES),
                      reverse=True)
      removed = [f"{c} ({unfused[f'ms:{c}']:.3g} → {compiled[f'ms:{c}']:.3g} ms)"
                 for d, c in shrunk[:2] if d > 0]
      findings.append(
          f"**{workload}**: fusion runs {unfused['ops_per_step']:.0f} ops as "
          f"{compiled['ops_per_step']:.0f} kernels, buys {unfused['step_ms'] / compiled['step_ms']:.2f}× "
          f"over the unfused program and moves {compiled['mb_moved_per_step']:.3g} MB instead of "
          f"{unfused['mb_moved_per_step']:.3g} MB per step"
          + (f"; it shrinks most {', '.join(removed)}." if removed else "."))
    if compiled and eager:
      share = lambda r, c: r[f"ms:{c}"] / max(sum(r[f"ms:{k}"] for k in CLASSES), 1e-12)
      gaps = sorted(((share(eager, c) - share(compiled, c), c) for c in CLASSES),
                    key=lambda x: -abs(x[0]))
      gap, cls = gaps[0]
      findings.append(
          f"**{workload}**, per-op view: eager dispatch takes {eager['step_ms'] / compiled['step_ms']:.1f}× "
          f"the compiled step and its ops cover only {eager['coverage']:.0%} of it (the rest is "
          f"Python and dispatch); among op time, {cls} is {share(eager, cls):.0%} per-op but "
          f"{share(compiled, cls):.0%} compiled ({gap * 100:+.0f} points).")
      lost = [c for c in CLASSES if compiled[f"ms:{c}"] > 0 and eager[f"ms:{c}"] == 0]
      if lost:
        # Eager dispatch caches one program per primitive and shape, compiled at its first call
        # site: later calls (an optimizer update reusing the model's multiply) keep that site's
        # metadata, so scopes cannot tell them apart.
        findings.append(
            f"**{workload}**, per-op view: {', '.join(lost)} vanish(es) as a class: eager ops "
            "share one cached program per primitive and shape, whose metadata names the first "
            "call site, so that time is counted under the classes of the model's own ops.")
  return findings


def thread_rows(runs: list[Run]) -> tuple[list[dict], list[dict]]:
  """(per point rows, per workload Amdahl fits with per-class speedups)."""
  rows, fits = [], []
  for workload in dict.fromkeys(r.point.workload for r in runs if r.point.kind == "threads"):
    mine = sorted((r for r in _completed(runs, "threads") if r.point.workload == workload),
                  key=lambda r: r.point.cpus)
    if not mine:
      continue
    counts, times = [r.point.cpus for r in mine], [r.step_s for r in mine]
    for r, s in zip(mine, scaling.speedups(counts, times)):
      rows.append({"workload": workload, "cpus": r.point.cpus, "step_ms": r.step_s * 1e3,
                   "speedup": s, **{f"ms:{c}": r.class_ms(c) for c in CLASSES}})
    fit = scaling.amdahl_fit(counts, times)
    first, last = mine[0], mine[-1]
    class_speedup = {f"speedup:{c}": first.class_ms(c) / last.class_ms(c)
                     for c in CLASSES if first.class_ms(c) > 0 and last.class_ms(c) > 0}
    fits.append({"workload": workload, "cpus": f"{counts[0]}–{counts[-1]}",
                 "speedup": times[0] / times[-1], **fit, **class_speedup})
  return rows, fits


def device_rows(runs: list[Run]) -> list[dict]:
  rows = []
  for workload in dict.fromkeys(r.point.workload for r in runs if r.point.kind == "devices"):
    mine = sorted((r for r in _completed(runs, "devices") if r.point.workload == workload),
                  key=lambda r: r.point.devices)
    if not mine:
      continue
    for r, s in zip(mine, scaling.speedups([r.point.devices for r in mine],
                                           [r.step_s for r in mine])):
      rows.append({"workload": workload, "devices": r.point.devices,
                   "global_batch": r.record["config"]["batch_size"], "step_ms": r.step_s * 1e3,
                   "speedup": s, "throughput_per_s": r.record["figures"]["examples_per_s"],
                   "communication_ms": r.class_ms(categories.COMMUNICATION),
                   "communication_share": r.summary["by_class"].get(
                       categories.COMMUNICATION, {}).get("share_of_step", 0.0)})
  return rows


def implementation_rows(runs: list[Run]) -> list[dict]:
  """Per workload with both runs: the train step as written (reference) and tuned, its time and
  each class's time, and the classes the tuning shrank most."""
  pairs: dict = {}
  for r in _completed(runs, "implementation"):
    pairs.setdefault(r.point.workload, {})[r.point.implementation] = r
  rows = []
  for workload, pair in pairs.items():
    if set(pair) != {"reference", "tuned"}:
      continue
    reference, tuned = pair["reference"], pair["tuned"]
    saved = {c: reference.class_ms(c) - tuned.class_ms(c) for c in CLASSES}
    shrank = [c for c in sorted(saved, key=saved.get, reverse=True) if saved[c] > 0][:2]
    rows.append({
        "workload": workload, "reference_ms": reference.step_s * 1e3,
        "tuned_ms": tuned.step_s * 1e3, "speedup": reference.step_s / tuned.step_s,
        "shrank_most": ", ".join(f"{c} ({saved[c]:.1f} ms)" for c in shrank) or "none",
        **{f"reference_ms:{c}": reference.class_ms(c) for c in CLASSES},
        **{f"tuned_ms:{c}": tuned.class_ms(c) for c in CLASSES},
    })
  return rows


def _program_memory_gb(memory: dict) -> Optional[float]:
  parts = [memory.get(k) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                   "temp_size_in_bytes")]
  return sum(p for p in parts if p) / 1e9 if any(parts) else None


def _static_row(workload: str, mode: str, device: str, summary: dict,
                memory_gb: Optional[float]) -> dict:
  total_flops = summary["flops"] or 1.0
  return {
      "workload": workload, "mode": mode, "device": device,
      "gflop": summary["flops"] / 1e9, "estimated_ms": summary["estimated_step_s"] * 1e3,
      "fusions": summary["fusions_launched"], "library_calls": summary["library_calls_launched"],
      "memory_gb": memory_gb,
      **{f"flops_share:{c}": summary["classes"].get(c, {}).get("flops", 0.0) / total_flops
         for c in CLASSES},
      **{f"time_share:{c}": summary["classes"].get(c, {}).get("share_of_estimated_time", 0.0)
         for c in CLASSES},
  }


def _static_of_program(run_dir: Optional[str], peaks: static.Peaks) -> Optional[dict]:
  """The static breakdown of the one program a run folder's hlo/ holds, or None."""
  files = sorted(glob.glob(os.path.join(run_dir or "", "hlo", "*.optimized.hlo.txt")))
  if len(files) != 1:
    return None
  with open(files[0]) as f:
    return static.analyse(hlo.parse_module(f.read()), peaks)


def target_rows(runs: list[Run], peaks: Optional[dict]) -> list[dict]:
  """The suite's steps on this machine and on each target, all by the same static estimate: this
  machine's from its runs' optimised HLO and measured peaks, the targets' from their compiles."""
  targets_ = _completed(runs, "target")
  if not targets_:
    return []
  rows = []
  if peaks:
    cpu_peaks = static.Peaks(peaks["matmul_flops_per_s"], peaks["copy_bytes_per_s"],
                             peaks["matmul_flops_per_s"])
    for r in _completed(runs, "suite"):
      summary = _static_of_program(r.run_dir, cpu_peaks)
      if summary is None:
        continue
      device = f"this {peaks.get('platform', 'cpu')} ({r.record.get('implementation', '?')})"
      rows.append(_static_row(r.point.workload, r.point.mode, device, summary,
                              _program_memory_gb(r.record["figures"].get("compiled_memory") or {})))
  for r in targets_:
    # Read again from the compiled program, so a rebuilt report has the analysis of today.
    target, dtype = r.record.get("target", {}), r.record.get("spec", {}).get("dtype", "float32")
    summary = r.summary
    if target.get("matrix_flops_per_s", {}).get(dtype):
      summary = _static_of_program(r.run_dir, static.Peaks(
          target["matrix_flops_per_s"][dtype], target["memory_bytes_per_s"],
          target.get("vector_flops_per_s"))) or summary
    rows.append(_static_row(r.point.workload, r.point.mode, r.point.target, summary,
                            _program_memory_gb(r.record["figures"].get("compiled_memory") or {})))
  return rows


def roofline_points(runs: list[Run]) -> list[dict]:
  return [p for r in _completed(runs, "suite")
          for p in roofline.op_points(r.ops, f"{r.point.workload} {r.point.mode}")]


# ---------------------------------------------------------------------------------------------
# Figures.


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_class_bars(panels: list[tuple[str, list[str], list[dict]]], path: str, title: str,
                    key: str = "share") -> None:
  """Stacked horizontal bars of time per class; panels: (title, labels, {class: value} each)."""
  plt = _plt()
  height = max(len(labels) for _, labels, _ in panels) * 0.35 + 1.5
  fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 2, height), squeeze=False,
                           sharex=True)
  cmap = plt.get_cmap("tab10")
  for ax, (name, labels, values) in zip(axes[0], panels):
    left = np.zeros(len(labels))
    for i, cls in enumerate(CLASSES):
      widths = np.array([v.get(cls, 0.0) for v in values]) * (100 if key == "share" else 1)
      if widths.any():
        ax.barh(labels, widths, left=left, color=cmap(i % 10), label=cls)
        left += widths
    ax.invert_yaxis()
    ax.set_title(name, fontsize=9, loc="left")
    ax.set_xlabel("% of step time" if key == "share" else "ms per step")
  legend = {}  # every class any panel shows, in the classes' order
  for ax in axes[0]:
    for handle, label in zip(*ax.get_legend_handles_labels()):
      legend.setdefault(label, handle)
  labels = [c for c in CLASSES if c in legend]
  handles = [legend[c] for c in labels]
  fig.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 0.95),
             frameon=False)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  results.save_figure(fig, path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def plot_scaling(rows: list[dict], x: str, path: str, title: str,
                 fits: Optional[list[dict]] = None) -> None:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  workloads = list(dict.fromkeys(r["workload"] for r in rows))
  xs_all = sorted({r[x] for r in rows})
  ax.plot(xs_all, [n / xs_all[0] for n in xs_all], color="grey", ls=":", label="linear")
  cmap = plt.get_cmap("tab10")
  for i, w in enumerate(workloads):
    mine = [r for r in rows if r["workload"] == w]
    ax.plot([r[x] for r in mine], [r["speedup"] for r in mine], "o-", color=cmap(i % 10), label=w)
    fit = next((f for f in fits or [] if f["workload"] == w), None)
    if fit and fit["parallel_fraction"] is not None:
      grid = np.linspace(xs_all[0], xs_all[-1], 50)
      curve = scaling.amdahl_speedup(fit["parallel_fraction"], grid)
      ax.plot(grid, curve / scaling.amdahl_speedup(fit["parallel_fraction"], xs_all[0]),
              ls="--", lw=0.8, color=cmap(i % 10))
  ax.set_xlabel(x)
  ax.set_ylabel(f"step speedup over {xs_all[0]} {x}")
  ax.set_xticks(xs_all)
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  results.save_figure(fig, path, dpi=110)
  plt.close(fig)


def plot_devices(rows: list[dict], path: str, title: str) -> None:
  plt = _plt()
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  cmap = plt.get_cmap("tab10")
  for i, w in enumerate(dict.fromkeys(r["workload"] for r in rows)):
    mine = [r for r in rows if r["workload"] == w]
    n = [r["devices"] for r in mine]
    a.plot(n, [r["throughput_per_s"] / mine[0]["throughput_per_s"] for r in mine], "o-",
           color=cmap(i % 10), label=w)
    b.plot(n, [r["communication_share"] * 100 for r in mine], "o-", color=cmap(i % 10), label=w)
  for ax in (a, b):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("devices")
  a.set_ylabel("throughput relative to the fewest devices")
  b.set_ylabel("communication, % of step time")
  a.legend(fontsize=7, ncol=2)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  results.save_figure(fig, path, dpi=110)
  plt.close(fig)


def plot_fusion(rows: list[dict], path: str, title: str) -> None:
  plt = _plt()
  workloads = list(dict.fromkeys(r["workload"] for r in rows))
  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 0.5 * len(workloads) * 3 + 1.5))
  labels, times, shares = [], [], []
  for w in workloads:
    for r in rows:
      if r["workload"] == w:
        labels.append(f"{w} {r['execution']}")
        times.append(r["step_ms"])
        total = sum(r[f"ms:{c}"] for c in CLASSES) or 1.0
        shares.append({c: r[f"ms:{c}"] / total for c in CLASSES})
  a.barh(labels, times, color="tab:blue")
  a.set_xscale("log")
  a.invert_yaxis()
  a.set_xlabel("step time (ms, log scale)")
  left = np.zeros(len(labels))
  cmap = plt.get_cmap("tab10")
  for i, cls in enumerate(CLASSES):
    widths = np.array([s[cls] for s in shares]) * 100
    if widths.any():
      b.barh(labels, widths, left=left, color=cmap(i % 10), label=cls)
      left += widths
  b.invert_yaxis()
  b.set_yticklabels([])
  b.set_xlabel("% of op time by class")
  b.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  results.save_figure(fig, path, dpi=110, bbox_inches="tight")
  plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The report.


def _machine(runs: list[Run], peaks: Optional[dict]) -> list[str]:
  env = next((r.record["environment"] for r in runs if r.record), None)
  if env is None:
    return ["_no run finished: machine unknown_"]
  lines = [f"- machine: {env['processor']}, {env['cpu_count']} CPUs ({env['cpu_affinity']} "
           f"usable), {env['platform']}",
           f"- backend: {env['backend']} ({env['device_kind']}, {env['device_count']} device(s))",
           f"- software: python {env['python']}, jax {env['jax']}, jaxlib {env['jaxlib']}, "
           f"flax {env['flax']}, optax {env['optax']}, numpy {env['numpy']}"]
  if peaks:
    lines.append(f"- measured peaks: matmul {peaks['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s "
                 f"({peaks['dtype']}), copy {peaks['copy_bytes_per_s'] / 1e9:.1f} GB/s")
  return lines


def _shares_of(run: Run) -> dict:
  return {c: v["share_of_step"] for c, v in run.summary["by_class"].items()}


@dataclasses.dataclass(frozen=True)
class _Out:
  """Where a report's figures and tables go."""
  study_dir: str

  def figure(self, name: str) -> str:
    return os.path.join(self.study_dir, FIGURES, name)

  def table(self, name: str, rows: list[dict]) -> None:
    _write_csv(os.path.join(self.study_dir, TABLES, name), rows)


def _suite_section(runs: list[Run], peaks: Optional[dict], out: _Out) -> list[str]:
  suite = suite_rows(runs, peaks)
  out.table("suite.csv", suite)
  md = ["## The suite", "", "Unprofiled step times (median), model FLOPs from the cost model "
        "(every loop iteration counted), MFU against the matmul peak above; coverage is the "
        "share of the profiled step that op events explain.", "",
        markdown_table(suite, ["workload", "mode", "batch", "step_ms", "throughput_per_s", "unit",
                               "model_gflop_per_step", "gflop_per_s", "mfu", "coverage"])]
  suite_runs = _completed(runs, "suite")
  panels = [(mode, [r.point.workload for r in suite_runs if r.point.mode == mode],
             [_shares_of(r) for r in suite_runs if r.point.mode == mode])
            for mode in ("train", "infer")]
  panels = [p for p in panels if p[1]]
  if panels:
    plot_class_bars(panels, out.figure("breakdown.png"), "time per op class, share of step")
    md += ["![time per op class](figures/breakdown.png)", ""]
  return md


def _train_vs_infer_section(runs: list[Run], out: _Out) -> list[str]:
  rows = train_vs_infer_rows(runs)
  out.table("train_vs_infer.csv", rows)
  return ["## Training versus inference", "", "Per-example time of a training step over an "
          "inference step, and the class that takes the most time in each.", "",
          markdown_table(rows), ""]


def _phase_section(runs: list[Run], peaks: Optional[dict], out: _Out) -> list[str]:
  rows = phase_rows(runs, peaks)
  if not rows:
    return []
  out.table("phases.csv", rows)
  balance = (f" (this machine: {peaks['matmul_flops_per_s'] / peaks['copy_bytes_per_s']:.1f} "
             "FLOP/byte)" if peaks else "")
  return ["## Phases of a step: prefill and decode", "",
          "Steps whose phases run under named scopes, timed apart from the profiled step's ops: "
          "a language model prefills its prompt once, then decodes one token at a time, reading "
          "the weights and the key/value cache again for every token. A phase whose FLOPs per "
          f"byte moved fall below the machine's balance point{balance} is bound by memory "
          "bandwidth; its GB/s are the bandwidth it drew.", "",
          markdown_table(rows, ["workload", "phase", "ms_per_step", "us_per_token",
                                "mb_per_token", "flops_per_byte", "gb_per_s",
                                "share_of_copy_peak", "bound", "top_class", "top_class_share"]),
          ""]


def _similarity_section(runs: list[Run], out: _Out) -> list[str]:
  md = ["## Similarity", "", "Vectors of time per op class (as shares of op time), cosine "
        "similarity, average-linkage clustering (UPGMA) on cosine distance.", ""]
  for mode in ("train", "infer"):
    names, vectors = similarity_of(runs, mode)
    if not names:
      continue
    sim = similarity.cosine_similarity(vectors)
    rows = [{"workload": n, **{m: float(sim[i, j]) for j, m in enumerate(names)}}
            for i, n in enumerate(names)]
    out.table(f"similarity_{mode}.csv", rows)
    similarity.plot_dendrogram(names, vectors, out.figure(f"dendrogram_{mode}.png"),
                               f"workload similarity, {mode}")
    md += [f"### {mode}", "", markdown_table(rows),
           f"![dendrogram {mode}](figures/dendrogram_{mode}.png)", ""]
  return md


def _fusion_section(runs: list[Run], out: _Out) -> list[str]:
  rows = fusion_rows(runs)
  if not rows:
    return []
  out.table("fusion.csv", rows)
  plot_fusion(rows, out.figure("fusion.png"), "train step: compiled, unfused, eager")
  return ["## Fused versus per-op execution", "", "The train step as XLA compiles it, compiled "
          "with the fusion passes off (each op its own kernel), and dispatched eagerly op by op "
          "(jit disabled, loops run in Python). Ops per step counts executed op events; bytes "
          "moved are the cost model's per executed op. A class's time is its share of the profiled "
          "step times the unprofiled step time.", "",
          markdown_table(rows, ["workload", "execution", "step_ms", "slowdown_vs_compiled",
                                "ops_per_step", "mb_moved_per_step", "coverage",
                                "classes_present"]),
          *[f"- {s}" for s in fusion_findings(rows)], "", "![fusion](figures/fusion.png)", ""]


def _component_kind_section(runs: list[Run], out: _Out) -> list[str]:
  rows = component_kind_rows(runs)
  if not rows:
    return []
  out.table("component_kinds.csv", rows)
  return ["## Where the classes sit in each model", "",
          "The profiled step's time by model component (op_name paths of modules and named "
          "scopes, repeated blocks summed as one kind), the five largest per run, with the "
          "classes each holds (5% and more of it): the parts a time-per-class view sums over.",
          "", markdown_table(rows, ["workload", "mode", "component", "share_of_step",
                                    "ms_per_step", "classes"]), ""]


def _component_diff_section(runs: list[Run], out: _Out) -> list[str]:
  rows = component_diff_rows(runs)
  if not rows:
    return []
  out.table("component_diffs.csv", rows)
  from fathom_jax.analysis import diff
  return ["## Which components changed", "",
          "The same train step run two ways, compared per model component (`python -m "
          "fathom_jax.analysis diff`, components at layer depth, with their pass): the largest "
          f"increases and decreases whose interval excludes zero ({diff.METHOD}). An eager "
          "step runs one small program per op, whose names keep little of the model: its "
          "components mostly do not match.", "",
          markdown_table(rows, ["workload", "comparison", "component", "a_ms", "b_ms",
                                "diff_ms", "ci_low_ms", "ci_high_ms", "unmatched_components"]),
          ""]


def _scaling_sections(runs: list[Run], out: _Out) -> list[str]:
  """Thread scaling, then device scaling beside it."""
  md = []
  threads, fits = thread_rows(runs)
  if threads:
    out.table("threads.csv", threads)
    out.table("amdahl.csv", fits)
    plot_scaling(threads, "cpus", out.figure("threads.png"), "CPU thread scaling (train step)",
                 fits)
    class_cols = [k for k in dict.fromkeys(k for f in fits for k in f) if k.startswith("speedup:")]
    md += ["## CPU thread scaling", "", "Each point is its own process, its CPU affinity set "
           "before JAX starts. Amdahl's law t(n) = serial + parallel/n fitted by non-negative "
           "least squares; dashed lines are the fits.", "",
           markdown_table(fits, ["workload", "cpus", "speedup", "parallel_fraction",
                                 "max_speedup", "rms_error"] + class_cols),
           "![threads](figures/threads.png)", ""]
  devices = device_rows(runs)
  if devices:
    out.table("devices.csv", devices)
    plot_devices(devices, out.figure("devices.png"),
                 "device scaling (train step, fixed global batch)")
    md += ["## Device scaling", "", "Data-parallel over 1, 2, 4, ... devices at a fixed global "
           "batch (on a CPU machine the devices are virtual and share its cores); communication "
           "is the collectives' class.", "",
           markdown_table(devices), "![devices](figures/devices.png)", ""]
  return md


def _implementation_section(runs: list[Run], out: _Out) -> list[str]:
  rows = implementation_rows(runs)
  if not rows:
    return []
  out.table("implementations.csv", rows)
  names = [r["workload"] for r in rows]
  panels = [(name, names, [{c: r[f"{name}_ms:{c}"] for c in CLASSES} for r in rows])
            for name in ("reference", "tuned")]
  plot_class_bars(panels, out.figure("implementations.png"),
                  "train step as written (reference) and tuned for XLA:CPU, ms per op class",
                  key="ms")
  return ["## What the breakdown found in XLA:CPU: reference against tuned", "",
          "The train step as written with flax.linen and autodiff (`--implementation=reference`) "
          "and rewritten where XLA's CPU backend measured faster (`tuned`): unprofiled step "
          "times, and each class's time (its share of the profiled step times the step time).",
          "", markdown_table(rows, ["workload", "reference_ms", "tuned_ms", "speedup",
                                    "shrank_most"]),
          "", "![reference against tuned](figures/implementations.png)", ""]


def _target_section(runs: list[Run], peaks: Optional[dict], out: _Out) -> list[str]:
  rows = target_rows(runs, peaks)
  if not rows:
    return []
  out.table("targets.csv", rows)
  devices = list(dict.fromkeys(r["device"] for r in rows))
  panels = [(device, [f"{r['workload']} {r['mode']}" for r in rows if r["device"] == device],
             [{c: r[f"time_share:{c}"] for c in CLASSES} for r in rows if r["device"] == device])
            for device in devices]
  plot_class_bars(panels, out.figure("targets.png"),
                  "estimated time per op class, share of step (static: no device ran)")
  return ["## The same steps on other devices (static estimates)", "",
          "Each step compiled for devices this machine lacks (`run.py --target`, the reference "
          "implementation) and, for comparison, this machine's compiled steps, all read the same "
          "way: FLOPs by our cost model, and per op the larger of its FLOPs over the device's "
          "peak and its bytes over its memory bandwidth (this machine's measured peaks above, "
          "the targets' datasheet figures). The times are floors, not measurements: nothing "
          "was autotuned or run. Fusions and library calls are counted as launched per step; "
          "memory is the compiler's (arguments, outputs, temporaries).", "",
          markdown_table(rows, ["workload", "mode", "device", "gflop", "estimated_ms",
                                "fusions", "library_calls", "memory_gb"]),
          "", "![targets](figures/targets.png)", ""]


def _roofline_section(runs: list[Run], peaks: Optional[dict], out: _Out) -> list[str]:
  points = roofline_points(runs)
  if not (points and peaks):
    return []
  flops_peak, bytes_peak = peaks["matmul_flops_per_s"], peaks["copy_bytes_per_s"]
  out.table("roofline.csv", points)
  roofline.plot(points, flops_peak, bytes_peak, out.figure("roofline.png"),
                "roofline: every op of the suite's runs")
  top = [{**p, "of_roof": p["flops_per_s"] / float(roofline.attainable(p["intensity"],
                                                                        flops_peak, bytes_peak))}
         for p in sorted(points, key=lambda p: -p["time_us"])[:10]]
  return ["## Roofline", "", "Each op's FLOPs per byte (cost model) and achieved FLOP/s (its "
          "FLOPs over its measured time) under the measured peaks; marker area is time. The copy "
          "peak is a stream through main memory: ops whose operands stay in cache (small "
          "presets) can sit above it. On CPU, XLA may run a large dot or convolution "
          "asynchronously on its thread pool, and the op's event then closes before the work "
          "does: such ops sit above the matmul ceiling, and the rest of their time shows as "
          "uncovered step time.", "",
          "![roofline](figures/roofline.png)", "", "The ten ops that take the most time:", "",
          markdown_table(top, ["run", "name", "fathom_class", "intensity", "flops_per_s",
                               "of_roof", "time_us"])]


def _runs_section(runs: list[Run], study_dir: str, redone: Sequence[str] = ()) -> list[str]:
  md = ["## Runs", "", "| point | status | command |", "|---|---|---|"]
  for r in runs:
    link = f" ([run]({os.path.relpath(r.run_dir, study_dir)}))" if r.run_dir else ""
    status = r.status + (f": {r.error}" if r.error and r.status != "completed" else "")
    if r.point.id in redone:
      status += " (run again: the earlier run's files were damaged)"
    md.append(f"| {r.point.id}{link} | {status} | `{r.command}` |")
  return md


def build(study_dir: str) -> str:
  """Writes report.md, figures/*.png and tables/*.csv; returns the report's path."""
  meta, runs, peaks = load(study_dir)
  for folder in (FIGURES, TABLES):
    os.makedirs(os.path.join(study_dir, folder), exist_ok=True)
  out = _Out(study_dir)
  done = sum(r.status == "completed" for r in runs)
  md = ["# fathom_jax study", "", *_machine(runs, peaks),
        f"- reproduce: `{meta.get('command', '')}` (resumes; every run's own command is in "
        "the run list below)", "", f"{done} of {len(runs)} runs completed.", "",
        *_suite_section(runs, peaks, out), *_train_vs_infer_section(runs, out),
        *_phase_section(runs, peaks, out), *_component_kind_section(runs, out),
        *_similarity_section(runs, out), *_fusion_section(runs, out),
        *_component_diff_section(runs, out),
        *_scaling_sections(runs, out), *_implementation_section(runs, out),
        *_target_section(runs, peaks, out),
        *_roofline_section(runs, peaks, out),
        *_runs_section(runs, study_dir, meta.get("redone_after_damage") or ())]
  path = os.path.join(study_dir, REPORT_FILE)
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(md) + "\n")
  os.replace(path + ".tmp", path)
  return path
