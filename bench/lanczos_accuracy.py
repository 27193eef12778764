"""Lanczos accuracy against scipy's eigsh on the same HVP operator.

    .venv/bin/python -m bench.lanczos_accuracy [--variant pico/2] [--k 16]
        [--num_batches 8] [--batch_size 32] [--train_steps 300]
        [--factors 1,1.5,2,3,4] [--states trained,init]

For a ViT trained on digits task 0 (and the same ViT at initialisation
with only its head trained: a zero-initialised head gives a zero Hessian), on
the Hessian of the mean task loss over N fixed batches (the operator built
as `train/continual.py` builds it):
  1. the reference: `scipy.sparse.linalg.eigsh` (which='LA', tol 1e-8) on a
     LinearOperator wrapping the same jitted HVP on flattened vectors;
  2. ours (`lanczos_eigenpairs`) with m = f * k for f in --factors: relative
     error of each top-k eigenvalue, the captured share of top-k curvature
     trace(V^T H V) / (lambda_1 + ... + lambda_k) with V our vectors and
     lambda eigsh's, the true residuals max_i ||H v_i - theta_i v_i|| /
     lambda_1, and our matvec count m;
  3. eigsh at looser tolerances: its matvec count for a given accuracy;
  4. the estimator: Lanczos on the mean-of-N Hessian vs the reference's N
     single-batch runs merged by averaging (`per_batch_eigenpairs`), both
     against eigsh on the mean Hessian, at equal single-batch HVP counts.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.sparse import linalg as sla

from bench import common
from nostalgia_jax import curvature
from nostalgia_jax.curvature import tree_math


def eigsh(apply, dim: int, k: int, tol: float, seed: int = 0):
  count = [0]
  def counted(x):
    count[0] += 1
    return apply(x)
  op = sla.LinearOperator((dim, dim), matvec=counted, dtype=np.float64)
  v0 = np.random.default_rng(seed).standard_normal(dim)
  try:
    values = sla.eigsh(op, k=k, which="LA", tol=tol, v0=v0,
                       maxiter=300, return_eigenvectors=False)
  except sla.ArpackNoConvergence:
    print(f"  (eigsh tol={tol:g}: no convergence after {count[0]} matvecs; "
          f"retrying with tol={100 * tol:g})")
    values, more = eigsh(apply, dim, k, 100 * tol, seed)
    count[0] += more
  return np.sort(values)[::-1], count[0]


def quality(matvec, vectors, values, reference):
  """(relative errors (k,), captured share, max true residual / lambda_1)."""
  k = len(reference)
  images = [matvec(tree_math.basis_vector(vectors, i)) for i in range(k)]
  images = tree_math.basis_from_list(images)
  rayleigh = np.asarray(jnp.diagonal(tree_math.basis_gram(vectors, images)))
  share = rayleigh.sum() / reference.sum()
  residual = tree_math.tree_sub(
      images, jax.tree.map(
          lambda x: jnp.asarray(values).reshape((-1,) + (1,) * (x.ndim - 1))
          * x, vectors))
  res = [float(tree_math.tree_norm(tree_math.basis_vector(residual, i)))
         for i in range(k)]
  errors = np.abs(np.asarray(values, np.float64) - reference) / np.abs(
      reference)
  return errors, float(share), max(res) / abs(reference[0])


def run_state(label: str, args) -> None:
  # 'init': backbone at initialisation, head trained alone (the warm-up).
  model = common.trained_model(args.variant, args.image_size,
                               steps_=args.train_steps,
                               head_only=label == "init")
  batches = common.fixed_batches(model.examples, args.num_batches,
                                 args.batch_size)
  matvec = common.curvature_operator(model, batches)
  backbone = model.params["backbone"]
  dim, apply, _ = common.flat_operator(matvec, backbone)
  k = args.k
  start = time.perf_counter()
  reference, ref_count = eigsh(apply, dim, k, tol=1e-8)
  print(f"\n## {label}: {args.variant}@{args.image_size}, {dim} params, "
        f"final train loss {model.final_loss:.3f}, Hessian of the mean loss "
        f"over N={args.num_batches} x {args.batch_size} examples")
  print(f"eigsh tol=1e-8: {ref_count} matvecs "
        f"({time.perf_counter() - start:.0f} s); top-{k} eigenvalues:")
  print("  " + " ".join(f"{x:.4g}" for x in reference))

  ms = sorted({max(k, int(round(f * k))) for f in args.factors})
  rows = {}
  for m in ms:
    result = curvature.lanczos_eigenpairs(matvec, backbone, k, num_iters=m,
                                          key=jax.random.key(args.seed))
    rows[m] = (result.num_matvecs,) + quality(
        matvec, result.eigenvectors, np.asarray(result.eigenvalues), reference)
  print("\nrelative error |theta_i - lambda_i| / lambda_i of eigenvalue i, "
        "per Krylov dimension m:")
  print(f"{'i':>4}" + "".join(f"{'m=' + str(m):>10}" for m in ms))
  for i in range(k):
    print(f"{i + 1:>4}" + "".join(f"{rows[m][1][i]:>10.1e}" for m in ms))
  print(f"{'max':>4}" + "".join(f"{rows[m][1].max():>10.1e}" for m in ms))
  print(f"{'med':>4}" + "".join(f"{np.median(rows[m][1]):>10.1e}"
                                for m in ms))
  print("\n  m   m/k  matvecs  max rel err  captured share  max resid/lam1")
  for m in ms:
    n, errors, share, res = rows[m]
    print(f"{m:>3} {m / k:>5.2g} {n:>8} {errors.max():>12.2e} "
          f"{share:>15.4f} {res:>15.2e}")

  print("\neigsh at looser tolerances (same operator, same k):")
  print("     tol  matvecs  max rel err  median rel err")
  for tol in args.eigsh_tols:
    values, count = eigsh(apply, dim, k, tol=tol)
    errors = np.abs(values - reference) / np.abs(reference)
    print(f"{tol:>8.0e} {count:>8} {errors.max():>12.2e} "
          f"{np.median(errors):>15.2e}")

  if label == "trained" and args.num_batches > 1:
    compare_estimators(model, batches, matvec, reference, args)


def compare_estimators(model, batches, matvec, reference, args) -> None:
  k, n = args.k, args.num_batches
  backbone = model.params["backbone"]
  print(f"\nestimators vs eigsh on the mean-of-{n} Hessian "
        "(cost in single-batch HVPs):")
  print(f"{'estimator':<34}{'batch HVPs':>11}{'max rel err':>13}"
        f"{'med rel err':>13}{'captured':>10}")
  make = lambda batch: common.curvature_operator(
      model, jax.tree.map(lambda x: x[None], batch))
  for m in sorted({k, curvature.default_num_iters(k, 10**9)}):
    result = curvature.per_batch_eigenpairs(
        make, batches, backbone, k, num_iters=m, key=jax.random.key(args.seed))
    errors, share, _ = quality(matvec, result.eigenvectors,
                               np.asarray(result.eigenvalues), reference)
    print(f"{f'per-batch merged, m={m}':<34}{result.num_matvecs:>11}"
          f"{errors.max():>13.2e}{np.median(errors):>13.2e}{share:>10.4f}")
  for m in sorted({k, curvature.default_num_iters(k, 10**9)}):
    result = curvature.lanczos_eigenpairs(matvec, backbone, k, num_iters=m,
                                          key=jax.random.key(args.seed))
    errors, share, _ = quality(matvec, result.eigenvectors,
                               np.asarray(result.eigenvalues), reference)
    print(f"{f'mean Hessian, m={m}':<34}{result.num_matvecs * n:>11}"
          f"{errors.max():>13.2e}{np.median(errors):>13.2e}{share:>10.4f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="pico/2")
  parser.add_argument("--image_size", type=int, default=8)
  parser.add_argument("--k", type=int, default=16)
  parser.add_argument("--num_batches", type=int, default=8)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--train_steps", type=int, default=300)
  parser.add_argument("--factors", default="1,1.5,2,3,4",
                      type=lambda s: [float(x) for x in s.split(",")])
  parser.add_argument("--eigsh_tols", default="1e-1,1e-2,1e-3,1e-4",
                      type=lambda s: [float(x) for x in s.split(",")])
  parser.add_argument("--states", default="trained,init")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  print(f"# {common.machine()}; default num_iters(k={args.k}) = "
        f"{curvature.default_num_iters(args.k, 10**9)}")
  for label in args.states.split(","):
    run_state(label, args)


if __name__ == "__main__":
  main()
