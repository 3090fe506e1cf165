"""How alike workloads are: vectors of time per op class, their cosine similarity, and the
average-linkage (UPGMA) hierarchical clustering the 2016 paper drew as a dendrogram."""

from typing import Mapping, Sequence

import numpy as np

from fathom_jax import results


def class_vectors(shares: Mapping[str, Mapping[str, float]],
                  classes: Sequence[str]) -> tuple[list[str], np.ndarray]:
  """{workload: {class: time}} -> (names, matrix [workload, class]) of the time each class takes
  as a fraction of the workload's covered time (so step lengths do not decide the distance).
  Workloads with no attributed time are left out: they have no direction."""
  names, rows = [], []
  for name, by_class in shares.items():
    row = np.array([max(float(by_class.get(c, 0.0)), 0.0) for c in classes])
    if row.sum() > 0:
      names.append(name)
      rows.append(row / row.sum())
  return names, np.array(rows).reshape(len(rows), len(classes))


def cosine_similarity(vectors: np.ndarray) -> np.ndarray:
  unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
  return np.clip(unit @ unit.T, -1.0, 1.0)


def cluster(vectors: np.ndarray) -> np.ndarray:
  """scipy linkage matrix of average-linkage clustering on cosine distance."""
  from scipy.cluster import hierarchy
  from scipy.spatial import distance
  distances = np.clip(1.0 - cosine_similarity(vectors), 0.0, None)
  np.fill_diagonal(distances, 0.0)
  condensed = distance.squareform((distances + distances.T) / 2, checks=False)
  return hierarchy.linkage(condensed, method="average")


def plot_dendrogram(names: Sequence[str], vectors: np.ndarray, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from scipy.cluster import hierarchy
  fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.2))
  if len(names) >= 2:
    hierarchy.dendrogram(cluster(vectors), labels=list(names), orientation="right", ax=ax,
                         color_threshold=0)
    ax.set_xlabel("cosine distance of time per op class (average linkage)")
  else:
    ax.text(0.5, 0.5, "one workload: nothing to cluster", ha="center", va="center")
    ax.set_axis_off()
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  results.save_figure(fig, path, dpi=110)
  plt.close(fig)
