"""Merging curvature bases across tasks (or across batches).

A ``CurvatureBasis`` (eigenvalues ``lambda`` of shape (r,), orthonormal
vectors ``U``, a basis pytree of rank r) stands for the low-rank PSD-ish
matrix ``U diag(lambda) U^T``. Two ways to combine the basis of earlier tasks
with the new task's eigenpairs:

* ``merge_average``: the best rank-``rank`` approximation of the weighted
  average ``(1 - w) U_old L_old U_old^T + w U_new L_new U_new^T``.
* ``merge_union``: an orthonormal basis of ``span[U_old, U_new]`` with
  near-dependent directions dropped and the total rank capped.

All the heavy work is tree-level: one Gram matrix of the stacked basis
``[U_old, U_new]`` and one or two ``basis_transform`` passes; the small
eigen-/Gram-Schmidt problems run in float64 on the host. Nothing here ever
flattens the parameters.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nostalgia_jax.curvature import tree_math

PyTree = Any

MERGE_MODES = ("average", "union")
UNION_PRIORITIES = ("old_first", "eigenvalue")

# Directions of the stacked basis whose Gram eigenvalue is below this fraction
# of the largest are dependent: a float32 Gram matrix carries ~1e-7 absolute
# error, so such directions are mostly rounding noise.
_GRAM_RTOL = 1e-5
# Re-orthonormalise merged vectors when their Gram matrix is further than this
# from the identity (the host-side maths works on a float32 Gram matrix, whose
# rounding error is amplified by 1/norm^2 for weakly independent directions).
_ORTHO_ATOL = 1e-6


class CurvatureBasis(NamedTuple):
  """A low-rank curvature estimate ``U diag(eigenvalues) U^T``.

  Attributes:
    eigenvalues: ``(r,)`` float32 weights of the directions (eigenvalues for
      Lanczos / average results; see ``merge_union`` for what it stores).
    vectors: basis pytree (params-like, leading axis r), orthonormal.
  """
  eigenvalues: jax.Array
  vectors: PyTree

  @property
  def rank(self) -> int:
    return int(self.eigenvalues.shape[0])


_gram = jax.jit(tree_math.basis_gram)
_transform = jax.jit(tree_math.basis_transform)


def _validated(basis: CurvatureBasis, name: str) -> CurvatureBasis:
  if not isinstance(basis, CurvatureBasis):
    raise TypeError(f"`{name}` must be a CurvatureBasis (or None for `old`); "
                    f"got {type(basis).__name__}.")
  rank = tree_math.basis_rank(basis.vectors)
  if jnp.shape(basis.eigenvalues) != (rank,):
    raise ValueError(
        f"`{name}` has {rank} vectors but eigenvalues of shape "
        f"{jnp.shape(basis.eigenvalues)}; expected ({rank},).")
  return basis


def _host_gram(basis: PyTree) -> np.ndarray:
  gram = np.asarray(_gram(basis, basis), np.float64)
  return 0.5 * (gram + gram.T)


def _orthonormalised(vectors: PyTree) -> PyTree:
  """Symmetric (Loewdin) re-orthonormalisation if needed: U (U^T U)^{-1/2}.

  Moves each vector the least possible, so eigenvector-to-eigenvalue pairing
  survives; a no-op (no second transform) when U is already orthonormal.
  """
  gram = _host_gram(vectors)
  if np.max(np.abs(gram - np.eye(len(gram)))) <= _ORTHO_ATOL:
    return vectors
  g, v = np.linalg.eigh(gram)
  inv_sqrt = (v / np.sqrt(g)) @ v.T
  return _transform(vectors, jnp.asarray(inv_sqrt, jnp.float32))


def truncate(basis: CurvatureBasis, rank: int) -> CurvatureBasis:
  """The ``rank`` algebraically largest pairs, in descending order."""
  basis = _validated(basis, "basis")
  order = np.argsort(-np.asarray(basis.eigenvalues, np.float64),
                     kind="stable")[:rank]
  return CurvatureBasis(
      jnp.asarray(np.asarray(basis.eigenvalues)[order], jnp.float32),
      tree_math.basis_take(basis.vectors, order))


def merge_average(old: CurvatureBasis | None, new: CurvatureBasis, *,
                  rank: int, weight_new: float) -> CurvatureBasis:
  """Rank-``rank`` approximation of the weighted average of two estimates.

  Computes ``H = (1 - w) U_o L_o U_o^T + w U_n L_n U_n^T`` restricted to the
  span of ``B = [U_o, U_n]``: with the Gram matrix ``G = B^T B = V g V^T``
  (dependent directions, ``g < 1e-5 max g``, dropped), ``Q = B V g^{-1/2}`` is
  an orthonormal basis of the span and ``Q^T H Q = g^{1/2} V^T D V g^{1/2}``
  with ``D = diag((1 - w) L_o, w L_n)``: a small float64 eigh on the host,
  then ONE ``basis_transform`` of ``B`` forms the eigenvectors.

  Args:
    old: the running estimate, or ``None`` for the first task (then ``new``
      truncated to ``rank`` is returned, whatever ``weight_new``).
    new: the new task's eigenpairs.
    rank: rank of the result (fewer if the span has fewer independent
      directions).
    weight_new: ``w`` in [0, 1]. ``1 / (t + 1)`` when merging task ``t``
      (0-based) gives the equally weighted mean over tasks; a constant gives
      an exponential moving average.

  Returns:
    A ``CurvatureBasis`` with eigenvalues in descending order. They are the
    algebraically largest eigenvalues of H restricted to span[U_o, U_n]:
    directions outside the span (eigenvalue 0 for the low-rank H) are never
    returned, even when the span carries negative eigenvalues.
  """
  if rank < 1:
    raise ValueError(f"`rank` must be >= 1; got {rank}.")
  if not 0.0 <= weight_new <= 1.0:
    raise ValueError(f"`weight_new` must be in [0, 1]; got {weight_new}. "
                     "Use 1/(t+1) for an equal-weight mean over t+1 tasks.")
  new = _validated(new, "new")
  if old is None:
    return truncate(new, rank)
  old = _validated(old, "old")
  stacked = tree_math.basis_concat(old.vectors, new.vectors)
  weights = np.concatenate([
      (1.0 - weight_new) * np.asarray(old.eigenvalues, np.float64),
      weight_new * np.asarray(new.eigenvalues, np.float64)])
  g, v = np.linalg.eigh(_host_gram(stacked))
  keep = g > _GRAM_RTOL * g.max()
  g, v = g[keep], v[:, keep]
  sqrt_g = np.sqrt(g)
  projected = sqrt_g[:, None] * (v.T @ (weights[:, None] * v)) * sqrt_g[None]
  theta, w = np.linalg.eigh(0.5 * (projected + projected.T))
  order = np.argsort(-theta, kind="stable")[:rank]
  coeffs = (v / sqrt_g) @ w[:, order]
  vectors = _transform(stacked, jnp.asarray(coeffs, jnp.float32))
  return CurvatureBasis(jnp.asarray(theta[order], jnp.float32),
                        _orthonormalised(vectors))


def merge_union(old: CurvatureBasis | None, new: CurvatureBasis, *,
                max_rank: int, tol: float = 1e-2,
                priority: str = "old_first") -> CurvatureBasis:
  """Orthonormal union of two bases, near-dependent directions dropped.

  Candidates are visited in priority order and Gram-Schmidt-orthogonalised
  (two passes) against the directions already kept; a candidate whose
  remaining norm is below ``tol`` (it lies within ``tol`` of the kept span)
  is dropped; visiting stops once ``max_rank`` directions are kept.

  Priority policies:
    * ``'old_first'`` (default): every old direction first (in its stored
      order), then the new ones by descending eigenvalue. Earlier tasks keep
      their protection; once the cap is reached new tasks add nothing
      (as GPM does).
    * ``'eigenvalue'``: all directions by descending eigenvalue, old and new
      mixed (eigenvalues of different tasks are assumed comparable).

  What is stored as ``eigenvalues``: for every kept direction, the eigenvalue
  of the candidate vector it came from (for a new direction, the new Ritz
  value even though only its component orthogonal to the kept span is kept).
  These are weights for soft projection, not eigenvalues of any one matrix.
  The result is in visiting order (not sorted), so with ``'old_first'`` the
  old vectors stay in front and are unchanged (up to rounding).

  Args:
    old: the current basis, or ``None`` for the first task.
    new: the new task's eigenpairs.
    max_rank: cap on the number of directions kept.
    tol: drop a candidate whose norm after orthogonalisation is below
      ``tol`` times its norm before. 1e-2 by default: such a direction adds
      under 0.01% of its energy to the span, would spend a rank slot on it,
      and normalising it amplifies float32 rounding by 1/tol.
    priority: ``'old_first'`` or ``'eigenvalue'``.

  Returns:
    A ``CurvatureBasis`` of rank <= ``max_rank``.
  """
  if max_rank < 1:
    raise ValueError(f"`max_rank` must be >= 1; got {max_rank}.")
  if not 0.0 < tol < 1.0:
    raise ValueError(f"`tol` must be in (0, 1); got {tol}.")
  if priority not in UNION_PRIORITIES:
    raise ValueError(f"Unknown union priority {priority!r}; allowed values: "
                     f"{UNION_PRIORITIES}.")
  new = _validated(new, "new")
  parts = [new] if old is None else [_validated(old, "old"), new]
  stacked = tree_math.basis_concat(*[p.vectors for p in parts])
  eigenvalues = np.concatenate(
      [np.asarray(p.eigenvalues, np.float64) for p in parts])
  num_old = 0 if old is None else old.rank
  new_order = num_old + np.argsort(-eigenvalues[num_old:], kind="stable")
  if priority == "old_first":
    order = np.concatenate([np.arange(num_old), new_order])
  else:
    order = np.argsort(-eigenvalues, kind="stable")

  # Gram-Schmidt in coefficient space: a direction is c (coefficients over
  # the stacked basis B) with inner product <c, c'> = c^T G c'.
  gram = _host_gram(stacked)
  kept_coeffs, kept_values = [], []
  for index in order:
    if len(kept_coeffs) == max_rank:
      break
    c = np.zeros(len(gram))
    c[index] = 1.0
    norm_before = np.sqrt(max(gram[index, index], 0.0))
    for _ in range(2):  # "twice is enough"
      if kept_coeffs:
        kept = np.stack(kept_coeffs, axis=1)
        c = c - kept @ (kept.T @ (gram @ c))
    norm = np.sqrt(max(c @ gram @ c, 0.0))
    if norm_before == 0.0 or norm < tol * norm_before:
      continue
    kept_coeffs.append(c / norm)
    kept_values.append(eigenvalues[index])
  if not kept_coeffs:
    raise ValueError("merge_union kept no direction: every candidate vector "
                     "has zero norm. Check the bases passed in.")
  vectors = _transform(stacked,
                       jnp.asarray(np.stack(kept_coeffs, 1), jnp.float32))
  return CurvatureBasis(jnp.asarray(kept_values, jnp.float32),
                        _orthonormalised(vectors))


def merge_bases(mode: str, old: CurvatureBasis | None,
                new: CurvatureBasis, *, rank: int,
                weight_new: float | None = None, tol: float = 1e-2,
                priority: str = "old_first") -> CurvatureBasis:
  """Dispatches to ``merge_average`` or ``merge_union`` by name.

  Args:
    mode: ``'average'`` or ``'union'``.
    old, new: as in the merge functions.
    rank: ``rank`` for average, ``max_rank`` for union.
    weight_new: required for ``'average'``.
    tol, priority: for ``'union'``.
  """
  if mode == "average":
    if weight_new is None:
      raise ValueError("merge_bases('average', ...) needs `weight_new` (e.g. "
                       "1/(t+1) for task t counted from 0).")
    return merge_average(old, new, rank=rank, weight_new=weight_new)
  if mode == "union":
    return merge_union(old, new, max_rank=rank, tol=tol, priority=priority)
  raise ValueError(f"Unknown merge mode {mode!r}; allowed values: "
                   f"{MERGE_MODES}.")
