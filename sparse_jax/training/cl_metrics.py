"""Continual-learning metrics from an accuracy matrix.

``acc[i, j]`` is the test accuracy on task j after training on tasks 0..i
(Lopez-Paz & Ranzato 2017, arXiv:1706.08840; Chaudhry et al. 2018,
arXiv:1801.10112).
"""

from __future__ import annotations

import io

import numpy as np

from sparse_jax.training.files import write_bytes


def average_accuracy(acc: np.ndarray) -> float:
  """Mean over tasks of the final accuracy: ``mean_j acc[T-1, j]``."""
  acc = np.asarray(acc, float)
  return float(acc[-1].mean())


def backward_transfer(acc: np.ndarray) -> float:
  """``mean_{j<T-1} (acc[T-1, j] - acc[j, j])``; negative means forgetting."""
  acc = np.asarray(acc, float)
  t = acc.shape[0]
  if t < 2:
    return 0.0
  return float(np.mean([acc[-1, j] - acc[j, j] for j in range(t - 1)]))


def forgetting(acc: np.ndarray) -> float:
  """``mean_{j<T-1} (max_{i<T-1} acc[i, j] - acc[T-1, j])`` (Chaudhry et al.)."""
  acc = np.asarray(acc, float)
  t = acc.shape[0]
  if t < 2:
    return 0.0
  return float(np.mean([acc[j:t - 1, j].max() - acc[-1, j] for j in range(t - 1)]))


def plot_accuracy_matrix(acc: np.ndarray, path: str, *, title: str = "") -> str:
  """Saves a heatmap of ``acc`` (rows: after task i; columns: task j) as PNG."""
  # A bare Figure (no pyplot): works headless and leaves a notebook's backend alone.
  from matplotlib.figure import Figure

  acc = np.asarray(acc, float)
  t = acc.shape[0]
  fig = Figure(figsize=(1.0 + 0.55 * t, 0.8 + 0.5 * t))
  ax = fig.subplots()
  im = ax.imshow(100 * acc, vmin=0, vmax=100, cmap="viridis")
  for i in range(t):
    for j in range(acc.shape[1]):
      if np.isfinite(acc[i, j]):
        ax.text(j, i, f"{100 * acc[i, j]:.0f}", ha="center", va="center",
                color="white" if acc[i, j] < 0.6 else "black", fontsize=7)
  ax.set_xlabel("evaluated on task j")
  ax.set_ylabel("after training on task i")
  ax.set_xticks(range(acc.shape[1]))
  ax.set_yticks(range(t))
  ax.set_title(title or "test accuracy (%)", fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  write_bytes(path, buffer.getvalue())   # atomically: never half a PNG
  return path
