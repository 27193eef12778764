"""Diagonal Fisher information for EWC, from per-example gradients.

The diagonal Fisher is E_x E_{y ~ p} [ (d/dw log p(y | x, w))^2 ]. The
expectation over examples must be taken over *per-example* squared gradients
(`jax.vmap` of `jax.grad`): squaring a mini-batch gradient would give
(sum g)^2, which underestimates the diagonal by roughly the batch size and
mixes examples.

With `labels=None` (the default) y is sampled from the model's own predictive
distribution (the "true" Fisher, as in the EWC paper); with given labels it
is the "empirical" Fisher. Label i is drawn as

    jax.random.categorical(jax.random.split(key, n)[i], logits_i)

whatever the chunking, so the result does not depend on `batch_size` and a
reference loop can reproduce it (`sample_labels` does exactly this).

Memory: one chunk holds `batch_size` full per-example gradients (batch_size x
the size of `params`), so keep `batch_size` small for a full ViT-B backbone
(16 x 88M float32 = 5.6 GB) and larger in LoRA space.

This module never decides which parameters the Fisher is taken over: pass
the trainable subtree as `params` and close the rest into `logits_fn`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from nostalgia_jax.optim.penalties import assert_trees_match

PyTree = Any
LogitsFn = Callable[[PyTree, jax.Array], jax.Array]


def _example_logits(logits_fn: LogitsFn, params: PyTree, image: jax.Array) -> jax.Array:
  """Float32 logits of one example, through the batched `logits_fn`."""
  return logits_fn(params, image[None])[0].astype(jnp.float32)


def _draw_label(key: jax.Array, logits: jax.Array) -> jax.Array:
  """The one place a label is sampled, shared by the Fisher and `sample_labels`."""
  return jax.random.categorical(key, jax.lax.stop_gradient(logits))


def _example_squared_grad(logits_fn, sample, params, image, label, key):
  """Squared gradient of -log p(y | image) for one example (a pytree)."""

  def negative_log_likelihood(p):
    logits = _example_logits(logits_fn, p, image)
    y = _draw_label(key, logits) if sample else label
    return -jax.nn.log_softmax(logits)[y]

  grads = jax.grad(negative_log_likelihood)(params)
  return jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), grads)


def _with_context(logits_fn: Callable, context: PyTree) -> LogitsFn:
  """`logits_fn(params, images)`, or `logits_fn(params, images, context)`."""
  if context is None:
    return logits_fn
  return lambda p, x: logits_fn(p, x, context)


def _accumulate_chunk(logits_fn, sample, total, params, context, images, labels,
                      keys, weights):
  """total + sum_i weights_i * g_i^2 over one chunk (padding has weight 0)."""
  logits_fn = _with_context(logits_fn, context)
  per_example = jax.vmap(
      functools.partial(_example_squared_grad, logits_fn, sample),
      in_axes=(None, 0, 0, 0),
  )(params, images, labels, keys)
  return jax.tree.map(
      lambda acc, g: acc + jnp.tensordot(weights, g, axes=1), total, per_example
  )


def _chunks(n: int, batch_size: int):
  """Yields (gather indices, weights) per chunk; the last one is edge-padded.

  Padding repeats the last real example (so everything stays finite) with
  weight 0, keeping one chunk shape and hence one compilation.
  """
  for start in range(0, n, batch_size):
    positions = np.arange(start, start + batch_size)
    weights = (positions < n).astype(np.float32)
    yield np.minimum(positions, n - 1), weights


def _check_batch_size(batch_size: int) -> None:
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")


def sample_labels(
    logits_fn: LogitsFn,
    params: PyTree,
    images: jax.Array,
    key: jax.Array,
    *,
    batch_size: int = 64,
    context: PyTree = None,
) -> jax.Array:
  """The labels `diagonal_fisher(..., labels=None, key=key)` samples.

  Label i is `jax.random.categorical(jax.random.split(key, n)[i], logits_i)`,
  with logits_i computed on example i alone (batch of 1), exactly as inside
  the Fisher.

  Args:
    logits_fn: `logits_fn(params, images) -> logits`, batched.
    params: parameters passed to `logits_fn`.
    images: array of n examples (leading axis).
    key: PRNG key.
    batch_size: examples per jitted chunk.
    context: optional non-differentiated arrays, as in `diagonal_fisher`.

  Returns:
    int32 labels of shape (n,).
  """
  _check_batch_size(batch_size)
  n = len(images)
  keys = jax.random.split(key, n)

  @jax.jit
  def chunk_labels(params, context, images, keys):
    bound = _with_context(logits_fn, context)

    def one(image, k):
      return _draw_label(k, _example_logits(bound, params, image))

    return jax.vmap(one)(images, keys)

  batch_size = min(batch_size, n)
  out = [
      chunk_labels(params, context, images[idx], keys[idx])[: int(weights.sum())]
      for idx, weights in _chunks(n, batch_size)
  ]
  return jnp.concatenate(out).astype(jnp.int32)


def diagonal_fisher(
    logits_fn: LogitsFn,
    params: PyTree,
    images: jax.Array,
    *,
    key: Optional[jax.Array] = None,
    labels: Optional[jax.Array] = None,
    batch_size: int = 16,
    context: PyTree = None,
) -> PyTree:
  """Diagonal Fisher: mean over examples of squared per-example gradients.

  Args:
    logits_fn: `logits_fn(params, images) -> logits` of shape (b, classes),
      batched, deterministic (eval mode, task head fixed). It is called on
      single examples with a batch axis of 1 under `vmap`.
    params: the parameters the Fisher is taken over (e.g. the trainable
      backbone); everything else belongs inside `logits_fn`.
    images: the n examples (leading axis), a numpy or jax array.
    key: PRNG key for sampling labels; required when `labels` is None.
    labels: optional int labels of shape (n,) for the empirical Fisher.
      None (default): labels are sampled from the model (true Fisher).
    batch_size: examples per chunk; bounds memory (see the module docstring).
    context: optional arrays `logits_fn` needs but that are not
      differentiated (the task head, frozen LoRA base weights); then
      `logits_fn(params, images, context)`. Passed as a jit argument, so it
      is never baked into the program as a constant.

  Returns:
    A float32 pytree like `params`: (1/n) sum_i (d/dw -log p(y_i | x_i))^2.

  Example:
    >>> def logits_fn(backbone, x):
    ...   return model.apply({"params": {**frozen, "backbone": backbone}}, x)
    >>> fisher = diagonal_fisher(logits_fn, params["backbone"], task_images,
    ...                          key=jax.random.key(0))
    >>> fisher = online_fisher_update(old_fisher, fisher, gamma=1.0)
  """
  _check_batch_size(batch_size)
  n = len(images)
  if n == 0:
    raise ValueError("diagonal_fisher needs at least one example, got 0 images.")
  sample = labels is None
  if sample and key is None:
    raise ValueError(
        "diagonal_fisher samples labels from the model when labels=None; pass "
        "key=jax.random.key(...) (or pass labels for the empirical Fisher)."
    )
  if not sample and len(labels) != n:
    raise ValueError(f"labels has {len(labels)} entries but images has {n}.")
  # Unused when labels are given, but kept so both modes share one signature.
  keys = jax.random.split(key if key is not None else jax.random.key(0), n)
  labels = jnp.zeros((n,), jnp.int32) if sample else jnp.asarray(labels, jnp.int32)

  # Built per call (logits_fn is a closure the caller may rebuild per task);
  # params are an argument, never baked into the program as constants. The
  # accumulator is donated so the running sum is updated in place.
  accumulate = jax.jit(
      functools.partial(_accumulate_chunk, logits_fn, sample), donate_argnums=0
  )
  batch_size = min(batch_size, n)
  total = jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), jnp.float32), params)
  for idx, weights in _chunks(n, batch_size):
    total = accumulate(total, params, context, images[idx], labels[idx],
                       keys[idx], weights)
  return jax.tree.map(lambda s: s / n, total)


def online_fisher_update(
    fisher_old: Optional[PyTree], fisher_new: PyTree, *, gamma: float
) -> PyTree:
  """Online EWC accumulation: gamma * F_old + F_new.

  Args:
    fisher_old: the accumulated Fisher of earlier tasks, or None before the
      first task (then `fisher_new` is returned as is).
    fisher_new: the Fisher of the task just finished.
    gamma: decay of the old Fisher in [0, 1]; 1 sums all tasks (plain
      multi-task EWC with one anchor), < 1 forgets old tasks gradually.

  Returns:
    The updated Fisher pytree.
  """
  if not 0.0 <= gamma <= 1.0:
    raise ValueError(f"gamma must be in [0, 1], got {gamma}.")
  if fisher_old is None:
    return fisher_new
  assert_trees_match(fisher_new, fisher_old, names=("fisher_new", "fisher_old"))
  return jax.tree.map(lambda old, new: gamma * old + new, fisher_old, fisher_new)
