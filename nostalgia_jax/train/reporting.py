"""Results of a run: results.json, plots, and their TensorBoard images.

Everything here runs on the host, on process 0 only for files.
"""

from __future__ import annotations

import io
import json
import os
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # No display here, on CI or on pod workers.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

from nostalgia_jax.train import cl_metrics


def write_json_atomically(path: str, data: dict) -> None:
  """Writes JSON so that a crash never leaves a half-written file."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2, sort_keys=False)
  os.replace(tmp, path)


def results_dict(accuracy_matrix: Sequence[Sequence[Optional[float]]], *,
                 num_tasks: int, config: dict, tasks: list) -> dict:
  """The content of results.json after the rows trained so far.

  Args:
    accuracy_matrix: rows so far, each of length `num_tasks` (None = unseen).
    num_tasks: number of tasks of the sequence.
    config: the resolved config as a dict.
    tasks: one record per trained task (classes, steps, timings, ...).
  """
  done = len(accuracy_matrix)
  metrics = (cl_metrics.summarize(accuracy_matrix) if done else
             {"average_accuracy": None, "backward_transfer": None, "forgetting": None})
  return {
      "accuracy_matrix": [list(r) for r in accuracy_matrix],
      **metrics,
      "num_tasks": num_tasks,
      "tasks_completed": done,
      "complete": done == num_tasks,
      "tasks": tasks,
      "config": config,
  }


def padded_matrix(accuracy_matrix, num_tasks: int) -> np.ndarray:
  """T x T float array, NaN where a task was not seen / not trained yet."""
  full = np.full((num_tasks, num_tasks), np.nan)
  for i, row in enumerate(accuracy_matrix):
    for j, value in enumerate(row):
      if value is not None:
        full[i, j] = value
  return full


def plot_accuracy_matrix(accuracy_matrix, num_tasks: int, title: str = ""):
  """Heatmap of R[i][j] with the values written in the cells."""
  full = padded_matrix(accuracy_matrix, num_tasks)
  fig, ax = plt.subplots(figsize=(1.1 * num_tasks + 2, 1.0 * num_tasks + 1.5))
  image = ax.imshow(full * 100, vmin=0, vmax=100, cmap="viridis")
  for i in range(num_tasks):
    for j in range(num_tasks):
      if not np.isnan(full[i, j]):
        ax.text(j, i, f"{100 * full[i, j]:.1f}", ha="center", va="center",
                color="white" if full[i, j] < 0.6 else "black", fontsize=9)
  ax.set_xticks(range(num_tasks))
  ax.set_yticks(range(num_tasks))
  ax.set_xlabel("evaluated on task j")
  ax.set_ylabel("after training task i")
  ax.set_title(title or "accuracy matrix R[i][j] (%)")
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  fig.tight_layout()
  return fig


def plot_task_curves(accuracy_matrix, num_tasks: int, title: str = ""):
  """Accuracy of each task (one line) after each training task (x axis)."""
  full = padded_matrix(accuracy_matrix, num_tasks)
  fig, ax = plt.subplots(figsize=(6, 4))
  x = np.arange(num_tasks)
  for j in range(num_tasks):
    if not np.all(np.isnan(full[:, j])):
      ax.plot(x, 100 * full[:, j], marker="o", label=f"task {j}")
  rows = len(accuracy_matrix)
  average = [np.nanmean(full[i, :i + 1]) * 100 for i in range(rows)]
  ax.plot(x[:rows], average, "k--", marker="s", label="average (seen tasks)")
  ax.set_xticks(x)
  ax.set_xlabel("after training task")
  ax.set_ylabel("accuracy (%)")
  ax.set_ylim(0, 101)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower left")
  ax.set_title(title or "per-task accuracy along the sequence")
  fig.tight_layout()
  return fig


def plot_spectra(spectra: Sequence[Sequence[float]], title: str = ""):
  """Top-k Hessian eigenvalues of each task (one line per task)."""
  fig, ax = plt.subplots(figsize=(6, 4))
  for task, eigenvalues in enumerate(spectra):
    values = np.asarray(eigenvalues, np.float64)
    ax.plot(np.arange(1, len(values) + 1), values, marker=".", label=f"task {task}")
  ax.set_yscale("symlog", linthresh=1e-3)
  ax.set_xlabel("eigenvalue index i")
  ax.set_ylabel("lambda_i")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title(title or "top-k curvature eigenvalues per task")
  fig.tight_layout()
  return fig


def figure_to_png(fig, path: Optional[str] = None) -> np.ndarray:
  """Saves `fig` as PNG (if `path`) and returns it as an RGB uint8 array."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  plt.close(fig)
  data = buffer.getvalue()
  if path:
    with open(path, "wb") as f:
      f.write(data)
  buffer.seek(0)
  return (plt.imread(buffer, format="png")[..., :3] * 255).astype(np.uint8)
