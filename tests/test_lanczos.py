"""Lanczos top-k eigenpairs against numpy.linalg.eigh of explicit matrices.

The matrices act on a pytree of two leaves of different shapes (40 scalars);
flattening happens only here, in the test, to build the dense reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nostalgia_jax.curvature import lanczos
from nostalgia_jax.curvature import tree_math as tm

LIKE = {"b": jnp.zeros((10,)), "w": jnp.zeros((6, 5))}
DIM = 40


def _flat(v):
  return jnp.concatenate([v["b"].ravel(), v["w"].ravel()])


def _unflat(x):
  return {"b": x[:10], "w": x[10:].reshape(6, 5)}


@jax.jit
def _apply(matrix, v):
  return _unflat(matrix @ _flat(v))


def _operator(eigenvalues, seed=0):
  """Symmetric matrix Q diag(eigenvalues) Q^T (float64) and its matvec."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
  matrix = (q * np.asarray(eigenvalues, np.float64)) @ q.T
  return matrix, functools.partial(_apply, jnp.asarray(matrix, jnp.float32))


def _vectors(basis):
  """(DIM, k) numpy matrix of a basis pytree."""
  return np.stack([np.asarray(_flat(tm.basis_vector(basis, i)), np.float64)
                   for i in range(tm.basis_rank(basis))], axis=1)


def _reference(matrix, k):
  values, vectors = np.linalg.eigh(matrix)
  return values[::-1][:k], vectors[:, ::-1][:, :k]


def _assert_orthonormal(v, atol=1e-5):
  np.testing.assert_allclose(v.T @ v, np.eye(v.shape[1]), atol=atol)


def _projector_distance(a, b):
  return np.linalg.norm(a @ a.T - b @ b.T, 2)


def test_decaying_spectrum_default_iterations():
  # Hessian-like: a few sharp directions and a small tail.
  spectrum = np.concatenate([[50.0, 30.0, 20.0, 12.0, 6.0],
                             0.5 * 0.8 ** np.arange(DIM - 5)])
  matrix, matvec = _operator(spectrum)
  k = 4
  result = lanczos.lanczos_eigenpairs(matvec, LIKE, k, key=jax.random.key(0))
  assert result.num_iters == lanczos.default_num_iters(k, DIM) == 12
  assert result.num_matvecs == 12 and not result.breakdown
  ref_values, ref_vectors = _reference(matrix, k)
  np.testing.assert_allclose(result.eigenvalues, ref_values, rtol=1e-4)
  ours = _vectors(result.eigenvectors)
  _assert_orthonormal(ours)
  assert _projector_distance(ours, ref_vectors) < 1e-3
  # Reported residuals are the true ones, ||A y - theta y||.
  true_residuals = np.linalg.norm(
      matrix @ ours - ours * np.asarray(result.eigenvalues), axis=0)
  np.testing.assert_allclose(result.residual_norms, true_residuals,
                             atol=1e-4 * spectrum[0])


def test_clustered_and_negative_eigenvalues():
  rng = np.random.default_rng(1)
  # Top 5: a tight cluster of three, then two negative ones above the bulk;
  # the most negative eigenvalue (largest in magnitude) must not be returned.
  spectrum = np.concatenate([[4.0, 4.0 - 1e-3, 4.0 - 2e-3, -0.5, -0.8, -30.0],
                             rng.uniform(-10.0, -2.0, DIM - 6)])
  matrix, matvec = _operator(spectrum, seed=2)
  k = 5
  values, vectors = lanczos.top_eigenpairs(matvec, LIKE, k, num_iters=DIM,
                                           key=jax.random.key(1))
  ref_values, ref_vectors = _reference(matrix, k)
  np.testing.assert_allclose(values, ref_values, rtol=1e-4, atol=1e-5)
  assert np.all(np.diff(np.asarray(values)) <= 0)  # descending
  ours = _vectors(vectors)
  _assert_orthonormal(ours)
  # The top-5 subspace is well separated (gap 1.2) even if the cluster's
  # individual vectors are not.
  assert _projector_distance(ours, ref_vectors) < 1e-3


def test_repeated_eigenvalue():
  spectrum = np.concatenate([[5.0, 5.0, 5.0], np.linspace(-1.0, 1.0,
                                                          DIM - 3)])
  matrix, matvec = _operator(spectrum, seed=3)
  result = lanczos.lanczos_eigenpairs(matvec, LIKE, 3, num_iters=DIM,
                                      key=jax.random.key(2))
  np.testing.assert_allclose(result.eigenvalues, [5.0, 5.0, 5.0], rtol=1e-5)
  ours = _vectors(result.eigenvectors)
  _assert_orthonormal(ours)
  assert _projector_distance(ours, _reference(matrix, 3)[1]) < 1e-3


def _rank_three_operator():
  spectrum = np.zeros(DIM)
  spectrum[:3] = [3.0, 2.0, -1.0]
  return _operator(spectrum, seed=4)


