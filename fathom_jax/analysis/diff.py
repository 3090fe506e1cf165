"""Two runs compared: step time, classes, XLA categories and model components, with intervals.

    python -m fathom_jax.analysis diff A B [--output_dir=DIR] [--component_depth=layer]

A and B are run folders (or study points, or any trace folder the breakdown command reads); a
run compiled for a device this machine lacks (`run.py --target`) takes part with its static
estimates, which have one value and no interval.
The runs are matched on what survives recompilation: Fathom classes, XLA categories, and model
components (op_name paths and passes), never HLO instruction names, which change from one
compilation to the next. Each row gives the time per step in A and in B, the difference B - A
and its 95% confidence interval, from the per-step samples the breakdown keeps
(`samples` in breakdown.json): a percentile bootstrap (`RESAMPLES` resamplings of each run's
steps, with replacement, independently; a fixed seed, so the same inputs give the same
intervals). A difference is flagged only where its interval excludes zero.
"""

import dataclasses
import glob
import json
import os
from typing import Optional

import numpy as np

from fathom_jax import results
from fathom_jax.analysis import breakdown, components, static
from fathom_jax.errors import DataError, UsageError

RESAMPLES = 2000
CONFIDENCE = 0.95
DIFF_CSV, DIFF_MD, DIFF_FIGURE = "diff.csv", "diff.md", "diff.png"
TABLES = (("step", "step"), ("class", "by_class"), ("xla category", "by_xla_category"),
          ("component", "by_component"))
METHOD = (f"difference of mean time per step, B - A; {CONFIDENCE:.0%} percentile bootstrap "
          f"interval over steps ({RESAMPLES} resamplings of each run, seed 0); flagged where "
          "the interval excludes zero")


@dataclasses.dataclass(frozen=True)
class Side:
  """One run's samples, as read from its folder."""
  label: str
  folder: str
  workload: Optional[str]
  mode: Optional[str]
  backend: Optional[str]
  samples: Optional[dict]  # breakdown.json's 'samples' of a measured run
  estimate: Optional[dict] = None  # {table: {key: seconds}} of a static one (--target)


def _run_folder(path: str) -> str:
  """The folder holding a run's breakdown or trace: `path`, or the one run folder inside it (a
  study point's folder holds its run's)."""
  if not os.path.exists(path):
    raise UsageError(f"{path} does not exist")
  if not os.path.isdir(path):
    raise UsageError(f"{path} is not a folder (a run folder, a study point or a trace folder)")
  marks = (breakdown.BREAKDOWN_FILE, results.RESULT_FILE, static.STATIC_FILE)
  if any(os.path.exists(os.path.join(path, m)) for m in marks):
    return path
  runs = sorted(d for d in (os.path.join(path, n) for n in os.listdir(path))
                if os.path.isdir(d) and any(os.path.exists(os.path.join(d, m)) for m in marks))
  if len(runs) == 1:
    return runs[0]
  if len(runs) > 1:
    raise UsageError(f"{path} holds {len(runs)} runs; name one of them")
  if glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True):
    return path
  raise UsageError(f"{path} holds no breakdown.json and no trace (run with --profile, or give "
                   "a folder jax.profiler.trace wrote)")


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror})") from None
  except ValueError:
    raise DataError(f"{path}: damaged (not JSON); run the breakdown command on its folder "
                    "again") from None
  if not isinstance(value, dict):
    raise DataError(f"{path}: damaged (not a JSON object)")
  return value


def read_side(path: str, label: str) -> Side:
  folder = _run_folder(path)
  record_path = os.path.join(folder, results.RESULT_FILE)
  record = _read_json(record_path) if os.path.exists(record_path) else {}
  if record and results.unfinished(record):
    raise DataError(f"{folder}: the run is {results.unfinished(record)}; a diff compares "
                    "completed runs")
  static_path = os.path.join(folder, static.STATIC_FILE)
  if os.path.exists(static_path):
    estimate = _read_json(static_path)
    try:
      tables = {"step": {"step": estimate["estimated_step_s"]},
                **{key: {k: v["estimated_s"] for k, v in estimate[field].items()}
                   for key, field in (("by_class", "classes"),
                                      ("by_xla_category", "xla_categories"),
                                      ("by_component", "components"))}}
    except (KeyError, TypeError, AttributeError):
      raise DataError(f"{static_path}: damaged, or written before components were kept; "
                      "compile the target again") from None
    target = (record.get("target") or {}).get("name") or "a target"
    return Side(label, folder, record.get("workload"), record.get("mode"),
                f"{target} (static estimate)", None, tables)
  summary_path = os.path.join(folder, breakdown.BREAKDOWN_FILE)
  summary = _read_json(summary_path) if os.path.exists(summary_path) else None
  if summary is None or "samples" not in summary:
    # No breakdown, or one written before per-step samples were kept: analyse the trace.
    try:
      summary = breakdown.analyse(*_trace_and_programs(folder)).summary
    except DataError as e:
      raise DataError(f"{folder}: no per-step samples and no readable trace ({e})") from None
  samples = summary.get("samples")
  if not isinstance(samples, dict) or not samples.get("wall_s"):
    raise DataError(f"{summary_path}: damaged (no per-step samples)")
  return Side(label, folder, record.get("workload"), record.get("mode"),
              (record.get("environment") or {}).get("backend"), samples)


