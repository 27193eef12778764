"""Continual-learning metrics against a hand-computed accuracy matrix."""

import pytest

from nostalgia_jax.train import cl_metrics

# Three tasks; R[i][j] = accuracy on task j after task i.
MATRIX = [
    [0.90, None, None],
    [0.70, 0.80, None],
    [0.60, 0.85, 0.95],
]


def test_metrics_by_hand():
  # ACC = (0.60 + 0.85 + 0.95) / 3
  assert cl_metrics.average_accuracy(MATRIX) == pytest.approx(0.80)
  # BWT = ((0.60 - 0.90) + (0.85 - 0.80)) / 2 = -0.125
  assert cl_metrics.backward_transfer(MATRIX) == pytest.approx(-0.125)
  # F = ((max(0.90, 0.70) - 0.60) + (max(0.80) - 0.85)) / 2 = (0.30 - 0.05) / 2
  assert cl_metrics.forgetting(MATRIX) == pytest.approx(0.125)


def test_forgetting_uses_the_best_earlier_accuracy():
  matrix = [[0.5, None, None], [0.9, 0.7, None], [0.6, 0.7, 0.8]]
  # Task 0 peaked at 0.9 after task 1 -> forgets 0.3; task 1 forgets 0.
  assert cl_metrics.forgetting(matrix) == pytest.approx(0.15)
  # BWT compares with the accuracy right after learning: (0.1 + 0) / 2.
  assert cl_metrics.backward_transfer(matrix) == pytest.approx(0.05)


def test_partial_matrix_uses_rows_so_far():
  partial = [[0.9, None, None], [0.7, 0.8, None]]
  summary = cl_metrics.summarize(partial)
  assert summary["average_accuracy"] == pytest.approx(0.75)
  assert summary["backward_transfer"] == pytest.approx(-0.2)
  assert summary["forgetting"] == pytest.approx(0.2)
  single = cl_metrics.summarize([[0.9, None]])
  assert single == {"average_accuracy": pytest.approx(0.9),
                    "backward_transfer": None, "forgetting": None}


def test_malformed_matrix_is_rejected():
  with pytest.raises(ValueError, match="seen so far"):
    cl_metrics.average_accuracy([[0.9, 0.5]])
  with pytest.raises(ValueError, match="seen so far"):
    cl_metrics.average_accuracy([[0.9, None], [None, 0.8]])
  with pytest.raises(ValueError, match="no rows"):
    cl_metrics.average_accuracy([])