def test_low_rank_operator_restarts_and_finds_the_null_space():
  matrix, matvec = _rank_three_operator()
  k = 6
  result = lanczos.lanczos_eigenpairs(matvec, LIKE, k, num_iters=20,
                                      key=jax.random.key(3))
  # The Krylov space of a rank-3 operator has dimension 4 (the range plus
  # the start vector's null component): it breaks down and restarts.
  assert result.breakdown and result.num_restarts >= 2
  assert result.num_iters == result.num_matvecs == 20
  np.testing.assert_allclose(result.eigenvalues, [3, 2, 0, 0, 0, 0],
                             atol=1e-5)
  ours = _vectors(result.eigenvectors)
  _assert_orthonormal(ours)
  np.testing.assert_allclose(matrix @ ours,
                             ours * np.asarray(result.eigenvalues), atol=1e-5)


def test_stop_on_breakdown_ends_early_with_k_exact_pairs():
  matrix, matvec = _rank_three_operator()
  k = 6
  result = lanczos.lanczos_eigenpairs(matvec, LIKE, k, num_iters=20,
                                      key=jax.random.key(3),
                                      stop_on_breakdown=True)
  assert result.breakdown and result.num_restarts >= 1
  assert k <= result.num_iters == result.num_matvecs < 20
  ours = _vectors(result.eigenvectors)
  _assert_orthonormal(ours)
  # Still k exact eigenpairs, though 0's multiplicity may be under-counted
  # (the documented price of stopping early: -1 can replace a 4th 0).
  np.testing.assert_allclose(matrix @ ours,
                             ours * np.asarray(result.eigenvalues), atol=1e-5)
  np.testing.assert_allclose(result.eigenvalues[:2], [3, 2], rtol=1e-5)
  np.testing.assert_allclose(result.residual_norms, 0.0, atol=1e-5)


def test_invariant_starting_vector_restarts():
  # A multiple of the identity: every vector is an eigenvector, so the very
  # first Krylov space is invariant.
  _, matvec = _operator(np.full(DIM, 2.0))
  result = lanczos.lanczos_eigenpairs(matvec, LIKE, 4, key=jax.random.key(4),
                                      stop_on_breakdown=True)
  assert result.breakdown and result.num_restarts == 3
  assert result.num_iters == 4
  np.testing.assert_allclose(result.eigenvalues, np.full(4, 2.0), rtol=1e-6)
  _assert_orthonormal(_vectors(result.eigenvectors))


def test_matvec_count_matches_calls():
  _, matvec = _operator(np.linspace(1.0, 2.0, DIM))
  calls = []

  def counting(v):
    calls.append(1)
    return matvec(v)

  result = lanczos.lanczos_eigenpairs(counting, LIKE, 3, num_iters=9,
                                      key=jax.random.key(5))
  assert result.num_matvecs == len(calls) == 9


@pytest.mark.parametrize("k, num_iters, message", [
    (0, None, "k must be >= 1"),
    (DIM + 1, None, "only 40 parameters"),
    (5, 3, "num_iters=3 < k=5"),
])
def test_invalid_arguments(k, num_iters, message):
  with pytest.raises(ValueError, match=message):
    lanczos.lanczos_eigenpairs(lambda v: v, LIKE, k, num_iters=num_iters,
                               key=jax.random.key(0))


def test_num_iters_capped_by_dimension():
  small = {"a": jnp.zeros((3,))}
  diagonal = jnp.asarray([3.0, 1.0, 2.0])
  values, vectors = lanczos.top_eigenpairs(
      lambda v: {"a": diagonal * v["a"]}, small, 2, num_iters=50,
      key=jax.random.key(0))
  np.testing.assert_allclose(values, [3.0, 2.0], rtol=1e-6)
  np.testing.assert_allclose(np.abs(np.asarray(vectors["a"])),
                             [[1, 0, 0], [0, 0, 1]], atol=1e-5)


def test_per_batch_estimator_matches_dense_running_average():
  k = 3
  rng = np.random.default_rng(6)
  matrices = []
  for seed in range(3):
    spectrum = np.concatenate([rng.uniform(5.0, 10.0, 4),
                               rng.uniform(0.0, 1.0, DIM - 4)])
    matrices.append(_operator(spectrum, seed=10 + seed)[0])
  batches = jnp.asarray(np.stack(matrices), jnp.float32)
  result = lanczos.per_batch_eigenpairs(
      lambda m: functools.partial(_apply, m), batches, LIKE, k,
      num_iters=DIM, key=jax.random.key(7))
  # Dense reference: rank-k truncation of each batch's matrix, running
  # average with weight 1/(n+1), re-truncated to rank k after every merge.
  def truncated(matrix):
    values, vectors = _reference(matrix, k)
    return (vectors * values) @ vectors.T
  running = truncated(matrices[0])
  for n in (1, 2):
    running = truncated((1 - 1 / (n + 1)) * running
                        + truncated(matrices[n]) / (n + 1))
  ref_values, ref_vectors = _reference(running, k)
  np.testing.assert_allclose(result.eigenvalues, ref_values, rtol=1e-4)
  ours = _vectors(result.eigenvectors)
  _assert_orthonormal(ours)
  assert _projector_distance(ours, ref_vectors) < 1e-3
  assert result.num_matvecs == sum(1 for _ in range(3)) * DIM
  assert np.all(np.isnan(np.asarray(result.residual_norms)))
