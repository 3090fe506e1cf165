#!/usr/bin/env python3
"""Helpers of benchmarks/gpu_check.sh: collect the tiny runs' results, merge the peaks, run
xprof's converters on a profiled run, pack a run folder, and print the closing summary.

  python benchmarks/gpu_check.py missing RUNS_DIR WORKLOADS      # workloads lacking a result
  python benchmarks/gpu_check.py tiny RUNS_DIR OUT.json           # results -> one file, a table
  python benchmarks/gpu_check.py peaks OUT.json A.json [B.json]   # peak files -> one file
  python benchmarks/gpu_check.py xprof RUN_DIR                    # hlo_stats, op_profile, compare
  python benchmarks/gpu_check.py pack RUN_DIR OUT.tar.gz          # the run folder, under 15 MiB
  python benchmarks/gpu_check.py summary WORK_DIR OUT_DIR         # the closing table

Each command prints what it found and exits 0 unless its own inputs are unusable: a failed
workload is a row of the table, not an error of the helper. No command imports JAX.
"""

import csv
import glob
import json
import os
import shutil
import sys
import tarfile
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKLOADS = ("autoenc", "memnet", "alexnet", "vgg", "residual", "seq2seq", "speech", "deepq")
MODES = ("train", "infer")
PACK_LIMIT = 15 << 20  # $OUT takes files of at most 16 MiB
# Files xprof's converters cache beside a trace (use_saved_result): derived, and large on a GPU.
XPROF_CACHES = (".hlo_proto.pb", ".op_stats_v2.pb", ".op_stats.pb")


def _expand(workloads: str) -> list[str]:
  return list(WORKLOADS) if workloads == "all" else workloads.split(",")


def _results(runs_dir: str) -> list[dict]:
  records = []
  for path in sorted(glob.glob(os.path.join(runs_dir, "*", "result.json"))):
    try:
      with open(path) as f:
        records.append(json.load(f))
    except (OSError, ValueError) as e:
      print(f"unreadable {path}: {e}")
  return records


def missing(runs_dir: str, workloads: str) -> int:
  """Workloads with no result for some mode: a run.py process that stopped at a failed workload
  never reached the ones after it."""
  have = {(r.get("workload"), r.get("mode")) for r in _results(runs_dir)}
  print(" ".join(w for w in _expand(workloads) if any((w, m) not in have for m in MODES)))
  return 0


def _ms(seconds) -> str:
  return f"{seconds * 1e3:.2f}" if isinstance(seconds, (int, float)) else "-"


def tiny(runs_dir: str, out: str) -> int:
  records = _results(runs_dir)
  with open(out, "w") as f:
    json.dump(records, f, indent=1)
  print(f"{'workload':<9} {'mode':<5} {'status':<10} {'batch':>5} {'compile s':>9} "
        f"{'step ms':>9} {'loss first -> last':>20}  error")
  for r in sorted(records, key=lambda r: (r.get("workload", ""), r.get("mode", ""))):
    f = r.get("figures", {})
    compile_s = (f.get("lower_time_s") or 0) + (f.get("compile_time_s") or 0)
    losses = f.get("losses") or []
    loss = f"{losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "-"
    print(f"{r.get('workload', '?'):<9} {r.get('mode', '?'):<5} {r.get('status', '?'):<10} "
          f"{r.get('config', {}).get('batch_size', '?'):>5} {compile_s:>9.2f} "
          f"{_ms(f.get('step_time_s', {}).get('median')):>9} {loss:>20}  "
          f"{r.get('error', '')[:120]}")
  return 0


def peaks(out: str, paths: list[str]) -> int:
  merged = {}
  for path in paths:
    try:
      with open(path) as f:
        figures = json.load(f)
    except (OSError, ValueError) as e:
      print(f"no peaks from {path}: {e}")
      continue
    merged[figures.get("dtype", os.path.basename(path))] = figures
  with open(out, "w") as f:
    json.dump(merged, f, indent=1)
  for dtype, p in merged.items():
    print(f"peak {dtype}: matmul {p['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s, copy "
          f"{p['copy_bytes_per_s'] / 1e9:.0f} GB/s on {p.get('device_kind')}")
  return 0


def _xplanes(run_dir: str) -> list[str]:
  return sorted(glob.glob(os.path.join(run_dir, "plugins", "profile", "*", "*.xplane.pb")))


