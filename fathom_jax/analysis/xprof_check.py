"""Cross-check against xprof's own per-op statistics (its 'hlo_stats' tool) for the same trace.

xprof fills hlo_stats from device planes (GPU, TPU); for CPU traces it returns no rows, and the
check says so. Where it has rows, per-op total times and XLA categories are compared with ours.
"""

import json
from typing import Iterable


def hlo_stats(xplane_paths: Iterable[str]) -> list[dict]:
  """xprof's hlo_stats rows as dicts keyed by column id; [] when xprof has none."""
  try:
    from xprof.convert import raw_to_tool_data
  except ImportError:
    return []
  data, _ = raw_to_tool_data.xspace_to_tool_data(list(xplane_paths), "hlo_stats", {})
  return table_rows(data)


def table_rows(data) -> list[dict]:
  """Rows of a Google DataTable JSON document ({"cols": [...], "rows": [{"c": [...]}]})."""
  if not data:
    return []
  table = json.loads(data) if isinstance(data, (bytes, str)) else data
  ids = [c.get("id") for c in table.get("cols", [])]
  rows = []
  for row in table.get("rows", []) or []:
    cells = row.get("c", [])
    rows.append({i: (c or {}).get("v") for i, c in zip(ids, cells)})
  return rows


def compare(ops: list[dict], rows: list[dict], steps: int) -> dict:
  """Our ops.csv rows against xprof's hlo_stats rows, matched by op name.

  time_ratio: our busy time / xprof's total time, over the ops both know; category_agreement:
  the share of that time whose XLA category (unrefined) is the same in both.
  """
  if not rows:
    return {"xprof_rows": 0, "note": "xprof has no hlo_stats rows for this trace (CPU traces "
                                     "have none); nothing to compare"}
  ours = {r["name"]: r for r in ops}
  matched, same_category, our_time, their_time = 0, 0.0, 0.0, 0.0
  for row in rows:
    name = row.get("hlo_op_name")
    if name not in ours:
      continue
    matched += 1
    theirs = float(row.get("total_time") or 0.0)
    mine = float(ours[name]["busy_time_us"])
    our_time += mine
    their_time += theirs
    if str(row.get("category", "")).lower() == ours[name]["xla_category_raw"]:
      same_category += theirs
  return {
      "xprof_rows": len(rows), "matched_ops": matched, "steps": steps,
      "time_ratio": our_time / their_time if their_time else None,
      "category_agreement": same_category / their_time if their_time else None,
  }
