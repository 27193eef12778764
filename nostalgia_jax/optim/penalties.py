"""Quadratic regularisers of the continual-learning baselines: L2-SP and EWC.

Both are pure functions of parameter pytrees, meant to be added to the task
loss inside a jitted train step. Every tree argument must have the structure
and leaf shapes of the parameters it is compared with; a mismatch (a missing
layer, a LoRA tree passed where the full backbone was expected) raises a
`ValueError` naming the offending paths at trace time instead of silently
broadcasting.

This module never decides *which* parameters are regularised (backbone only,
LoRA only, ...): the caller passes the matching subtrees.

References:
  Li, Grandvalet, Davoine. "Explicit inductive bias for transfer learning with
  convolutional networks" (L2-SP), ICML 2018.
  Kirkpatrick et al. "Overcoming catastrophic forgetting in neural networks"
  (EWC), PNAS 2017.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

_MAX_LISTED = 5  # paths named in a mismatch error before "... and N more"


def _leaf_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): jnp.shape(leaf) for path, leaf in leaves}


def listed(items) -> str:
  """The first few items, comma-separated, then "... and N more"."""
  items = list(items)
  shown = ", ".join(items[:_MAX_LISTED])
  more = len(items) - _MAX_LISTED
  return shown + (f" ... and {more} more" if more > 0 else "")


def assert_trees_match(
    tree: PyTree, other: PyTree, *, names: tuple[str, str] = ("tree", "other")
) -> None:
  """Raises if two pytrees differ in structure or in any leaf shape.

  Works on concrete arrays and on tracers (shapes are static under `jit`).

  Args:
    tree: the reference pytree (e.g. the current parameters).
    other: a pytree that must match it leaf for leaf (an anchor, a Fisher).
    names: how the two trees are called in the error message.

  Raises:
    ValueError: naming the paths present in only one tree, or the paths whose
      shapes differ, and both shapes.
  """
  name, other_name = names
  shapes, other_shapes = _leaf_shapes(tree), _leaf_shapes(other)
  only_here = [p for p in shapes if p not in other_shapes]
  only_there = [p for p in other_shapes if p not in shapes]
  problems = []
  if only_here:
    problems.append(f"in {name} but not in {other_name}: {listed(only_here)}")
  if only_there:
    problems.append(f"in {other_name} but not in {name}: {listed(only_there)}")
  bad_shapes = [
      f"{p} {shapes[p]} vs {other_shapes[p]}"
      for p in shapes
      if p in other_shapes and tuple(shapes[p]) != tuple(other_shapes[p])
  ]
  if bad_shapes:
    problems.append(f"leaf shapes differ ({name} vs {other_name}): {listed(bad_shapes)}")
  if not problems and jax.tree.structure(tree) != jax.tree.structure(other):
    # Same paths and shapes but different node types (dict vs FrozenDict...).
    problems.append(
        f"same leaves but different container types: {jax.tree.structure(tree)}"
        f" vs {jax.tree.structure(other)}"
    )
  if problems:
    raise ValueError(
        f"{name} and {other_name} must be pytrees of the same structure and "
        "leaf shapes (pass the matching subtree, e.g. the trainable backbone "
        "params for both); " + "; ".join(problems)
    )


def _squared_norm(tree: PyTree) -> jax.Array:
  """Sum of squares of all leaves, accumulated in float32."""
  leaves = jax.tree.leaves(tree)
  return sum(
      (jnp.sum(jnp.square(leaf.astype(jnp.float32))) for leaf in leaves),
      start=jnp.zeros((), jnp.float32),
  )


def l2sp_penalty(
    backbone: PyTree,
    anchor: PyTree,
    head: PyTree,
    *,
    alpha: float,
    beta: float,
) -> jax.Array:
  """L2-SP: pull the backbone towards its starting point, shrink the head.

  penalty = alpha/2 * ||backbone - anchor||^2 + beta/2 * ||head||^2

  Args:
    backbone: current trainable backbone parameters.
    anchor: the backbone parameters at the start of the task sequence (the
      pretrained weights); same structure and shapes as `backbone`.
    head: parameters that are only decayed towards zero (the current task
      head). Pass `{}` or `None` for no head term.
    alpha: strength of the pull towards the anchor.
    beta: strength of the plain weight decay on the head.

  Returns:
    A float32 scalar.

  Example:
    >>> loss = task_loss + l2sp_penalty(p["backbone"], p0["backbone"],
    ...                                 p["head"], alpha=1e-2, beta=1e-4)
  """
  assert_trees_match(backbone, anchor, names=("backbone", "anchor"))
  drift = jax.tree.map(
      lambda w, w0: w.astype(jnp.float32) - w0.astype(jnp.float32), backbone, anchor
  )
  return 0.5 * alpha * _squared_norm(drift) + 0.5 * beta * _squared_norm(head)


def ewc_penalty(
    params: PyTree, anchor: PyTree, fisher: PyTree, *, strength: float
) -> jax.Array:
  """EWC: a diagonal-Fisher-weighted pull towards earlier tasks' solution.

  penalty = strength/2 * sum_i F_i (w_i - w*_i)^2

  Args:
    params: current regularised parameters.
    anchor: the parameters w* at the end of the previous task.
    fisher: the (possibly online-accumulated) diagonal Fisher, non-negative,
      same structure as `params` (see `nostalgia_jax.optim.fisher`).
    strength: the EWC lambda.

  Returns:
    A float32 scalar.
  """
  assert_trees_match(params, anchor, names=("params", "anchor"))
  assert_trees_match(params, fisher, names=("params", "fisher"))
  weighted = jax.tree.map(
      lambda w, w0, f: f.astype(jnp.float32)
      * jnp.square(w.astype(jnp.float32) - w0.astype(jnp.float32)),
      params,
      anchor,
      fisher,
  )
  total = sum(
      (jnp.sum(leaf) for leaf in jax.tree.leaves(weighted)),
      start=jnp.zeros((), jnp.float32),
  )
  return 0.5 * strength * total
