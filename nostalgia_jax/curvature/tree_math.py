"""Linear algebra on parameter pytrees.

A *vector* is a pytree shaped like the trainable parameters. A *basis* is a
pytree with the same structure whose every leaf has one extra leading axis of
size ``r`` (the number of basis vectors): row ``i`` of every leaf together is
vector ``i``. Inner products are tree-sums of per-leaf dot products.

This module must never flatten a pytree into one P-long vector: bases then
shard exactly like the parameters and never need a flat copy (88M floats per
vector for ViT-B). Every function is pure and jit-friendly; reductions
accumulate in at least float32 so bf16-stored bases keep float32 maths.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

PyTree = Any


def _acc_dtype(*arrays) -> jnp.dtype:
  """At least float32 (float64 stays float64 when x64 is on)."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _tree_sum(values: Sequence[jax.Array]) -> jax.Array:
  return functools.reduce(jnp.add, values)


def _check_nonempty(leaves, what: str):
  if not leaves:
    raise ValueError(f"{what} has no array leaves.")


# ----------------------------------------------------------------- vectors --


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
  """Inner product <a, b>: the sum over leaves of ``vdot``, in >= float32."""
  leaves = jax.tree.leaves(
      jax.tree.map(
          lambda x, y: jnp.vdot(x.astype(_acc_dtype(x, y)),
                                y.astype(_acc_dtype(x, y))), a, b))
  _check_nonempty(leaves, "tree_vdot input")
  return _tree_sum(leaves)


def tree_norm(a: PyTree) -> jax.Array:
  """Euclidean norm of a pytree vector."""
  return jnp.sqrt(tree_vdot(a, a))


def tree_add(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.add, a, b)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
  return jax.tree.map(jnp.subtract, a, b)


def tree_scale(a: PyTree, scalar) -> PyTree:
  """``scalar * a``; each leaf keeps its dtype."""
  return jax.tree.map(lambda x: (scalar * x).astype(x.dtype), a)


def tree_axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
  """``alpha * x + y`` (BLAS axpy); leaves keep the dtype of ``y``."""
  return jax.tree.map(lambda xi, yi: (alpha * xi + yi).astype(yi.dtype), x, y)


def tree_zeros_like(a: PyTree, dtype=None) -> PyTree:
  return jax.tree.map(lambda x: jnp.zeros(x.shape, dtype or x.dtype), a)


def tree_cast(a: PyTree, dtype) -> PyTree:
  return jax.tree.map(lambda x: x.astype(dtype), a)


def tree_size(a: PyTree) -> int:
  """Number of scalars in the pytree (sum of leaf sizes)."""
  return int(sum(x.size for x in jax.tree.leaves(a)))


def tree_random_normal(key: jax.Array, like: PyTree, dtype=None) -> PyTree:
  """Standard normal pytree shaped like ``like`` (one subkey per leaf)."""
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, max(len(leaves), 1))
  return treedef.unflatten([
      jax.random.normal(k, x.shape, dtype or x.dtype)
      for k, x in zip(keys, leaves)
  ])


# ------------------------------------------------------------------- bases --


def basis_rank(basis: PyTree) -> int:
  """Number of vectors ``r`` in a basis; checks all leaves agree."""
  leaves = jax.tree.leaves(basis)
  _check_nonempty(leaves, "basis")
  ranks = {x.shape[0] if x.ndim else None for x in leaves}
  if len(ranks) != 1 or None in ranks:
    raise ValueError(
        "A basis needs the same leading axis (its rank) on every leaf; got "
        f"leading sizes {sorted(str(r) for r in ranks)}.")
  return ranks.pop()


def basis_zeros(like: PyTree, rank: int, dtype=None) -> PyTree:
  """A zero basis of rank ``rank`` shaped like ``like``.

  A leaf of ``like`` with a ``NamedSharding`` gets the same sharding with an
  unsharded leading axis, so the basis shards like the params.

  Args:
    like: arrays (or ``jax.ShapeDtypeStruct``s) shaped like one vector.
    rank: size of the leading axis.
    dtype: storage dtype; ``None``: the leaf dtype promoted to >= float32.
  """
  def leaf(x):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
      spec = tuple(sharding.spec) + (None,) * (len(x.shape) -
                                               len(sharding.spec))
      sharding = jax.sharding.NamedSharding(
          sharding.mesh, jax.sharding.PartitionSpec(None, *spec))
    else:
      sharding = None
    return jnp.zeros((rank,) + tuple(x.shape),
                     dtype or jnp.promote_types(x.dtype, jnp.float32),
                     device=sharding)
  return jax.tree.map(leaf, like)


def basis_coefficients(basis: PyTree, v: PyTree) -> jax.Array:
  """Coefficients ``U^T v`` of shape ``(r,)``."""
  def leaf(b, x):
    acc = _acc_dtype(b, x)
    return b.reshape(b.shape[0], -1).astype(acc) @ x.reshape(-1).astype(acc)
  return _tree_sum(jax.tree.leaves(jax.tree.map(leaf, basis, v)))


def basis_combine(basis: PyTree, coeffs: jax.Array) -> PyTree:
  """Linear combination ``U c`` (a vector); ``coeffs`` has shape ``(r,)``."""
  def leaf(b):
    acc = _acc_dtype(b, coeffs)
    return jnp.tensordot(coeffs.astype(acc), b.astype(acc), axes=1)
  return jax.tree.map(leaf, basis)


def basis_gram(a: PyTree, b: PyTree) -> jax.Array:
  """Cross Gram matrix ``A^T B`` of shape ``(r_a, r_b)``."""
  def leaf(x, y):
    acc = _acc_dtype(x, y)
    return (x.reshape(x.shape[0], -1).astype(acc)
            @ y.reshape(y.shape[0], -1).astype(acc).T)
  return _tree_sum(jax.tree.leaves(jax.tree.map(leaf, a, b)))


def basis_transform(basis: PyTree, matrix: jax.Array) -> PyTree:
  """New basis ``U M``: vector ``j`` is ``sum_i M[i, j] U_i``.

  Args:
    basis: basis of rank ``r``.
    matrix: ``(r, s)`` array.

  Returns:
    A basis of rank ``s`` (leaves in >= float32).
  """
  def leaf(b):
    acc = _acc_dtype(b, matrix)
    return jnp.tensordot(matrix.astype(acc).T, b.astype(acc), axes=1)
  return jax.tree.map(leaf, basis)


def basis_from_list(vectors: Sequence[PyTree]) -> PyTree:
  """Stacks a list of vectors into a basis (rank ``len(vectors)``)."""
  if not vectors:
    raise ValueError("basis_from_list needs at least one vector.")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *vectors)


def basis_concat(*bases: PyTree) -> PyTree:
  """Concatenates bases along the leading axis: ``[U_1, U_2, ...]``."""
  if not bases:
    raise ValueError("basis_concat needs at least one basis.")
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *bases)


def basis_slice(basis: PyTree, start: int, stop: int) -> PyTree:
  """Vectors ``start .. stop-1`` of a basis."""
  return jax.tree.map(lambda x: x[start:stop], basis)


def basis_take(basis: PyTree, indices) -> PyTree:
  """Vectors at ``indices`` (any order) of a basis."""
  indices = jnp.asarray(indices, jnp.int32)
  return jax.tree.map(lambda x: jnp.take(x, indices, axis=0), basis)


def basis_vector(basis: PyTree, index) -> PyTree:
  """Vector ``index`` of a basis."""
  return jax.tree.map(lambda x: x[index], basis)
