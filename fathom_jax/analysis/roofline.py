"""The roofline: each op's arithmetic intensity (FLOPs per byte, from the cost model) and achieved
FLOP/s (its FLOPs over its measured time), under the machine's measured ceilings."""

from typing import Iterable, Sequence

import numpy as np

from fathom_jax import results
from fathom_jax.analysis import categories


def op_points(rows: Iterable[dict], label: str = "") -> list[dict]:
  """ops.csv rows -> points of ops that do arithmetic and moved bytes in measured time."""
  points = []
  for r in rows:
    flops, nbytes = float(r["flops"] or 0), float(r["bytes"] or 0)
    occurrences, busy_us = int(r["occurrences"] or 0), float(r["busy_time_us"] or 0)
    if flops <= 0 or nbytes <= 0 or occurrences <= 0 or busy_us <= 0:
      continue
    points.append({"run": label, "program": r["program"], "name": r["name"],
                   "fathom_class": r["fathom_class"], "xla_category": r["xla_category"],
                   "intensity": flops / nbytes,
                   "flops_per_s": flops * occurrences / (busy_us * 1e-6),
                   "time_us": float(r["total_time_us"] or 0)})
  return points


def attainable(intensity, peak_flops: float, peak_bytes: float) -> np.ndarray:
  return np.minimum(peak_flops, np.asarray(intensity, dtype=float) * peak_bytes)


def plot(points: Sequence[dict], peak_flops: float, peak_bytes: float, path: str,
         title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  ridge = peak_flops / peak_bytes
  lo = min([p["intensity"] for p in points] + [ridge / 100]) / 2
  hi = max([p["intensity"] for p in points] + [ridge * 100]) * 2
  xs = np.geomspace(lo, hi, 200)
  ax.plot(xs, attainable(xs, peak_flops, peak_bytes), color="black", lw=1.2,
          label=f"peaks: {peak_flops / 1e9:.0f} GFLOP/s, {peak_bytes / 1e9:.1f} GB/s")
  present = {p["fathom_class"] for p in points}
  cmap = plt.get_cmap("tab10")  # indexed as in the breakdown figures: one colour per class
  total = sum(p["time_us"] for p in points) or 1.0
  for i, cls in enumerate(categories.CLASSES):
    if cls not in present:
      continue
    mine = [p for p in points if p["fathom_class"] == cls]
    # Marker area follows the op's share of time: the big circles are the ones that matter.
    ax.scatter([p["intensity"] for p in mine], [p["flops_per_s"] for p in mine],
               s=[8 + 400 * p["time_us"] / total for p in mine], alpha=0.6, color=cmap(i % 10),
               label=cls, edgecolors="none")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("arithmetic intensity (FLOP/byte)")
  ax.set_ylabel("achieved FLOP/s")
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  results.save_figure(fig, path, dpi=110)
  plt.close(fig)