def _trace_and_programs(folder: str):
  from fathom_jax.analysis import __main__ as command, trace
  traces = trace.read_all(folder)
  return traces, breakdown.load_programs(traces, command.hlo_beside(folder))


def check_comparable(a: Side, b: Side) -> None:
  if a.workload and b.workload and a.workload != b.workload:
    raise UsageError(f"A is a {a.workload} run and B a {b.workload} run; a diff compares two "
                     "runs of one workload")
  if a.mode and b.mode and a.mode != b.mode:
    raise UsageError(f"A is a {a.mode} run and B an {b.mode} run; a diff compares the same step")


def interval(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
  """(mean(b) - mean(a), low, high): the percentile bootstrap interval of the difference."""
  rng = np.random.default_rng(seed)
  means_a = rng.choice(a, size=(RESAMPLES, len(a)), replace=True).mean(axis=1)
  means_b = rng.choice(b, size=(RESAMPLES, len(b)), replace=True).mean(axis=1)
  tail = (1 - CONFIDENCE) / 2 * 100
  low, high = np.percentile(means_b - means_a, [tail, 100 - tail])
  return float(b.mean() - a.mean()), float(low), float(high)


def _series(side: Side, key: str) -> dict:
  """{name: per-step seconds (an array), or one estimated value (a float)}."""
  if side.samples is None:
    return dict(side.estimate.get(key, {}))
  if key == "step":
    return {"step": side.samples["wall_s"]}
  return dict(side.samples.get(key, {}))


def _at_depth(series: dict, depth: Optional[int]) -> dict:
  """Full-depth component values ('path|pass') summed at `depth`."""
  out: dict[str, np.ndarray] = {}
  for key, values in series.items():
    path, _, pass_ = key.rpartition("|")
    tokens = tuple(path.split("/")) if path and path != components.TOP_LEVEL else ()
    name = f"{components.name(tokens, depth)}|{pass_}"
    out[name] = out.get(name, 0) + np.asarray(values, float)
  return out


def compare(a: Side, b: Side, depth: Optional[int] = components.DEPTHS["layer"]) -> list[dict]:
  """Rows of the comparison, step first, then each table's keys by the size of the change."""
  rows = []
  for table, key in TABLES:
    series_a, series_b = _series(a, key), _series(b, key)
    if key == "by_component":
      series_a, series_b = _at_depth(series_a, depth), _at_depth(series_b, depth)
    table_rows = []
    for name in dict.fromkeys([*series_a, *series_b]):
      row = {"table": table, "name": name}
      if name not in series_a or name not in series_b:
        only = "A" if name in series_a else "B"
        values = np.asarray((series_a if only == "A" else series_b)[name], float)
        row.update(matched=f"only in {only}", a_ms=values.mean() * 1e3 if only == "A" else None,
                   b_ms=values.mean() * 1e3 if only == "B" else None)
      else:
        va, vb = (np.atleast_1d(np.asarray(s[name], float)) for s in (series_a, series_b))
        if a.samples is None or b.samples is None:  # an estimate: one value, no interval
          d, low, high, significant = vb.mean() - va.mean(), None, None, None
        else:
          d, low, high = interval(va, vb)
          significant = bool(low > 0 or high < 0)
        row.update(matched="both", a_ms=va.mean() * 1e3, b_ms=vb.mean() * 1e3, diff_ms=d * 1e3,
                   ci_low_ms=None if low is None else low * 1e3,
                   ci_high_ms=None if high is None else high * 1e3,
                   change=d / va.mean() if va.mean() > 0 else None, significant=significant)
      table_rows.append(row)
    table_rows.sort(key=lambda r: -abs(r.get("diff_ms") or r.get("a_ms") or r.get("b_ms") or 0))
    rows += table_rows
  return rows


FIELDS = ("table", "name", "matched", "a_ms", "b_ms", "diff_ms", "ci_low_ms", "ci_high_ms",
          "change", "significant")


def _fmt(v) -> str:
  if v is None:
    return ""
  if isinstance(v, bool):
    return "yes" if v else ""
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def _described(side: Side) -> str:
  if side.samples is None:
    return f"{side.backend or 'a target'}, one value"
  return (f"{side.backend or 'backend unknown'}, {len(side.samples['wall_s'])} "
          f"{side.samples['unit']}s")


def _method(a: Side, b: Side) -> str:
  if a.samples is None or b.samples is None:
    return "difference of time per step, B - A; an estimate has no interval and flags nothing"
  return METHOD


def format_table(rows: list[dict], a: Side, b: Side, top: int = 12) -> str:
  lines = [f"== diff: A {a.folder} ({_described(a)})\n         B {b.folder} ({_described(b)})",
           f"   ({_method(a, b)}) =="]
  estimate = a.samples is None or b.samples is None
  for table, _ in TABLES:
    shown = [r for r in rows if r["table"] == table and r["matched"] == "both"
             and (table == "step" or estimate or r["significant"])][:top]
    if not shown:
      continue
    lines.append(f"  {table:<46s} {'A ms':>9s} {'B ms':>9s} {'B-A ms':>9s} {'95% CI':>21s}")
    for r in shown:
      label = r["name"] if len(r["name"]) <= 46 else "..." + r["name"][-43:]
      ci = ("(no interval)" if r["ci_low_ms"] is None else
            f"[{r['ci_low_ms']:+8.3f}, {r['ci_high_ms']:+8.3f}]" + (" *" if r["significant"]
                                                                   else ""))
      lines.append(f"  {label:<46s} {r['a_ms']:9.4g} {r['b_ms']:9.4g} {r['diff_ms']:+9.4g} "
                   f"{ci:>21s}")
  unmatched = [r for r in rows if r["matched"] != "both"]
  if unmatched:
    lines.append(f"  not matched: {len(unmatched)} (" + ", ".join(
        f"{r['table']} {r['name']} {r['matched']}" for r in unmatched[:4])
        + (", ..." if len(unmatched) > 4 else "") + "); all in diff.csv")
  return "\n".join(lines)


def write(rows: list[dict], a: Side, b: Side, output_dir: str) -> dict[str, str]:
  os.makedirs(output_dir, exist_ok=True)
  paths = {name: os.path.join(output_dir, name) for name in (DIFF_CSV, DIFF_MD, DIFF_FIGURE)}
  results.write_text_atomic(paths[DIFF_CSV], results.csv_text(rows, FIELDS))
  md = [f"# {a.workload or 'run'} {a.mode or ''}: B against A", "",
        f"- A: `{a.folder}` ({_described(a)})", f"- B: `{b.folder}` ({_described(b)})",
        f"- method: {_method(a, b)}", ""]
  for table, _ in TABLES:
    part = [r for r in rows if r["table"] == table]
    if not part:
      continue
    md += [f"## {table}", "", "| " + " | ".join(FIELDS[1:]) + " |", "|" + "---|" * (len(FIELDS) - 1)]
    md += ["| " + " | ".join(_fmt(r.get(f)) for f in FIELDS[1:]) + " |" for r in part]
    md.append("")
  results.write_text_atomic(paths[DIFF_MD], "\n".join(md))
  plot(rows, paths[DIFF_FIGURE], f"{a.workload or 'run'} {a.mode or ''}: B - A, ms per step")
  return paths


def plot(rows: list[dict], path: str, title: str) -> None:
  """The step and each class: B - A with its interval."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  shown = [r for r in rows if r["table"] in ("step", "class") and r["matched"] == "both"]
  fig, ax = plt.subplots(figsize=(8, 0.4 * len(shown) + 1.2))
  y = np.arange(len(shown))[::-1]
  diffs = [r["diff_ms"] for r in shown]
  errors = None
  if all(r["ci_low_ms"] is not None for r in shown):
    errors = [[r["diff_ms"] - r["ci_low_ms"] for r in shown],
              [r["ci_high_ms"] - r["diff_ms"] for r in shown]]
  colors = ["#c44e52" if r["significant"] else "#999999" for r in shown]
  ax.barh(y, diffs, xerr=errors, color=colors, capsize=3)
  ax.axvline(0, color="black", linewidth=0.8)
  ax.set_yticks(y, [r["name"] for r in shown], fontsize=8)
  ax.set_xlabel("B - A, ms per step (95% interval; red: excludes zero)")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  results.save_figure(fig, path, dpi=110)
  plt.close(fig)


def run(path_a: str, path_b: str, output_dir: str,
        depth: Optional[int] = components.DEPTHS["layer"]) -> tuple[list[dict], str, dict]:
  a, b = read_side(path_a, "A"), read_side(path_b, "B")
  check_comparable(a, b)
  rows = compare(a, b, depth)
  return rows, format_table(rows, a, b), write(rows, a, b, output_dir)
