"""Pytree linear algebra against numpy on explicitly flattened vectors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nostalgia_jax.curvature import tree_math as tm

SHAPES = {"w": (3, 4), "b": (5,), "nested": {"k": (2, 2, 2)}}
DIM = 12 + 5 + 8


def _flat(tree):
  """Test-only flattening (sorted dict order, as jax.tree.leaves)."""
  return np.concatenate([np.ravel(np.asarray(x, np.float64))
                         for x in jax.tree.leaves(tree)])


def _flat_basis(basis):
  leaves = jax.tree.leaves(basis)
  r = leaves[0].shape[0]
  return np.concatenate([np.asarray(x, np.float64).reshape(r, -1)
                         for x in leaves], axis=1)  # (r, DIM)


def _random(seed, rank=None):
  rng = np.random.default_rng(seed)
  lead = () if rank is None else (rank,)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=lead + s),
                                            jnp.float32), SHAPES,
                      is_leaf=lambda s: isinstance(s, tuple))


def test_vector_ops_match_numpy():
  a, b = _random(0), _random(1)
  fa, fb = _flat(a), _flat(b)
  assert fa.shape == (DIM,)
  np.testing.assert_allclose(tm.tree_vdot(a, b), fa @ fb, rtol=1e-5)
  np.testing.assert_allclose(tm.tree_norm(a), np.linalg.norm(fa), rtol=1e-5)
  np.testing.assert_allclose(_flat(tm.tree_add(a, b)), fa + fb, rtol=1e-6)
  np.testing.assert_allclose(_flat(tm.tree_sub(a, b)), fa - fb, rtol=1e-6)
  np.testing.assert_allclose(_flat(tm.tree_scale(a, 2.5)), 2.5 * fa,
                             rtol=1e-6)
  np.testing.assert_allclose(_flat(tm.tree_axpy(-0.5, a, b)), -0.5 * fa + fb,
                             rtol=1e-6, atol=1e-6)
  assert tm.tree_size(a) == DIM
  assert np.all(_flat(tm.tree_zeros_like(a)) == 0)


def test_vdot_accumulates_in_float32_for_bf16():
  a = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _random(0))
  out = tm.tree_vdot(a, a)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, _flat(a) @ _flat(a), rtol=1e-5)


def test_basis_ops_match_numpy():
  u, w = _random(2, rank=3), _random(3, rank=4)
  v = _random(4)
  fu, fw, fv = _flat_basis(u), _flat_basis(w), _flat(v)
  assert tm.basis_rank(u) == 3
  np.testing.assert_allclose(tm.basis_coefficients(u, v), fu @ fv, rtol=1e-5)
  c = np.array([0.5, -1.0, 2.0])
  np.testing.assert_allclose(_flat(tm.basis_combine(u, jnp.asarray(c))),
                             fu.T @ c, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tm.basis_gram(u, w), fu @ fw.T, rtol=1e-5,
                             atol=1e-5)
  m = np.random.default_rng(5).normal(size=(3, 2))
  transformed = tm.basis_transform(u, jnp.asarray(m, jnp.float32))
  assert tm.basis_rank(transformed) == 2
  np.testing.assert_allclose(_flat_basis(transformed), (fu.T @ m).T,
                             rtol=1e-5, atol=1e-5)


def test_basis_ops_under_jit_and_bf16_storage():
  u = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _random(2, rank=3))
  v = _random(4)
  coeffs = jax.jit(tm.basis_coefficients)(u, v)
  assert coeffs.dtype == jnp.float32
  np.testing.assert_allclose(coeffs, _flat_basis(u) @ _flat(v), rtol=1e-5)


def test_basis_assembly():
  vectors = [_random(i) for i in range(3)]
  basis = tm.basis_from_list(vectors)
  np.testing.assert_array_equal(_flat_basis(basis),
                                np.stack([_flat(v) for v in vectors]))
  both = tm.basis_concat(basis, tm.basis_from_list(vectors[:1]))
  assert tm.basis_rank(both) == 4
  np.testing.assert_array_equal(_flat_basis(tm.basis_slice(both, 1, 3)),
                                _flat_basis(basis)[1:3])
  np.testing.assert_array_equal(_flat_basis(tm.basis_take(both, [3, 0])),
                                _flat_basis(both)[[3, 0]])
  np.testing.assert_array_equal(_flat(tm.basis_vector(both, 2)),
                                _flat(vectors[2]))


def test_basis_rank_rejects_inconsistent_leading_axis():
  bad = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((4, 2))}
  with pytest.raises(ValueError, match="same leading axis"):
    tm.basis_rank(bad)


def test_random_normal_shapes_and_independent_leaves():
  like = {"a": jnp.zeros((50,)), "b": jnp.zeros((50,), jnp.bfloat16)}
  r = tm.tree_random_normal(jax.random.key(0), like)
  assert r["a"].shape == (50,) and r["b"].dtype == jnp.bfloat16
  assert not np.allclose(np.asarray(r["a"]), np.asarray(r["b"], np.float32))
  assert 0.5 < float(jnp.std(r["a"])) < 1.5


def test_basis_zeros_shards_like_the_params():
  mesh = jax.make_mesh((1,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh,
                                        jax.sharding.PartitionSpec("data"))
  like = {"w": jax.device_put(jnp.zeros((4, 3), jnp.bfloat16), sharding),
          "b": jnp.zeros((3,))}
  basis = tm.basis_zeros(like, 5)
  assert basis["w"].shape == (5, 4, 3) and basis["w"].dtype == jnp.float32
  assert basis["w"].sharding.spec == jax.sharding.PartitionSpec(
      None, "data", None)
  assert basis["b"].shape == (5, 3) and tm.basis_rank(basis) == 5
