"""Basis merging against dense numpy computations on flattened vectors."""

import jax.numpy as jnp
import numpy as np
import pytest

from nostalgia_jax.curvature import merge as merge_lib
from nostalgia_jax.curvature.merge import CurvatureBasis

DIM = 30  # a pytree {'a': (4, 5), 'b': (10,)}


def _to_basis(columns):
  """(DIM, r) numpy columns -> basis pytree with leading axis r."""
  rows = np.asarray(columns, np.float32).T
  return {"a": jnp.asarray(rows[:, :20].reshape(-1, 4, 5)),
          "b": jnp.asarray(rows[:, 20:])}


def _columns(basis):
  r = basis["a"].shape[0]
  return np.concatenate([np.asarray(basis["a"], np.float64).reshape(r, -1),
                         np.asarray(basis["b"], np.float64)], axis=1).T


def _curvature(columns, eigenvalues):
  return CurvatureBasis(jnp.asarray(eigenvalues, jnp.float32),
                        _to_basis(columns))


def _orthonormal(rng, r, within=None):
  q, _ = np.linalg.qr(rng.normal(size=(DIM, r)) if within is None
                      else within @ rng.normal(size=(within.shape[1], r)))
  return q


def _dense(columns, eigenvalues):
  return (columns * eigenvalues) @ columns.T


def _top(matrix, rank):
  values, vectors = np.linalg.eigh(matrix)
  return values[::-1][:rank], vectors[:, ::-1][:, :rank]


def _projector(columns):
  return columns @ columns.T


def _assert_orthonormal(columns):
  np.testing.assert_allclose(columns.T @ columns, np.eye(columns.shape[1]),
                             atol=1e-5)


@pytest.mark.parametrize("overlap", [0, 2])
def test_average_matches_dense_eigh(overlap):
  rng = np.random.default_rng(overlap)
  old_cols = _orthonormal(rng, 4)
  # `overlap` new vectors lie inside span(old): the stacked basis is rank
  # deficient and the dependent directions must be dropped cleanly.
  new_cols = np.linalg.qr(np.concatenate(
      [old_cols[:, :overlap] @ rng.normal(size=(overlap, overlap)),
       rng.normal(size=(DIM, 5 - overlap))], axis=1))[0]
  old_vals = np.array([9.0, 6.0, 3.0, 1.0])
  new_vals = np.array([12.0, 7.0, 4.0, 2.0, 0.5])
  weight = 1.0 / 3.0
  merged = merge_lib.merge_average(
      _curvature(old_cols, old_vals), _curvature(new_cols, new_vals),
      rank=4, weight_new=weight)
  dense = ((1 - weight) * _dense(old_cols, old_vals)
           + weight * _dense(new_cols, new_vals))
  ref_values, ref_vectors = _top(dense, 4)
  np.testing.assert_allclose(merged.eigenvalues, ref_values, rtol=1e-5)
  ours = _columns(merged.vectors)
  _assert_orthonormal(ours)
  # Eigenvectors of the dense average (the residual, not just the span).
  np.testing.assert_allclose(dense @ ours,
                             ours * np.asarray(merged.eigenvalues), atol=1e-5)
  gap = ref_values[-1] - np.linalg.eigvalsh(dense)[::-1][4]
  assert gap > 0.1
  assert np.linalg.norm(_projector(ours) - _projector(ref_vectors), 2) < 1e-4


def test_average_keeps_algebraically_largest_and_handles_first_task():
  rng = np.random.default_rng(3)
  cols = _orthonormal(rng, 3)
  new = _curvature(cols, [-5.0, 2.0, 1.0])
  first = merge_lib.merge_average(None, new, rank=2, weight_new=0.2)
  np.testing.assert_allclose(first.eigenvalues, [2.0, 1.0])
  np.testing.assert_allclose(np.abs(_columns(first.vectors).T @ cols[:, 1:]),
                             np.eye(2), atol=1e-6)
  old = _curvature(_orthonormal(rng, 2), [-1.0, -3.0])
  merged = merge_lib.merge_average(old, new, rank=3, weight_new=0.5)
  dense = 0.5 * _dense(_columns(old.vectors), [-1.0, -3.0]) + 0.5 * _dense(
      cols, [-5.0, 2.0, 1.0])
  # Algebraically largest within the span (the 0 of the complement is not
  # a direction of either basis and is never returned).
  span = np.linalg.qr(np.concatenate([_columns(old.vectors), cols], 1))[0]
  np.testing.assert_allclose(merged.eigenvalues,
                             _top(span.T @ dense @ span, 3)[0], atol=1e-5)
  assert np.asarray(merged.eigenvalues)[-1] < 0


