"""Top-k eigenpairs of a symmetric pytree operator by Lanczos.

Lanczos with full reorthogonalisation: each new Krylov vector is
orthogonalised against ALL previous ones by classical Gram-Schmidt, with a
second pass when the first lost more than 1 - 1/sqrt(2) of the norm ("twice
is enough", Kahan-Parlett). The Krylov basis is one preallocated basis
pytree with leading axis m (memory m x params), updated in place through
donation; every jitted helper sees fixed shapes, so a run compiles once.
The m x m tridiagonal eigenproblem is solved in float64 on the host and the
Ritz vectors are formed with one ``basis_transform`` of the Krylov basis.

This module knows nothing about models or losses: it only calls ``matvec``.
The operator must stay fixed during a run (fixed batches, eval mode).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nostalgia_jax.curvature import merge as merge_lib
from nostalgia_jax.curvature import tree_math

PyTree = Any
Matvec = Callable[[PyTree], PyTree]

# Default Krylov dimension m = max(2k, k + 8), capped by the dimension.
# With m = k (the reference implementation) the k-th Ritz pair has had no
# spare iteration and is poorly converged; Ritz value errors shrink like a
# Chebyshev polynomial of degree ~(m - i) in the relative gap, so doubling m
# gives the trailing pairs as many spare steps as the leading ones get, and
# the +8 floor helps small k. Cost: m HVPs and m x params memory.
# Change these two constants (or pass num_iters) to benchmark m = k..4k.
DEFAULT_ITERS_FACTOR = 2
DEFAULT_MIN_EXTRA_ITERS = 8

# Breakdown: beta_j below this fraction of the largest ||A q_j|| seen means the
# Krylov space is invariant to float32 precision (CGS2 leaves a residual of
# roughly eps * sqrt(m) * ||A q_j|| ~ 1e-6 of a truly invariant direction).
_BREAKDOWN_RTOL = 1e-5
# Second Gram-Schmidt pass when ||w_after|| < ||w_before|| / sqrt(2).
_KAHAN = 1.0 / math.sqrt(2.0)


class EigenResult(NamedTuple):
  """Output of ``lanczos_eigenpairs``.

  Attributes:
    eigenvalues: ``(k,)`` float32 Ritz values, algebraically largest first.
    eigenvectors: basis pytree like the operator's vectors with leading axis
      k, orthonormal under the pytree inner product.
    num_matvecs: number of operator applications in this run.
    num_iters: Lanczos iterations run (Krylov vectors used), <= num_iters
      asked when the run ended early.
    breakdown: True if some beta_j fell below the breakdown tolerance (an
      invariant Krylov subspace): the run either ended early or restarted.
    residual_norms: ``(k,)`` Lanczos residual estimates
      ``|beta_m * s_{m,i}| = ||A y_i - theta_i y_i||`` (NaN where undefined,
      e.g. for merged per-batch estimates).
    num_restarts: how many times a fresh random vector (orthogonal to the
      Krylov basis) restarted the recurrence after a breakdown.
  """
  eigenvalues: jax.Array
  eigenvectors: PyTree
  num_matvecs: int
  num_iters: int
  breakdown: bool
  residual_norms: jax.Array
  num_restarts: int = 0


def default_num_iters(k: int, dim: int) -> int:
  """Default Krylov dimension: ``min(dim, max(2k, k + 8))``."""
  return min(dim, max(DEFAULT_ITERS_FACTOR * k, k + DEFAULT_MIN_EXTRA_ITERS))


def _validate(k: int, num_iters: int | None, dim: int) -> int:
  if k < 1:
    raise ValueError(f"Asked for k={k} eigenpairs; k must be >= 1.")
  if k > dim:
    raise ValueError(
        f"Asked for k={k} eigenpairs but the operator acts on only {dim} "
        f"parameters (sum of leaf sizes of `like`), so at most {dim} exist. "
        f"Use k <= {dim}.")
  if num_iters is None:
    return default_num_iters(k, dim)
  if num_iters < k:
    raise ValueError(f"num_iters={num_iters} < k={k}: Lanczos needs at "
                     f"least k iterations for k Ritz pairs; use >= {k}.")
  # More than `dim` Krylov vectors cannot be orthonormal; m = dim is exact.
  return min(num_iters, dim)


def _cast_like(krylov: PyTree, v: PyTree) -> PyTree:
  return jax.tree.map(lambda basis, x: x.astype(basis.dtype), krylov, v)


@functools.partial(jax.jit, donate_argnums=(0,))
def _append(krylov: PyTree, index, w: PyTree, scale):
  """Stores ``q = scale * w`` as Krylov vector ``index``; returns (K, q)."""
  q = jax.tree.map(lambda x: x * scale.astype(x.dtype), w)
  krylov = jax.tree.map(lambda basis, x: basis.at[index].set(x), krylov, q)
  return krylov, q


def _project_out(krylov: PyTree, w: PyTree):
  coeffs = tree_math.basis_coefficients(krylov, w)
  return _cast_like(krylov, tree_math.tree_sub(
      w, tree_math.basis_combine(krylov, coeffs))), coeffs


@jax.jit
def _orthogonalise(krylov: PyTree, w: PyTree):
  """CGS against all stored vectors (unused rows are zero and do nothing).

  Returns:
    (w orthogonalised, total coefficients (m,), ||w|| before, ||w|| after).
  """
  w = _cast_like(krylov, w)
  norm_in = tree_math.tree_norm(w)
  w1, coeffs = _project_out(krylov, w)
  norm1 = tree_math.tree_norm(w1)

  def second_pass(_):
    w2, coeffs2 = _project_out(krylov, w1)
    return w2, coeffs + coeffs2, tree_math.tree_norm(w2)

  w, coeffs, norm_out = jax.lax.cond(
      norm1 < _KAHAN * norm_in, second_pass, lambda _: (w1, coeffs, norm1),
      None)
  return w, coeffs, norm_in, norm_out


@jax.jit
def _random_orthogonal(krylov: PyTree, key: jax.Array):
  """A random vector orthogonal to the Krylov basis (two passes), and norm."""
  template = tree_math.basis_vector(krylov, 0)
  w = tree_math.tree_random_normal(key, template)
  w, _ = _project_out(krylov, w)
  w, _ = _project_out(krylov, w)
  return w, tree_math.tree_norm(w)


_ritz_vectors = jax.jit(tree_math.basis_transform)


def lanczos_eigenpairs(matvec: Matvec, like: PyTree, k: int, *,
                       num_iters: int | None = None, key: jax.Array,
                       stop_on_breakdown: bool = False) -> EigenResult:
  """Top-k (algebraically largest) eigenpairs of a symmetric operator.

  Args:
    matvec: ``v -> A v`` on pytrees like ``like``; A must be symmetric and
      fixed during the run.
    like: pytree with the structure and shapes of the vectors (e.g. the
      trainable params). Its values are not used.
    k: number of eigenpairs, 1 <= k <= number of scalars in ``like``.
    num_iters: Krylov dimension m >= k (capped by the dimension). ``None``:
      ``default_num_iters(k, dim)`` = max(2k, k + 8).
    key: PRNG key for the starting vector (and restarts).
    stop_on_breakdown: what to do when the Krylov space becomes invariant
      (beta ~ 0). False (default): restart with a fresh random vector
      orthogonal to the Krylov basis and continue to ``num_iters``. True:
      end early once >= k vectors exist, saving HVPs; but one Krylov
      sequence holds only one direction per distinct eigenvalue, so an
      eigenvalue repeated inside the top k (e.g. 0 for an operator of rank
      < k) is then returned with too small a multiplicity. With fewer than k
      vectors the run always restarts, so exactly k pairs are returned.
      Breakdown needs an invariant subspace to float32 precision, which for
      real networks (P >> num_iters) essentially never happens; both
      settings report it in ``breakdown``.

  Returns:
    An ``EigenResult``; Krylov vectors and Ritz vectors are float32 (or
    the leaf dtype if wider).

  Raises:
    ValueError: ``k < 1``, ``k`` above the number of parameters, or
      ``num_iters < k``.
  """
  dim = tree_math.tree_size(like)
  m = _validate(k, num_iters, dim)
  krylov = tree_math.basis_zeros(like, m)  # shards like `like`
  key, start_key = jax.random.split(key)
  w, norm = _random_orthogonal(krylov, start_key)
  krylov, q = _append(krylov, 0, w, 1.0 / norm)

  alphas, betas = [], []
  largest_image = 0.0  # running estimate of ||A||
  breakdown, num_restarts, num_matvecs, last_beta = False, 0, 0, 0.0
  for j in range(m):
    w, coeffs, norm_in, beta = _orthogonalise(krylov, matvec(q))
    num_matvecs += 1
    coeffs, norm_in, beta = jax.device_get((coeffs, norm_in, beta))
    alphas.append(float(coeffs[j]))
    largest_image = max(largest_image, float(norm_in))
    invariant = float(beta) <= _BREAKDOWN_RTOL * largest_image
    breakdown = breakdown or invariant
    last_beta = float(beta)
    if j + 1 == m or (invariant and stop_on_breakdown and j + 1 >= k):
      break
    if invariant:
      # Start a new Krylov sequence in the orthogonal complement; T becomes
      # block diagonal (zero coupling).
      key, restart_key = jax.random.split(key)
      w, norm = _random_orthogonal(krylov, restart_key)
      num_restarts += 1
      betas.append(0.0)
      scale = 1.0 / max(float(norm), np.finfo(np.float32).tiny)
    else:
      betas.append(float(beta))
      scale = 1.0 / float(beta)
    krylov, q = _append(krylov, j + 1, w, jnp.float32(scale))

  num_vectors = len(alphas)
  tridiagonal = (np.diag(np.asarray(alphas, np.float64))
                 + np.diag(np.asarray(betas, np.float64), 1)
                 + np.diag(np.asarray(betas, np.float64), -1))
  theta, s = np.linalg.eigh(tridiagonal)
  order = np.argsort(-theta, kind="stable")[:k]
  # Rows beyond num_vectors of the Krylov basis are zero: pad, don't slice,
  # so the transform's shapes do not depend on early stopping.
  coeffs = np.zeros((m, k), np.float32)
  coeffs[:num_vectors] = s[:, order]
  eigenvectors = _ritz_vectors(krylov, jnp.asarray(coeffs))
  residuals = np.abs(last_beta * s[num_vectors - 1, order])
  return EigenResult(
      eigenvalues=jnp.asarray(theta[order], jnp.float32),
      eigenvectors=eigenvectors,
      num_matvecs=num_matvecs,
      num_iters=num_vectors,
      breakdown=bool(breakdown),
      residual_norms=jnp.asarray(residuals, jnp.float32),
      num_restarts=num_restarts)


def top_eigenpairs(matvec: Matvec, like: PyTree, k: int, *,
                   num_iters: int | None = None, key: jax.Array
                   ) -> tuple[jax.Array, PyTree]:
  """Top-k eigenpairs ``(eigenvalues (k,), eigenvectors)``, descending.

  Thin wrapper of ``lanczos_eigenpairs``; see it for the arguments.
  """
  result = lanczos_eigenpairs(matvec, like, k, num_iters=num_iters, key=key)
  return result.eigenvalues, result.eigenvectors


MergeFn = Callable[[merge_lib.CurvatureBasis | None, merge_lib.CurvatureBasis,
                    int], merge_lib.CurvatureBasis]


def per_batch_eigenpairs(make_matvec_for_batch: Callable[[PyTree], Matvec],
                         batches: PyTree, like: PyTree, k: int, *,
                         num_iters: int | None = None, key: jax.Array,
                         merge: str | MergeFn = "average") -> EigenResult:
  """The reference implementation's estimator: one Lanczos run per batch.

  Runs Lanczos on each single batch's operator and merges the N rank-k
  answers, to compare with one run on the batch-averaged operator (which
  gives the exact top-k of the averaged Hessian; this does not).

  Args:
    make_matvec_for_batch: ``batch -> matvec`` for ONE batch (leaves without
      the leading N axis). Build it from a function object defined once so
      each call reuses the compiled HVP.
    batches: pytree whose leaves have a leading axis N.
    like: pytree with the structure and shapes of the vectors.
    k: eigenpairs per run and rank of the merged result.
    num_iters: Krylov dimension per run (the reference uses m = k).
    key: PRNG key; batch n uses ``fold_in(key, n)``.
    merge: ``'average'``: running ``merge_average`` with weight 1/(n+1), i.e.
      the rank-k truncation of the mean of the N low-rank Hessians; or a
      callable ``(merged_so_far | None, new CurvatureBasis, n) -> merged``.

  Returns:
    An ``EigenResult`` with totals over the N runs (``residual_norms`` NaN:
    the merged pairs are not Ritz pairs of one operator).
  """
  if merge == "average":
    merge_fn = lambda old, new, n: merge_lib.merge_average(
        old, new, rank=k, weight_new=1.0 / (n + 1))
  elif callable(merge):
    merge_fn = merge
  else:
    raise ValueError(f"`merge` must be 'average' or a callable; got {merge!r}.")
  num_batches = {x.shape[0] for x in jax.tree.leaves(batches)}
  if len(num_batches) != 1:
    raise ValueError("`batches` leaves must share the leading axis N; got "
                     f"{sorted(num_batches)}.")
  merged, num_matvecs, total_iters, breakdown = None, 0, 0, False
  for n in range(num_batches.pop()):
    batch = jax.tree.map(lambda x: x[n], batches)
    result = lanczos_eigenpairs(make_matvec_for_batch(batch), like, k,
                                num_iters=num_iters,
                                key=jax.random.fold_in(key, n))
    num_matvecs += result.num_matvecs
    total_iters += result.num_iters
    breakdown = breakdown or result.breakdown
    merged = merge_fn(merged, merge_lib.CurvatureBasis(
        result.eigenvalues, result.eigenvectors), n)
  return EigenResult(merged.eigenvalues, merged.vectors, num_matvecs,
                     total_iters, breakdown,
                     jnp.full((merged.rank,), jnp.nan, jnp.float32))
