"""The Nostalgia optax transformation against dense numpy projections."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nostalgia_jax.optim import projection
from nostalgia_jax.optim.projection import (nostalgia, nostalgia_projection,
                                            set_projection_basis,
                                            with_projection)

K = 3
BACKBONE_DIM = 15  # {'w': (5, 2), 'b': (5,)}


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"backbone": {"b": jnp.asarray(rng.normal(size=5), jnp.float32),
                       "w": jnp.asarray(rng.normal(size=(5, 2)),
                                        jnp.float32)},
          "head": jnp.asarray(rng.normal(size=4), jnp.float32)}


def _flat_backbone(tree):
  return np.concatenate([np.ravel(np.asarray(tree["backbone"]["b"],
                                             np.float64)),
                         np.ravel(np.asarray(tree["backbone"]["w"],
                                             np.float64))])


def _basis(seed=1, k=K):
  """Orthonormal columns (BACKBONE_DIM, k) and the basis pytree (head None)."""
  rng = np.random.default_rng(seed)
  cols, _ = np.linalg.qr(rng.normal(size=(BACKBONE_DIM, k)))
  rows = cols.T.astype(np.float32)
  tree = {"backbone": {"b": jnp.asarray(rows[:, :5]),
                       "w": jnp.asarray(rows[:, 5:].reshape(k, 5, 2))},
          "head": None}
  return cols, tree


def _quadratic_loss(params, target, curvature):
  diff = jnp.concatenate([x.ravel() for x in jax.tree.leaves(params)]) - target
  return 0.5 * diff @ curvature @ diff


def _train(tx, params, steps=50):
  rng = np.random.default_rng(7)
  dim = sum(x.size for x in jax.tree.leaves(params))
  a = rng.normal(size=(dim, dim))
  curvature = jnp.asarray(a @ a.T / dim + np.eye(dim), jnp.float32)
  target = jnp.asarray(rng.normal(size=dim), jnp.float32)

  @jax.jit
  def step(params, state):
    grads = jax.grad(_quadratic_loss)(params, target, curvature)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  start_loss = _quadratic_loss(params, target, curvature)
  for _ in range(steps):
    params, state = step(params, state)
  assert _quadratic_loss(params, target, curvature) < start_loss
  return params


@pytest.mark.parametrize("make_tx", [
    lambda basis: nostalgia(0.05, basis, momentum=0.9),
    lambda basis: nostalgia(0.05, basis, momentum=0.9, nesterov=True,
                            project="updates"),
    lambda basis: with_projection(optax.adam(0.05), basis, placement="after"),
], ids=["sgd_momentum", "nesterov_updates", "adam_after"])
def test_training_never_moves_along_the_basis(make_tx):
  cols, basis = _basis()
  params = _params()
  trained = _train(make_tx(basis), params)
  change = _flat_backbone(trained) - _flat_backbone(params)
  assert np.linalg.norm(change) > 0.1
  assert np.abs(cols.T @ change).max() < 1e-5 * np.linalg.norm(change)
  assert not np.allclose(trained["head"], params["head"])  # heads train


def test_adam_with_projected_gradients_leaves_the_null_space():
  # Why `placement='after'` exists: Adam rescales coordinates of projected
  # gradients, so its updates do move along U.
  cols, basis = _basis()
  params = _params()
  trained = _train(with_projection(optax.adam(0.05), basis,
                                   placement="before"), params)
  change = _flat_backbone(trained) - _flat_backbone(params)
  assert np.abs(cols.T @ change).max() > 1e-3 * np.linalg.norm(change)


def _apply(tx, updates, params):
  out, _ = tx.update(updates, tx.init(params), params)
  return out


def test_hard_and_soft_projection_match_dense():
  cols, basis = _basis()
  params = _params()
  updates = _params(seed=3)
  u = _flat_backbone(updates)
  hard = _apply(nostalgia_projection(basis), updates, params)
  np.testing.assert_allclose(_flat_backbone(hard), u - cols @ (cols.T @ u),
                             atol=1e-5)
  eigenvalues = np.array([10.0, 2.0, 0.5])
  soft = _apply(nostalgia_projection(basis, eigenvalues=eigenvalues,
                                     soft=True), updates, params)
  scales = eigenvalues / (np.median(eigenvalues) + eigenvalues)
  np.testing.assert_allclose(_flat_backbone(soft),
                             u - cols @ (scales * (cols.T @ u)), atol=1e-5)
  for out in (hard, soft):  # the head is not covered: passes unchanged
    np.testing.assert_array_equal(out["head"], updates["head"])


def test_none_basis_is_identity():
  tx = nostalgia_projection(None)
  state = tx.init(_params())
  assert state == projection.NostalgiaProjectionState(None, None)
  updates = _params(seed=3)
  out, _ = tx.update(updates, state)
  assert out is updates


def test_bf16_storage_keeps_float32_maths():
  cols, basis = _basis()
  params = _params()
  tx = nostalgia_projection(basis, basis_dtype=jnp.bfloat16)
  state = tx.init(params)
  assert state.basis["backbone"]["w"].dtype == jnp.bfloat16
  updates = _params(seed=3)
  out, _ = tx.update(updates, state)
  assert out["backbone"]["w"].dtype == jnp.float32
  stored = np.concatenate([
      np.asarray(state.basis["backbone"]["b"], np.float64),
      np.asarray(state.basis["backbone"]["w"], np.float64).reshape(K, -1)],
                          axis=1).T
  u = _flat_backbone(updates)
  np.testing.assert_allclose(_flat_backbone(out),
                             u - stored @ (stored.T @ u), atol=1e-5)


def test_jitted_step_takes_the_basis_from_the_state_without_retracing():
  traces = []
  _, basis = _basis(seed=1)
  cols2, basis2 = _basis(seed=2)
  params = _params()
  tx = nostalgia(0.1, basis, momentum=0.9)

  @jax.jit
  def step(grads, state):
    traces.append(1)
    return tx.update(grads, state, params)

  state = tx.init(params)
  step(_params(seed=3), state)
  # A new basis of the same shapes, swapped into the existing state.
  state2 = set_projection_basis(state, basis2)
  updates, _ = step(_params(seed=3), state2)
  assert len(traces) == 1
  change = _flat_backbone(updates)
  assert np.linalg.norm(change) > 0
  assert np.abs(cols2.T @ change).max() < 1e-5 * np.linalg.norm(change)


def test_structure_and_shape_errors():
  _, basis = _basis()
  params = _params()
  missing = {"backbone": {"w": basis["backbone"]["w"]}, "head": None}
  with pytest.raises(ValueError, match=r"\['backbone'\]\['b'\]"):
    nostalgia_projection(missing).init(params)
  wrong_shape = {"backbone": {"b": basis["backbone"]["b"],
                              "w": jnp.zeros((K, 2, 5))}, "head": None}
  with pytest.raises(ValueError, match=r"\['backbone'\]\['w'\].*\(3, 2, 5\)"):
    nostalgia_projection(wrong_shape).init(params)
  ragged = {"backbone": {"b": basis["backbone"]["b"],
                         "w": jnp.zeros((K + 1, 5, 2))}, "head": None}
  with pytest.raises(ValueError, match="disagree on the number of vectors"):
    nostalgia_projection(ragged)
  with pytest.raises(ValueError, match="needs `eigenvalues`"):
    nostalgia_projection(basis, soft=True)
  with pytest.raises(ValueError, match=r"expected \(3,\)"):
    nostalgia_projection(basis, eigenvalues=jnp.ones(2), soft=True)
  with pytest.raises(ValueError, match="placement"):
    with_projection(optax.sgd(0.1), basis, placement="middle")
  with pytest.raises(ValueError, match="project="):
    nostalgia(0.1, basis, project="weights")
  # Updates that do not match the basis are caught in `update` too.
  tx = nostalgia_projection(basis)
  state = tx.init(params)
  with pytest.raises(ValueError, match="structure of the updates"):
    tx.update({"backbone": params["backbone"]}, state)


def test_soft_scales_handle_non_positive_eigenvalues():
  np.testing.assert_allclose(
      projection.soft_scales(jnp.array([4.0, 1.0, -2.0])),
      [4.0 / 5.0, 0.5, 0.0])
  np.testing.assert_allclose(projection.soft_scales(jnp.zeros(3)), 0.0)


def test_docstring_example_runs():
  result = doctest.testmod(projection)
  assert result.attempted > 0 and result.failed == 0
