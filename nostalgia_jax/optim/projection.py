"""The Nostalgia projection as an optax gradient transformation.

Each update ``u`` is replaced by ``u - U diag(s) U^T u`` where the columns of
``U`` (a basis pytree: params-like, leading axis k) span the sharp curvature
directions of earlier tasks: ``s = 1`` removes the component along them
(hard projection), ``s_i = lambda_i / (median(lambda) + lambda_i)`` damps it
in proportion to the curvature (soft projection).

The basis lives in the transformation's STATE (made by ``init``), never in a
closure of ``update``: a jitted train step then takes it as an argument, so a
new basis of the same shapes neither recompiles nor is baked into the program
as a constant. Leaves where the basis holds ``None`` (e.g. task heads) pass
through unchanged and do not enter the inner products.

Where to put it: before SGD(+momentum) (project the gradients) every update
stays in the null space of ``U^T`` because momentum is a sum of projected
gradients; adaptive optimizers (Adam) rescale coordinates and leave it, so for
them project the final updates (``placement='after'``).

Example:

  >>> import jax, jax.numpy as jnp, optax
  >>> from nostalgia_jax.optim.projection import nostalgia
  >>> params = {'backbone': jnp.ones(3), 'head': jnp.ones(2)}
  >>> basis = {'backbone': jnp.array([[1.0, 0.0, 0.0]]), 'head': None}
  >>> tx = nostalgia(0.1, basis, momentum=0.9)
  >>> state = tx.init(params)
  >>> grads = {'backbone': jnp.array([5.0, 1.0, 1.0]), 'head': jnp.ones(2)}
  >>> updates, state = jax.jit(tx.update)(grads, state)
  >>> print(updates['backbone'], updates['head'])
  [-0.  -0.1 -0.1] [-0.1 -0.1]
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nostalgia_jax.optim.penalties import listed

PyTree = Any

PLACEMENTS = ("before", "after")
PROJECT_TARGETS = ("gradients", "updates")


class NostalgiaProjectionState(NamedTuple):
  """State of ``nostalgia_projection``.

  Attributes:
    basis: pytree with the structure of the params: covered leaves have shape
      ``(k,) + param_shape`` (orthonormal columns, stored in ``basis_dtype``),
      uncovered positions hold ``None``. ``None`` when projection is off.
    coefficient_scales: ``(k,)`` float32 ``s``: ones for hard projection,
      ``lambda / (median(lambda) + lambda)`` for soft. ``None`` when off.
  """
  basis: PyTree
  coefficient_scales: jax.Array | None


def _is_none(x) -> bool:
  return x is None


def _shape(x) -> tuple:
  return tuple(x.shape) if hasattr(x, "shape") else jnp.shape(x)


def _covers(prefix: tuple, path: tuple) -> bool:
  return path[:len(prefix)] == prefix


def check_basis_matches(basis: PyTree, tree: PyTree, *,
                        name: str = "params") -> int:
  """Checks a basis against params/updates; returns its rank k.

  Works on tracers (shapes are static). ``None`` in the basis may stand for a
  leaf or a whole subtree of ``tree``.

  Raises:
    ValueError: naming the paths present in only one tree, a leaf whose shape
      is not ``(k,) + shape in tree``, or leaves with different k.
  """
  basis_leaves, basis_def = jax.tree_util.tree_flatten_with_path(
      basis, is_leaf=_is_none)
  try:
    covered = basis_def.flatten_up_to(tree)
  except (ValueError, TypeError) as error:
    tree_paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    basis_paths = [p for p, _ in basis_leaves]
    only_basis = [jax.tree_util.keystr(p) for p in basis_paths
                  if not any(_covers(p, q) for q in tree_paths)]
    only_tree = [jax.tree_util.keystr(q) for q in tree_paths
                 if not any(_covers(p, q) for p in basis_paths)]
    raise ValueError(
        f"The projection basis does not have the structure of the {name}. "
        f"Only in the basis: [{listed(only_basis)}]; only in the {name}: "
        f"[{listed(only_tree)}]. Build the basis from the same (trainable) "
        "params tree, with None where no projection is wanted "
        f"(e.g. task heads). ({error})") from None
  ranks = {}
  for (path, leaf), target in zip(basis_leaves, covered):
    if leaf is None:
      continue
    if len(_shape(leaf)) < 1 or _shape(leaf)[1:] != _shape(target):
      raise ValueError(
          f"Projection basis leaf {jax.tree_util.keystr(path)} has shape "
          f"{_shape(leaf)}; expected (k,) + {_shape(target)} to match "
          f"the {name}.")
    ranks[jax.tree_util.keystr(path)] = _shape(leaf)[0]
  if not ranks:
    raise ValueError("The projection basis has no arrays (all None); pass "
                     "basis=None to switch projection off.")
  if len(set(ranks.values())) != 1:
    raise ValueError("Projection basis leaves disagree on the number of "
                     f"vectors k (leading axis): {ranks}.")
  return next(iter(ranks.values()))


def soft_scales(eigenvalues: jax.Array) -> jax.Array:
  """``s_i = lambda_i / (median(lambda) + lambda_i)`` in float32.

  Negative eigenvalues are clipped to 0 (no curvature to protect: ``s = 0``);
  a 0/0 (all clipped) gives 0.
  """
  lam = jnp.maximum(jnp.asarray(eigenvalues, jnp.float32), 0.0)
  denominator = jnp.median(lam) + lam
  return jnp.where(denominator > 0, lam / jnp.where(denominator > 0,
                                                    denominator, 1.0), 0.0)


def projection_state(basis: PyTree | None, *, eigenvalues=None,
                     soft: bool = False, basis_dtype=None,
                     params: PyTree | None = None) -> NostalgiaProjectionState:
  """Builds (and validates) the state held by ``nostalgia_projection``.

  Args:
    basis: params-like pytree with a leading k axis (None where uncovered),
      or ``None`` for no projection.
    eigenvalues: ``(k,)`` curvature of each direction; needed for ``soft``.
    soft: eigenvalue-aware soft projection instead of hard.
    basis_dtype: storage dtype of the basis (e.g. ``jnp.bfloat16``); the
      projection maths runs in float32 either way.
    params: if given, the basis is checked against it.

  Returns:
    A ``NostalgiaProjectionState``.
  """
  if basis is None:
    return NostalgiaProjectionState(None, None)
  k = (check_basis_matches(basis, params) if params is not None
       else check_basis_matches(basis, basis_shape_template(basis)))
  if eigenvalues is not None and jnp.shape(eigenvalues) != (k,):
    raise ValueError(f"`eigenvalues` has shape {jnp.shape(eigenvalues)} but "
                     f"the basis has k={k} vectors; expected ({k},).")
  if soft:
    if eigenvalues is None:
      raise ValueError("soft=True scales by lambda/(median(lambda)+lambda) and "
                       "needs `eigenvalues` (one per basis vector).")
    scales = soft_scales(eigenvalues)
  else:
    scales = jnp.ones((k,), jnp.float32)
  if basis_dtype is not None:
    basis = jax.tree.map(lambda b: None if b is None else b.astype(basis_dtype),
                         basis, is_leaf=_is_none)
  return NostalgiaProjectionState(basis, scales)


def basis_shape_template(basis: PyTree) -> PyTree:
  """Shape structs of one basis vector (leading axis dropped; None kept)."""
  return jax.tree.map(
      lambda b: None if b is None else jax.ShapeDtypeStruct(b.shape[1:],
                                                            b.dtype),
      basis, is_leaf=_is_none)


def project_out(updates: PyTree, basis: PyTree,
                coefficient_scales: jax.Array | None = None) -> PyTree:
  """``u - U diag(s) U^T u`` over covered leaves; others pass unchanged.

  The coefficients ``U^T u`` sum over covered leaves only, in float32;
  each output leaf keeps the dtype of its update.
  """
  basis_leaves, basis_def = jax.tree.flatten(basis, is_leaf=_is_none)
  update_leaves = basis_def.flatten_up_to(updates)
  pairs = [(b.reshape(b.shape[0], -1), u) for b, u in
           zip(basis_leaves, update_leaves) if b is not None]
  acc = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
  coeffs = sum(acc(b) @ acc(u.reshape(-1)) for b, u in pairs)
  if coefficient_scales is not None:
    coeffs = coeffs * coefficient_scales
  projected = [
      u if b is None else
      (acc(u) - (coeffs @ acc(b.reshape(b.shape[0], -1))).reshape(u.shape)
       ).astype(u.dtype)
      for b, u in zip(basis_leaves, update_leaves)]
  return basis_def.unflatten(projected)


def nostalgia_projection(basis: PyTree | None, *, eigenvalues=None,
                         soft: bool = False,
                         basis_dtype=None) -> optax.GradientTransformation:
  """Projects updates onto the orthogonal complement of a curvature basis.

  Args:
    basis: pytree like the params whose leaves have a leading axis k (U's k
      orthonormal columns), ``None`` at positions left unprojected (task
      heads); or ``None`` for the identity transformation.
    eigenvalues: ``(k,)`` eigenvalues of the basis directions (soft mode).
    soft: scale each coefficient by ``lambda_i / (median(lambda) +
      lambda_i)`` instead of removing it; requires ``eigenvalues``.
    basis_dtype: storage dtype of the basis in the state (maths in float32).

  Returns:
    An ``optax.GradientTransformation``; its state is a
    ``NostalgiaProjectionState``. ``init(params)`` checks the basis against
    ``params`` and ``update`` reads the basis from the state only.

  Raises:
    ValueError: soft without eigenvalues, eigenvalues of the wrong shape, a
      basis whose structure or shapes do not match the params/updates.
  """
  if basis is not None:
    # Fail at construction, not first use, on what can be checked already.
    projection_state(basis, eigenvalues=eigenvalues, soft=soft)

  def init_fn(params):
    return projection_state(basis, eigenvalues=eigenvalues, soft=soft,
                            basis_dtype=basis_dtype, params=params)

  def update_fn(updates, state, params=None):
    del params
    if state.basis is None:
      return updates, state
    check_basis_matches(state.basis, updates, name="updates")
    return project_out(updates, state.basis, state.coefficient_scales), state

  return optax.GradientTransformation(init_fn, update_fn)


def with_projection(base_optimizer: optax.GradientTransformation,
                    basis: PyTree | None, *, placement: str = "before",
                    eigenvalues=None, soft: bool = False,
                    basis_dtype=None) -> optax.GradientTransformation:
  """Chains the projection before or after any base optimizer.

  Args:
    base_optimizer: e.g. ``optax.sgd(lr, momentum=0.9)`` or ``optax.adam``.
    basis: as in ``nostalgia_projection``.
    placement: ``'before'``: project the gradients (exact for SGD with
      momentum); ``'after'``: project the final updates (exact for any base
      optimizer, e.g. Adam).
    eigenvalues, soft, basis_dtype: as in ``nostalgia_projection``.
  """
  if placement not in PLACEMENTS:
    raise ValueError(f"Unknown placement {placement!r}; allowed values: "
                     f"{PLACEMENTS}.")
  projection = nostalgia_projection(basis, eigenvalues=eigenvalues, soft=soft,
                                    basis_dtype=basis_dtype)
  if placement == "before":
    return optax.chain(projection, base_optimizer)
  return optax.chain(base_optimizer, projection)


def nostalgia(learning_rate: optax.ScalarOrSchedule, basis: PyTree | None, *,
              momentum: float | None = 0.9, nesterov: bool = False,
              eigenvalues=None, soft: bool = False,
              project: str = "gradients",
              basis_dtype=None) -> optax.GradientTransformation:
  """Nostalgia: SGD with momentum in the null space of a curvature basis.

  Args:
    learning_rate: a float or an optax schedule.
    basis: as in ``nostalgia_projection`` (``None``: plain SGD).
    momentum: SGD momentum (``None`` or 0 for none).
    nesterov: Nesterov momentum.
    eigenvalues, soft, basis_dtype: as in ``nostalgia_projection``.
    project: ``'gradients'`` (projection before SGD) or ``'updates'``
      (after it).

  Returns:
    ``optax.chain`` of the projection and ``optax.sgd``.
  """
  if project not in PROJECT_TARGETS:
    raise ValueError(f"Unknown project={project!r}; allowed values: "
                     f"{PROJECT_TARGETS}.")
  sgd = optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov)
  return with_projection(
      sgd, basis, placement="before" if project == "gradients" else "after",
      eigenvalues=eigenvalues, soft=soft, basis_dtype=basis_dtype)


def set_projection_basis(opt_state: PyTree, basis: PyTree | None, *,
                         eigenvalues=None, soft: bool = False,
                         basis_dtype=None,
                         params: PyTree | None = None) -> PyTree:
  """Swaps the basis in every ``NostalgiaProjectionState`` of an opt state.

  Keeps the rest of the optimizer state (momentum) and, for a basis of the
  same shapes, the compiled train step. Args as in ``projection_state``.
  """
  new_state = projection_state(basis, eigenvalues=eigenvalues, soft=soft,
                               basis_dtype=basis_dtype, params=params)
  return jax.tree.map(
      lambda s: new_state if isinstance(s, NostalgiaProjectionState) else s,
      opt_state, is_leaf=lambda s: isinstance(s, NostalgiaProjectionState))
