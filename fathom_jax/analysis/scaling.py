"""Scaling with threads and devices: speedups and Amdahl's law fitted to measured step times."""

from typing import Sequence

import numpy as np


def amdahl_fit(counts: Sequence[int], times: Sequence[float]) -> dict:
  """Fits t(n) = serial + parallel / n by non-negative least squares.

  Returns the parallel fraction p = parallel / (serial + parallel) of the one-worker time, the
  fitted one-worker time, the speedup the fit predicts with unlimited workers (1 / (1 - p)) and
  the fit's relative RMS error. With one count there is nothing to fit: p is None.
  """
  from scipy.optimize import nnls
  n = np.asarray(counts, dtype=float)
  t = np.asarray(times, dtype=float)
  if len(set(counts)) < 2:
    return {"parallel_fraction": None, "t1_s": float(t[0]) if len(t) else None,
            "max_speedup": None, "rms_error": None}
  design = np.stack([np.ones_like(n), 1.0 / n], axis=1)
  (serial, parallel), _ = nnls(design, t)
  t1 = serial + parallel
  p = parallel / t1 if t1 > 0 else 0.0
  fitted = design @ np.array([serial, parallel])
  return {"parallel_fraction": float(p), "t1_s": float(t1),
          "max_speedup": float(1 / (1 - p)) if p < 1 else float("inf"),
          "rms_error": float(np.sqrt(np.mean(((fitted - t) / t) ** 2)))}


def amdahl_speedup(parallel_fraction: float, n) -> np.ndarray:
  n = np.asarray(n, dtype=float)
  return 1.0 / ((1.0 - parallel_fraction) + parallel_fraction / n)


def speedups(counts: Sequence[int], times: Sequence[float]) -> list[float]:
  """Speedup of each point over the point with the fewest workers."""
  base = times[int(np.argmin(counts))]
  return [base / t if t > 0 else float("nan") for t in times]
