"""Curvature matrix-vector products on parameter pytrees.

The operators are the curvature of a *fixed* objective: the mean loss over N
fixed batches (stacked along a leading axis), evaluated with a fixed model
(eval mode, no dropout, task head held constant). Lanczos needs exactly that:
the operator must not change between two matvecs of one run.

* ``hessian_matvec``: H v, forward-over-reverse (``jvp`` of ``grad``), about
  2-3 gradient costs per call.
* ``ggn_matvec``: generalised Gauss-Newton J^T H_out J v, positive
  semi-definite when the output loss is convex in the logits (cross-entropy).

Implementation notes (why it is written this way):

* The N batches are looped over with ``lax.scan`` inside ONE jitted function,
  so one matvec is one dispatch whatever N is.
* ``params`` and ``batches`` are arguments of the jitted function, bound with
  ``functools.partial`` outside it: closed-over arrays would be baked into the
  compiled program as constants (88M of them for ViT-B).
* The user functions (``loss_fn`` ...) are *static* arguments of module-level
  jitted functions, so building a second operator from the same function
  object with new params/batches of the same shapes reuses the compilation
  (the per-batch estimator builds one operator per batch). Pass a function
  defined once, not a fresh ``lambda`` per call, to benefit from that; and
  let it close over small things only (the model definition, not weights).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

CURVATURE_KINDS = ("hessian", "ggn")


class CountedMatvec:
  """A matvec ``v -> A v`` that counts its calls (``num_calls``).

  Attributes:
    fn: the underlying matvec.
    num_calls: how many times it has been called (e.g. the number of HVPs,
      each of which costs N batches of forward-over-reverse passes).
    num_batches: N, the number of batches averaged per call.
  """

  def __init__(self, fn: Callable[[PyTree], PyTree], num_batches: int):
    self.fn = fn
    self.num_calls = 0
    self.num_batches = num_batches

  def __call__(self, v: PyTree) -> PyTree:
    self.num_calls += 1
    return self.fn(v)

  def __repr__(self):
    return (f"CountedMatvec(num_calls={self.num_calls}, "
            f"num_batches={self.num_batches})")


def _num_batches(batches: PyTree) -> int:
  leaves = jax.tree.leaves(batches)
  if not leaves:
    raise ValueError("`batches` has no array leaves.")
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(
        "`batches` must be N stacked batches: every leaf needs the same "
        f"leading axis N; got leading sizes {sorted(map(str, sizes))}. "
        "Stack single batches with jax.tree.map(lambda *x: jnp.stack(x), "
        "*batch_list), or add an axis with x[None] for N = 1.")
  return sizes.pop()


def _as_tangent(v: PyTree, params: PyTree) -> PyTree:
  # jvp needs tangents of the primal dtype (e.g. a float32 Lanczos vector
  # against bf16 params).
  return jax.tree.map(lambda t, p: jnp.asarray(t, p.dtype), v, params)


def _accumulator(params: PyTree) -> PyTree:
  return jax.tree.map(
      lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)),
      params)


def _mean_over_batches(per_batch: Callable[[PyTree], PyTree], params: PyTree,
                       batches: PyTree) -> PyTree:
  """Mean of ``per_batch(batch)`` over the leading axis, accumulated >= f32."""
  def body(total, batch):
    return jax.tree.map(lambda t, x: t + x.astype(t.dtype), total,
                        per_batch(batch)), None
  total, _ = jax.lax.scan(body, _accumulator(params), batches)
  n = _num_batches(batches)
  return jax.tree.map(lambda t: t / n, total)


def _bind(fn: Callable, context: PyTree) -> Callable:
  """fn(x, batch) or, with a context, fn(x, batch, context)."""
  if context is None:
    return fn
  return lambda x, batch: fn(x, batch, context)


@functools.partial(jax.jit, static_argnums=0)
def _mean_hvp(loss_fn: LossFn, params: PyTree, batches: PyTree,
              context: PyTree, v: PyTree) -> PyTree:
  tangent = _as_tangent(v, params)
  loss_fn = _bind(loss_fn, context)

  def hvp(batch):
    grad_fn = jax.grad(lambda p: loss_fn(p, batch))
    return jax.jvp(grad_fn, (params,), (tangent,))[1]

  return _mean_over_batches(hvp, params, batches)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _mean_ggn_vp(logits_fn: Callable, output_loss_fn: Callable,
                 params: PyTree, batches: PyTree, context: PyTree,
                 v: PyTree) -> PyTree:
  tangent = _as_tangent(v, params)
  logits_fn = _bind(logits_fn, context)

  def ggn_vp(batch):
    forward = lambda p: logits_fn(p, batch)
    # One forward pass serves both J v (the linearisation) and J^T (its
    # transpose), instead of a jvp plus a separate vjp.
    logits, jvp_fn = jax.linearize(forward, params)
    j_v = jvp_fn(tangent)
    out_grad = jax.grad(lambda z: output_loss_fn(z, batch))
    h_j_v = jax.jvp(out_grad, (logits,), (j_v,))[1]
    (jt_h_j_v,) = jax.linear_transpose(jvp_fn, params)(h_j_v)
    return jt_h_j_v

  return _mean_over_batches(ggn_vp, params, batches)


def hessian_matvec(loss_fn: LossFn, params: PyTree, batches: PyTree, *,
                   context: PyTree = None) -> CountedMatvec:
  """Hessian-vector product of the mean loss over N stacked batches.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, deterministic (eval mode).
      Used as a static jit argument: reuse the same function object across
      calls to reuse the compilation.
    params: the point at which the Hessian is taken (trainable params only).
    batches: pytree whose leaves have a leading axis N (N stacked batches).
    context: optional arrays the loss needs but that are not differentiated
      (a fixed task head, frozen base weights under LoRA); then
      ``loss_fn(params, batch, context)``. Passed as a jit argument, never
      baked into the program.

  Returns:
    A ``CountedMatvec`` ``v -> (1/N) sum_n H_n v`` with ``v`` and the result
    pytrees like ``params`` (result leaves in >= float32).
  """
  n = _num_batches(batches)
  return CountedMatvec(
      functools.partial(_mean_hvp, loss_fn, params, batches, context), n)


def ggn_matvec(logits_fn: Callable[[PyTree, PyTree], PyTree],
               output_loss_fn: Callable[[PyTree, PyTree], jax.Array],
               params: PyTree, batches: PyTree, *,
               context: PyTree = None) -> CountedMatvec:
  """Generalised Gauss-Newton product ``J^T H_out J v``, averaged over batches.

  ``J`` is the Jacobian of ``logits_fn`` w.r.t. ``params`` and ``H_out`` the
  Hessian of ``output_loss_fn`` w.r.t. the logits. The GGN drops the terms of
  the Hessian that involve second derivatives of the network, so it is PSD
  whenever the output loss is convex in the logits (softmax cross-entropy,
  squared error).

  Args:
    logits_fn: ``logits_fn(params, batch) -> logits`` (any pytree of arrays).
    output_loss_fn: ``output_loss_fn(logits, batch) -> scalar``.
    params: the linearisation point.
    batches: pytree whose leaves have a leading axis N.
    context: optional non-differentiated arrays; then
      ``logits_fn(params, batch, context)`` (see `hessian_matvec`).

  Returns:
    A ``CountedMatvec`` computing the mean GGN-vector product.
  """
  n = _num_batches(batches)
  return CountedMatvec(
      functools.partial(_mean_ggn_vp, logits_fn, output_loss_fn, params,
                        batches, context), n)


@functools.lru_cache(maxsize=32)
def _composed_loss(logits_fn: Callable, output_loss_fn: Callable) -> LossFn:
  # Cached so the composed function is the same object on every call, which
  # keeps the jit cache of `_mean_hvp` warm.
  def loss_fn(params, batch, *context):
    return output_loss_fn(logits_fn(params, batch, *context), batch)
  return loss_fn


def curvature_matvec(kind: str, params: PyTree, batches: PyTree, *,
                     loss_fn: LossFn | None = None,
                     logits_fn: Callable | None = None,
                     output_loss_fn: Callable | None = None,
                     context: PyTree = None) -> CountedMatvec:
  """Builds the curvature operator named by ``kind``.

  Args:
    kind: ``'hessian'`` or ``'ggn'``.
    params: the point at which the curvature is taken.
    batches: pytree whose leaves have a leading axis N.
    loss_fn: ``loss_fn(params, batch) -> scalar``; for ``'hessian'``. If
      omitted, ``output_loss_fn(logits_fn(params, batch), batch)`` is used.
    logits_fn: ``logits_fn(params, batch) -> logits``; required for ``'ggn'``.
    output_loss_fn: ``output_loss_fn(logits, batch) -> scalar``; required for
      ``'ggn'``.
    context: optional non-differentiated arrays passed as the last argument
      of ``loss_fn`` / ``logits_fn`` (see `hessian_matvec`).

  Returns:
    A ``CountedMatvec``.

  Raises:
    ValueError: unknown ``kind`` or missing functions for it.
  """
  if kind == "hessian":
    if loss_fn is None:
      if logits_fn is None or output_loss_fn is None:
        raise ValueError(
            "curvature_matvec('hessian', ...) needs `loss_fn`, or both "
            "`logits_fn` and `output_loss_fn` to compose it.")
      loss_fn = _composed_loss(logits_fn, output_loss_fn)
    return hessian_matvec(loss_fn, params, batches, context=context)
  if kind == "ggn":
    if logits_fn is None or output_loss_fn is None:
      raise ValueError(
          "curvature_matvec('ggn', ...) needs both `logits_fn(params, batch)` "
          "and `output_loss_fn(logits, batch)`.")
    return ggn_matvec(logits_fn, output_loss_fn, params, batches,
                      context=context)
  raise ValueError(
      f"Unknown curvature kind {kind!r}; allowed values: {CURVATURE_KINDS}.")
