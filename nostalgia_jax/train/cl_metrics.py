"""Continual-learning metrics of an accuracy matrix.

R[i][j] is the accuracy on task j after training task i (None where task j
has not been seen yet, j > i). With T tasks trained so far:

  average accuracy  ACC = mean_j R[T-1][j]
  backward transfer BWT = mean_{j<T-1} (R[T-1][j] - R[j][j])
  forgetting        F   = mean_{j<T-1} (max_{i<T-1} R[i][j] - R[T-1][j])

as in Lopez-Paz & Ranzato (2017) and Chaudhry et al. (2018). BWT and F are
None when fewer than two tasks have been trained.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

Matrix = Sequence[Sequence[Optional[float]]]


def _trained_block(accuracy_matrix: Matrix) -> np.ndarray:
  """The T x T block of rows trained so far, validated, as a float array."""
  rows = [list(r) for r in accuracy_matrix]
  num_trained = len(rows)
  if num_trained == 0:
    raise ValueError("the accuracy matrix has no rows yet.")
  block = np.full((num_trained, num_trained), np.nan)
  for i, row in enumerate(rows):
    for j in range(max(num_trained, len(row))):
      value = row[j] if j < len(row) else None
      if (value is None) != (j > i):
        raise ValueError(f"accuracy_matrix[{i}][{j}]={value!r}: entries must be "
                         "set exactly for the tasks seen so far (j <= i).")
      if value is not None:
        block[i, j] = value
  return block


def average_accuracy(accuracy_matrix: Matrix) -> float:
  block = _trained_block(accuracy_matrix)
  return float(np.mean(block[-1]))


def backward_transfer(accuracy_matrix: Matrix) -> Optional[float]:
  block = _trained_block(accuracy_matrix)
  last = len(block) - 1
  if last == 0:
    return None
  return float(np.mean(block[last, :last] - np.diag(block)[:last]))


def forgetting(accuracy_matrix: Matrix) -> Optional[float]:
  block = _trained_block(accuracy_matrix)
  last = len(block) - 1
  if last == 0:
    return None
  best_before = np.nanmax(block[:last, :last], axis=0)
  return float(np.mean(best_before - block[last, :last]))


def summarize(accuracy_matrix: Matrix) -> dict:
  """All three metrics of the rows trained so far, as a dict."""
  return {
      "average_accuracy": average_accuracy(accuracy_matrix),
      "backward_transfer": backward_transfer(accuracy_matrix),
      "forgetting": forgetting(accuracy_matrix),
  }
