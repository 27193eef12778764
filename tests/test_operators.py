"""Curvature operators against dense references on a tiny MLP.

References: jax.hessian / jax.jacobian of the loss on ONE flat parameter
vector (test-only flattening), numpy eigh, and finite differences.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from nostalgia_jax.curvature import lanczos
from nostalgia_jax.curvature import operators

NUM_BATCHES, BATCH, IN, HIDDEN, CLASSES = 3, 8, 4, 5, 3


def _params():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {
      "dense1": {"kernel": jax.random.normal(k1, (IN, HIDDEN)),
                 "bias": 0.1 * jax.random.normal(k3, (HIDDEN,))},
      "dense2": {"kernel": jax.random.normal(k2, (HIDDEN, CLASSES)),
                 "bias": jnp.zeros((CLASSES,))},
  }


def _batches():
  kx, ky = jax.random.split(jax.random.key(1))
  return {"x": jax.random.normal(kx, (NUM_BATCHES, BATCH, IN)),
          "y": jax.random.randint(ky, (NUM_BATCHES, BATCH), 0, CLASSES)}


def logits_fn(params, batch):
  hidden = jnp.tanh(batch["x"] @ params["dense1"]["kernel"]
                    + params["dense1"]["bias"])
  return hidden @ params["dense2"]["kernel"] + params["dense2"]["bias"]


def output_loss_fn(logits, batch):
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_probs, batch["y"][:, None], 1))


def loss_fn(params, batch):
  return output_loss_fn(logits_fn(params, batch), batch)


def _batch(batches, n):
  return jax.tree.map(lambda x: x[n], batches)


@functools.lru_cache(maxsize=None)
def _dense_hessian():
  params, batches = _params(), _batches()
  flat, unravel = ravel_pytree(params)

  def mean_loss(f):
    losses = jax.vmap(lambda b: loss_fn(unravel(f), b))(batches)
    return jnp.mean(losses)

  return np.asarray(jax.jit(jax.hessian(mean_loss))(flat), np.float64)


def _dense_ggn():
  params, batches = _params(), _batches()
  flat, unravel = ravel_pytree(params)

  @jax.jit
  def per_batch(batch):
    jac = jax.jacobian(lambda f: logits_fn(unravel(f), batch).ravel())(flat)
    out_hess = jax.hessian(
        lambda z: output_loss_fn(z.reshape(BATCH, CLASSES), batch))(
            logits_fn(params, batch).ravel())
    return jac, out_hess

  total = 0.0
  for n in range(NUM_BATCHES):
    jac, out_hess = map(lambda x: np.asarray(x, np.float64),
                        per_batch(_batch(batches, n)))
    total = total + jac.T @ out_hess @ jac
  return total / NUM_BATCHES


def _flat(tree):
  return np.asarray(ravel_pytree(tree)[0], np.float64)


def _random_vector(params, seed):
  flat, unravel = ravel_pytree(params)
  return unravel(jax.random.normal(jax.random.key(seed), flat.shape))


def test_hvp_matches_dense_hessian_and_finite_differences():
  params, batches = _params(), _batches()
  matvec = operators.hessian_matvec(loss_fn, params, batches)
  v = _random_vector(params, 2)
  hv = _flat(matvec(v))
  np.testing.assert_allclose(hv, _dense_hessian() @ _flat(v),
                             rtol=1e-4, atol=1e-5 * np.abs(hv).max())
  # Central differences of the mean gradient (float32: eps trades
  # truncation O(eps^2) against rounding O(1e-7 / eps)).
  mean_grad = jax.jit(lambda p: jax.tree.map(
      lambda *g: sum(g) / NUM_BATCHES,
      *[jax.grad(loss_fn)(p, _batch(batches, n)) for n in range(NUM_BATCHES)]))
  eps = 1e-2
  shifted = lambda s: _flat(mean_grad(jax.tree.map(
      lambda p, t: p + s * eps * t, params, v)))
  finite_diff = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
  assert np.linalg.norm(hv - finite_diff) < 2e-3 * np.linalg.norm(hv)
  assert matvec.num_calls == 1


def test_top_eigenpairs_of_mlp_hessian_match_dense_eigh():
  params, batches = _params(), _batches()
  matvec = operators.hessian_matvec(loss_fn, params, batches)
  k = 4
  dim = ravel_pytree(params)[0].size
  # The top of this spectrum is flat (0.57, 0.45, 0.42, 0.40, ...), too
  # flat for the default m = 12 to converge to 1e-4: run to m = dim.
  values, vectors = lanczos.top_eigenpairs(matvec, params, k, num_iters=dim,
                                           key=jax.random.key(3))
  ref_values, ref_vectors = np.linalg.eigh(_dense_hessian())
  ref_values, ref_vectors = ref_values[::-1][:k], ref_vectors[:, ::-1][:, :k]
  np.testing.assert_allclose(values, ref_values, rtol=1e-4,
                             atol=1e-5 * abs(ref_values[0]))
  ours = np.stack([_flat(jax.tree.map(lambda x: x[i], vectors))
                   for i in range(k)], axis=1)
  np.testing.assert_allclose(ours.T @ ours, np.eye(k), atol=1e-5)
  # Each vector matches the reference up to sign (the top 4 are simple).
  overlaps = np.abs(np.sum(ours * ref_vectors, axis=0))
  np.testing.assert_allclose(overlaps, 1.0, atol=1e-3)
  assert matvec.num_calls == dim


def test_ggn_matches_dense_and_is_psd():
  params, batches = _params(), _batches()
  matvec = operators.ggn_matvec(logits_fn, output_loss_fn, params, batches)
  dense = _dense_ggn()
  v = _random_vector(params, 4)
  gv = _flat(matvec(v))
  np.testing.assert_allclose(gv, dense @ _flat(v), rtol=1e-4,
                             atol=1e-5 * np.abs(gv).max())
  # PSD: the matrix our matvec applies (column by column) has no negative
  # eigenvalue beyond float32 rounding, while the true Hessian here does.
  flat, unravel = ravel_pytree(params)
  columns = jax.vmap(lambda e: ravel_pytree(matvec.fn(unravel(e)))[0])(
      jnp.eye(flat.size))
  ggn_spectrum = np.linalg.eigvalsh(np.asarray(columns, np.float64))
  assert ggn_spectrum.min() > -1e-5 * ggn_spectrum.max()
  assert np.linalg.eigvalsh(_dense_hessian()).min() < 0


def test_dispatcher():
  params, batches = _params(), _batches()
  v = _random_vector(params, 5)
  reference = _flat(operators.hessian_matvec(loss_fn, params, batches)(v))
  by_loss = operators.curvature_matvec("hessian", params, batches,
                                       loss_fn=loss_fn)
  composed = operators.curvature_matvec("hessian", params, batches,
                                        logits_fn=logits_fn,
                                        output_loss_fn=output_loss_fn)
  np.testing.assert_allclose(_flat(by_loss(v)), reference, rtol=1e-6)
  np.testing.assert_allclose(_flat(composed(v)), reference, rtol=1e-5,
                             atol=1e-7)
  ggn = operators.curvature_matvec("ggn", params, batches,
                                   logits_fn=logits_fn,
                                   output_loss_fn=output_loss_fn)
  assert isinstance(ggn, operators.CountedMatvec)
  with pytest.raises(ValueError, match=r"'hessian', 'ggn'"):
    operators.curvature_matvec("fisher", params, batches, loss_fn=loss_fn)
  with pytest.raises(ValueError, match="logits_fn"):
    operators.curvature_matvec("ggn", params, batches, loss_fn=loss_fn)


def test_new_operator_with_same_loss_fn_does_not_retrace():
  traces = []

  def counted_loss(params, batch):
    traces.append(1)
    return loss_fn(params, batch)

  params, batches = _params(), _batches()
  v = _random_vector(params, 6)
  operators.hessian_matvec(counted_loss, params, batches)(v)
  num_traces = len(traces)
  moved = jax.tree.map(lambda p: p + 0.1, params)
  other = jax.tree.map(lambda x: x[::-1], batches)
  operators.hessian_matvec(counted_loss, moved, other)(v)
  assert len(traces) == num_traces


def test_batches_need_a_common_leading_axis():
  bad = {"x": jnp.zeros((3, BATCH, IN)), "y": jnp.zeros((2, BATCH), int)}
  with pytest.raises(ValueError, match="leading axis N"):
    operators.hessian_matvec(loss_fn, _params(), bad)