def xprof(run_dir: str) -> int:
  """xprof's hlo_stats and op_profile of the run's trace, saved in RUN_DIR/xprof/, and ours
  (ops.csv) compared with hlo_stats. The converters run on a copy of the trace, so that the
  caches they write stay out of the run folder."""
  from fathom_jax.analysis import xprof_check
  try:
    from xprof.convert import raw_to_tool_data
  except ImportError as e:
    print(f"xprof: not importable ({e}); nothing converted")
    return 1
  planes = _xplanes(run_dir)
  if not planes:
    print(f"xprof: no xplane.pb under {run_dir}")
    return 1
  folder = os.path.join(run_dir, "xprof")
  os.makedirs(folder, exist_ok=True)
  report = {"xplanes": [os.path.relpath(p, run_dir) for p in planes]}
  with tempfile.TemporaryDirectory() as tmp:
    copies = []
    for i, plane in enumerate(planes):  # the layout xprof expects: <session>/<host>.xplane.pb
      session = os.path.join(tmp, "plugins", "profile", f"s{i}")
      os.makedirs(session)
      copies.append(shutil.copy(plane, session))
    try:
      report["tools"] = raw_to_tool_data.xspace_to_tool_names(copies)
    except Exception as e:  # a listing only
      report["tools"] = f"{type(e).__name__}: {e}"
    for tool in ("hlo_stats", "op_profile"):
      try:
        data, content_type = raw_to_tool_data.xspace_to_tool_data(copies, tool, {})
      except Exception as e:
        report[tool] = f"{type(e).__name__}: {e}".splitlines()[0]
        continue
      if data is None:
        report[tool] = "no data"
        continue
      with open(os.path.join(folder, f"{tool}.json"), "wb") as f:
        f.write(data if isinstance(data, bytes) else str(data).encode())
      report[tool] = f"{len(data)} bytes, {content_type}"
  print(f"xprof tools: {report['tools']}")
  print(f"xprof hlo_stats: {report['hlo_stats']}; op_profile: {report['op_profile']}")
  rows = []
  path = os.path.join(folder, "hlo_stats.json")
  if os.path.exists(path):
    with open(path, "rb") as f:
      rows = xprof_check.table_rows(f.read())
  ops = []
  if os.path.exists(os.path.join(run_dir, "ops.csv")):
    with open(os.path.join(run_dir, "ops.csv"), newline="") as f:
      ops = list(csv.DictReader(f))
  steps = 0
  try:
    with open(os.path.join(run_dir, "breakdown.json")) as f:
      steps = json.load(f).get("steps", 0)
  except (OSError, ValueError):
    pass
  report["compare"] = xprof_check.compare(ops, rows, steps)
  print(f"ours vs xprof hlo_stats ({len(ops)} ops.csv rows, {len(rows)} xprof rows, {steps} "
        f"steps): {json.dumps(report['compare'])}")
  ours = {r["name"]: r for r in ops}
  top = sorted(rows, key=lambda r: -float(r.get("total_time") or 0))[:15]
  if top:
    print(f"  {'op (top 15 by xprof time)':<34} {'xprof category':<22} {'ours':<22} "
          f"{'xprof us':>10} {'ours us':>10}")
  for row in top:
    name = str(row.get("hlo_op_name"))
    mine = ours.get(name)
    print(f"  {name[:34]:<34} {str(row.get('category'))[:22]:<22} "
          f"{(mine['xla_category_raw'] if mine else '(not in ops.csv)')[:22]:<22} "
          f"{float(row.get('total_time') or 0):>10.1f} "
          f"{float(mine['busy_time_us']) if mine else float('nan'):>10.1f}")
  with open(os.path.join(folder, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  return 0


def pack(run_dir: str, out: str) -> int:
  """The run folder as one tar.gz under PACK_LIMIT: without xprof's caches, and if still too
  large, without the JSON trace and the unoptimised HLO, then without the xplane."""
  name = os.path.basename(os.path.normpath(run_dir))
  drops = [(), (".trace.json.gz", ".unoptimized.hlo.txt"), (".xplane.pb",)]
  dropped = ()
  for extra in drops:
    dropped = dropped + extra
    tmp = out + ".part"
    with tarfile.open(tmp, "w:gz") as tar:
      tar.add(run_dir, arcname=name,
              filter=lambda info: None if info.name.endswith(XPROF_CACHES + dropped) else info)
    if os.path.getsize(tmp) <= PACK_LIMIT or extra == drops[-1]:
      os.replace(tmp, out)  # whole or not at all
      break
  print(f"packed {run_dir} -> {out} ({os.path.getsize(out) / 2**20:.1f} MiB"
        + (f", left out {', '.join(dropped)}" if dropped else "") + ")")
  return 0


# --- summary ---------------------------------------------------------------------------------

def _read(path: str, default=None):
  try:
    with open(path) as f:
      return json.load(f) if path.endswith(".json") else f.read()
  except (OSError, ValueError):
    return default


def _bench_rows(text: str) -> dict:
  """{(workload, mode): {"jax": ms, "jax_compile": s, "jax_mfu": str, "torch-eager": ms,
  "torch-compile": ms, "batch": n}} from bench.txt, whose sections start '## <kind> <name>'."""
  table, kind = {}, None
  for line in text.splitlines():
    parts = line.split()
    if line.startswith("## "):
      kind = parts[1] if len(parts) > 1 else None
      continue
    if len(parts) < 4 or parts[0] not in WORKLOADS or parts[1] not in MODES or kind is None:
      continue
    row = table.setdefault((parts[0], parts[1]), {})
    try:
      if kind == "jax" and parts[2].isdigit():
        row.update(batch=int(parts[2]), jax_compile=parts[3], jax=float(parts[4]),
                   jax_mfu=next((p for p in parts[5:] if p.endswith("%")), ""))
      elif kind.startswith("torch") and "failed:" in parts:
        row[kind] = "failed"
      elif kind.startswith("torch"):
        row[kind] = float(parts[5])
        row.setdefault("batch", int(parts[3]))
    except (IndexError, ValueError):
      pass
  return table


def summary(work: str, out: str) -> int:
  stages = [line.split("\t") for line in (_read(os.path.join(work, "stages.tsv"), "") or
                                          "").splitlines() if line]
  tiny_records = _read(os.path.join(out, "tiny_runs.json"), []) or []
  peak = _read(os.path.join(out, "peaks.json"), {}) or {}
  bench = _bench_rows(_read(os.path.join(out, "bench.txt"), "") or "")
  profiles = {}
  for report in glob.glob(os.path.join(work, "profile", "*", "*", "xprof", "report.json")):
    workload = os.path.relpath(report, os.path.join(work, "profile")).split(os.sep)[0]
    profiles[workload] = (_read(report, {}) or {}).get("compare")
  result = {"stages": [dict(zip(("stage", "status", "seconds", "note"), s)) for s in stages],
            "tiny": {f"{r.get('workload')} {r.get('mode')}": r.get("status")
                     for r in tiny_records},
            "peaks": peak, "xprof_compare": profiles,
            "bench": {f"{w} {m}": v for (w, m), v in bench.items()}}
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(result, f, indent=1)

  lines = ["", "=" * 100, "gpu_check summary", "=" * 100]
  lines.append(f"{'stage':<28} {'status':<12} {'s':>5}  note")
  for s in stages:
    s = s + [""] * (4 - len(s))
    lines.append(f"{s[0]:<28} {s[1]:<12} {s[2]:>5}  {s[3][:60]}")
  by_key = {(r.get("workload"), r.get("mode")): r for r in tiny_records}
  lines.append("")
  lines.append(f"tiny runs ({sum(r.get('status') == 'completed' for r in tiny_records)}/"
               f"{len(WORKLOADS) * len(MODES)} completed): workload  train status/ms/last loss"
               f"  |  infer status/ms")
  for w in WORKLOADS:
    cells = []
    for m in MODES:
      r = by_key.get((w, m))
      if r is None:
        cells.append("no result")
        continue
      f = r.get("figures", {})
      text = f"{r.get('status')} {_ms(f.get('step_time_s', {}).get('median'))}"
      if m == "train" and f.get("losses"):
        text += f" {f['losses'][-1]:.3f}"
      if r.get("status") != "completed":
        text += f" ({r.get('error', '')[:50]})"
      cells.append(text)
    lines.append(f"  {w:<9} {cells[0]:<45} | {cells[1]}")
  lines.append("")
  for dtype, p in peak.items():
    lines.append(f"peak {dtype:<8}: matmul {p['matmul_flops_per_s'] / 1e12:7.1f} TFLOP/s, copy "
                 f"{p['copy_bytes_per_s'] / 1e9:6.0f} GB/s ({p.get('device_kind')})")
  for w, c in sorted(profiles.items()):
    lines.append(f"xprof vs ours, {w}: {json.dumps(c)}")
  if bench:
    lines.append("")
    lines.append(f"paper sizes, bfloat16 (ms/step): {'workload':<9} {'mode':<5} {'batch':>5} "
                 f"{'jax':>9} {'MFU':>6} {'compile s':>9} {'torch':>9} {'compiled':>9} "
                 f"{'torch/jax':>9}")
    for (w, m), row in sorted(bench.items(), key=lambda kv: (WORKLOADS.index(kv[0][0]),
                                                           MODES.index(kv[0][1]))):
      jax_ms = row.get("jax")
      best = [v for v in (row.get("torch-eager"), row.get("torch-compile"))
              if isinstance(v, float)]
      ratio = f"{min(best) / jax_ms:.2f}x" if best and jax_ms else "-"
      cell = lambda v, fmt: (fmt.format(v) if isinstance(v, float) else (v or "-"))
      lines.append(f"{'':<32} {w:<9} {m:<5} {row.get('batch', '-'):>5} "
                   f"{cell(jax_ms, '{:.2f}'):>9} {row.get('jax_mfu', '-'):>6} "
                   f"{row.get('jax_compile', '-'):>9} "
                   f"{cell(row.get('torch-eager'), '{:.2f}'):>9} "
                   f"{cell(row.get('torch-compile'), '{:.2f}'):>9} {ratio:>9}")
    lines.append(f"{'':<32} torch/jax: the faster PyTorch step over JAX's (above 1: JAX faster)")
  lines.append("")
  lines.append(f"files in $OUT: {', '.join(sorted(os.listdir(out)))}")
  print("\n".join(lines))
  return 0


def main(argv: list[str]) -> int:
  commands = {"missing": (missing, 2), "tiny": (tiny, 2), "xprof": (xprof, 1), "pack": (pack, 2),
              "summary": (summary, 2)}
  if len(argv) >= 3 and argv[0] == "peaks":
    return peaks(argv[1], argv[2:])
  if not argv or argv[0] not in commands or len(argv) - 1 != commands[argv[0]][1]:
    print(__doc__, file=sys.stderr)
    return 2
  function, _ = commands[argv[0]]
  return function(*argv[1:])


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
