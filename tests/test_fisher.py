"""Diagonal Fisher against a direct per-example Python loop; online update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nostalgia_jax.optim.fisher import diagonal_fisher, online_fisher_update, sample_labels

NUM_CLASSES = 5


def _model():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {
      "hidden": {"kernel": jax.random.normal(k1, (4, 6)), "bias": jnp.zeros(6)},
      "out": {"kernel": jax.random.normal(k2, (6, NUM_CLASSES))},
  }
  images = np.asarray(jax.random.normal(k3, (7, 4)))  # 7 = 3 + 3 + a partial chunk of 1
  return params, images


def _logits_fn(params, images):
  hidden = jnp.tanh(images @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return hidden @ params["out"]["kernel"]


def _loop_fisher(params, images, labels):
  """The definition, one example at a time, no vmap, no chunking."""
  def nll(p, x, y):
    return -jax.nn.log_softmax(_logits_fn(p, x[None])[0])[y]

  grad_fn = jax.jit(jax.grad(nll))  # jitted for speed; still one example at a time
  total = jax.tree.map(jnp.zeros_like, params)
  for x, y in zip(images, labels):
    g = grad_fn(params, x, y)
    total = jax.tree.map(lambda t, gi: t + gi**2, total, g)
  return jax.tree.map(lambda t: t / len(images), total)


def _loop_labels(params, images, key):
  keys = jax.random.split(key, len(images))
  return np.array([
      int(jax.random.categorical(keys[i], _logits_fn(params, images[i : i + 1])[0]))
      for i in range(len(images))
  ])


def _assert_trees_close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)


@pytest.mark.parametrize("batch_size", [3, 7, 64])
def test_fisher_with_true_labels_matches_loop(batch_size):
  params, images = _model()
  labels = np.array([0, 1, 2, 3, 4, 0, 1])
  fisher = diagonal_fisher(_logits_fn, params, images, labels=labels, batch_size=batch_size)
  _assert_trees_close(fisher, _loop_fisher(params, images, labels))


def test_sampled_labels_are_reproducible_and_vary():
  params, images = _model()
  key = jax.random.key(42)
  labels = sample_labels(_logits_fn, params, images, key, batch_size=3)
  np.testing.assert_array_equal(labels, _loop_labels(params, images, key))
  assert len(set(labels.tolist())) > 1  # otherwise the comparison below is too weak
  other = sample_labels(_logits_fn, params, images, jax.random.key(7), batch_size=3)
  assert not np.array_equal(labels, other)


@pytest.mark.parametrize("batch_size", [3, 64])
def test_true_fisher_with_sampled_labels_matches_loop(batch_size):
  params, images = _model()
  key = jax.random.key(42)
  fisher = diagonal_fisher(_logits_fn, params, images, key=key, batch_size=batch_size)
  _assert_trees_close(fisher, _loop_fisher(params, images, _loop_labels(params, images, key)))


def test_fisher_is_per_example_not_squared_batch_gradient():
  params, images = _model()
  labels = np.zeros(7, int)
  fisher = diagonal_fisher(_logits_fn, params, images, labels=labels, batch_size=7)
  batch_grad = jax.grad(
      lambda p: -jnp.mean(jax.nn.log_softmax(_logits_fn(p, images))[:, 0])
  )(params)
  assert not np.allclose(fisher["out"]["kernel"], batch_grad["out"]["kernel"] ** 2)
  assert all(bool(jnp.all(f >= 0)) for f in jax.tree.leaves(fisher))


def test_one_compilation_even_with_a_partial_last_chunk():
  params, images = _model()
  traces = []

  def counting_logits_fn(p, x):
    traces.append(x.shape)
    return _logits_fn(p, x)

  diagonal_fisher(counting_logits_fn, params, images, key=jax.random.key(0), batch_size=3)
  assert len(traces) == 1 and traces[0] == (1, 4)  # vmapped over single examples


def test_fisher_argument_errors():
  params, images = _model()
  with pytest.raises(ValueError, match="pass key="):
    diagonal_fisher(_logits_fn, params, images)
  with pytest.raises(ValueError, match="labels has 2 entries"):
    diagonal_fisher(_logits_fn, params, images, labels=np.zeros(2, int))
  with pytest.raises(ValueError, match="batch_size"):
    diagonal_fisher(_logits_fn, params, images, labels=np.zeros(7, int), batch_size=0)


def test_online_update():
  old = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(4.0)}
  new = {"a": jnp.array([0.5, 0.0]), "b": jnp.array(1.0)}
  merged = online_fisher_update(old, new, gamma=0.5)
  np.testing.assert_allclose(merged["a"], [1.0, 1.0])
  np.testing.assert_allclose(merged["b"], 3.0)
  assert online_fisher_update(None, new, gamma=0.9) is new
  with pytest.raises(ValueError, match="gamma"):
    online_fisher_update(old, new, gamma=1.5)
  with pytest.raises(ValueError, match="in fisher_new but not in fisher_old"):
    online_fisher_update({"a": old["a"]}, new, gamma=1.0)