def test_average_rejects_bad_arguments():
  basis = _curvature(np.eye(DIM)[:, :2], [1.0, 2.0])
  with pytest.raises(ValueError, match="weight_new"):
    merge_lib.merge_average(basis, basis, rank=2, weight_new=1.5)
  with pytest.raises(ValueError, match="eigenvalues of shape"):
    merge_lib.merge_average(None, CurvatureBasis(jnp.ones(3), basis.vectors),
                            rank=2, weight_new=1.0)
  with pytest.raises(ValueError, match="'average', 'union'"):
    merge_lib.merge_bases("sum", None, basis, rank=2)


def _union_inputs(seed=4):
  """Old: 4 directions. New: 2 inside span(old), 2 independent ones."""
  rng = np.random.default_rng(seed)
  old_cols = _orthonormal(rng, 4)
  dependent = _orthonormal(rng, 2, within=old_cols)
  independent = rng.normal(size=(DIM, 2))
  new_cols = np.linalg.qr(np.concatenate([dependent, independent], 1))[0]
  old = _curvature(old_cols, [8.0, 6.0, 4.0, 2.0])
  new = _curvature(new_cols, [10.0, 9.0, 5.0, 7.0])
  return old, new


def test_union_spans_both_and_drops_dependent_directions():
  old, new = _union_inputs()
  union = merge_lib.merge_union(old, new, max_rank=20)
  ours = _columns(union.vectors)
  _assert_orthonormal(ours)
  assert union.rank == 6  # 4 old + 2 independent new, 2 dependent dropped
  projector = _projector(ours)
  for cols in (_columns(old.vectors), _columns(new.vectors)):
    np.testing.assert_allclose(projector @ cols, cols, atol=1e-5)
  # Old directions first and unchanged; then new ones by eigenvalue (7, 5).
  np.testing.assert_allclose(ours[:, :4], _columns(old.vectors), atol=1e-5)
  np.testing.assert_allclose(union.eigenvalues, [8, 6, 4, 2, 7, 5])


def test_union_rank_cap_old_first():
  old, new = _union_inputs()
  union = merge_lib.merge_union(old, new, max_rank=5)
  ours = _columns(union.vectors)
  _assert_orthonormal(ours)
  np.testing.assert_allclose(union.eigenvalues, [8, 6, 4, 2, 7])
  # The kept new direction is the eigenvalue-7 vector (new column 3).
  new_seven = _columns(new.vectors)[:, 3]
  np.testing.assert_allclose(_projector(ours) @ new_seven, new_seven,
                             atol=1e-5)


def test_union_rank_cap_by_eigenvalue():
  old, new = _union_inputs()
  union = merge_lib.merge_union(old, new, max_rank=3, priority="eigenvalue")
  # Visiting order 10, 9, 8, 7, ...: the three largest are kept.
  np.testing.assert_allclose(union.eigenvalues, [10, 9, 8])
  ours = _columns(union.vectors)
  _assert_orthonormal(ours)
  wanted = np.concatenate([_columns(new.vectors)[:, :2],
                           _columns(old.vectors)[:, :1]], axis=1)
  np.testing.assert_allclose(_projector(ours) @ wanted, wanted, atol=1e-5)


@pytest.mark.parametrize("tol, kept", [(1e-2, 3), (1e-4, 4)])
def test_union_tolerance(tol, kept):
  rng = np.random.default_rng(5)
  old_cols = _orthonormal(rng, 3)
  nearly_old = old_cols[:, 0] + 1e-3 * rng.normal(size=DIM) / np.sqrt(DIM)
  nearly_old /= np.linalg.norm(nearly_old)
  union = merge_lib.merge_union(_curvature(old_cols, [3.0, 2.0, 1.0]),
                                _curvature(nearly_old[:, None], [5.0]),
                                max_rank=10, tol=tol)
  assert union.rank == kept
  _assert_orthonormal(_columns(union.vectors))


def test_union_first_task_truncates_by_eigenvalue():
  cols = _orthonormal(np.random.default_rng(6), 3)
  union = merge_lib.merge_union(None, _curvature(cols, [1.0, 3.0, 2.0]),
                                max_rank=2)
  np.testing.assert_allclose(union.eigenvalues, [3.0, 2.0])
  np.testing.assert_allclose(np.abs(_columns(union.vectors).T @ cols[:, 1:]),
                             [[1, 0], [0, 1]], atol=1e-5)
