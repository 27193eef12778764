"""The pure train/eval steps: freezing, non-finite skipping, no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nostalgia_jax import sharding as shd
from nostalgia_jax.models import Classifier, ViT, VIT_SIZES
from nostalgia_jax.optim import projection
from nostalgia_jax.train import steps


def _setup(num_classes=3):
  classifier = Classifier(ViT(patch_size=4, **VIT_SIZES["mu"]), (8, 8, 3))
  images = jax.random.normal(jax.random.key(0), (8, 8, 8, 3))
  b = classifier.init_vit(jax.random.key(1))
  h = classifier.init_head(num_classes, jax.random.key(2))
  batch = {"image": images, "label": jnp.arange(8) % num_classes}
  return classifier.logits, {"backbone": b, "head": h}, batch


def _run(params, batch, logits_fn, optimizer, head_only, n=3):
  state = steps.init_train_state(params, optimizer, head_only=head_only)
  mesh = shd.make_mesh()
  state = jax.device_put(state, shd.state_shardings(mesh, state))  # as the loop
  fn = steps.jit_train_step(mesh, shd.state_shardings(mesh, state),
                            logits_fn=logits_fn, optimizer=optimizer,
                            label_smoothing=0.1, head_only=head_only)
  for _ in range(n):
    state, metrics = fn(state, batch, jax.random.key(0), None, {})
  return state, metrics, fn


def test_head_only_step_leaves_backbone_bit_identical():
  logits_fn, params, batch = _setup()
  backbone_before = jax.tree.map(np.array, params["backbone"])
  head_before = jax.tree.map(np.array, params["head"])
  state, metrics, _ = _run(params, batch, logits_fn, optax.sgd(0.1), head_only=True)
  jax.tree.map(np.testing.assert_array_equal, state.params["backbone"], backbone_before)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         state.params["head"], head_before)
  assert all(jax.tree.leaves(changed))
  assert np.isfinite(metrics["loss"])


def test_full_step_reduces_loss_and_compiles_once():
  logits_fn, params, batch = _setup()
  state, first, fn = _run(params, batch, logits_fn, optax.adam(1e-3),
                          head_only=False, n=1)
  for _ in range(20):
    state, metrics = fn(state, batch, jax.random.key(0), None, {})
  assert metrics["loss"] < first["loss"]
  assert fn._cache_size() == 1                          # one trace, many steps
  assert int(state.step) == 21


def test_nonfinite_step_is_skipped_and_counted():
  logits_fn, params, batch = _setup()
  bad = {**batch, "image": batch["image"].at[0, 0, 0, 0].set(jnp.nan)}
  optimizer = optax.sgd(0.1, momentum=0.9)
  state = steps.init_train_state(params, optimizer, head_only=False)
  before = jax.tree.map(np.array, state.params)
  step = jax.jit(lambda s, b: steps.train_step(
      s, b, jax.random.key(0), None, {}, logits_fn=logits_fn, optimizer=optimizer,
      label_smoothing=0.0, head_only=False))
  for expected in (1, 2):
    state, metrics = step(state, bad)
    assert not np.isfinite(metrics["loss"])
    assert int(state.nonfinite_in_a_row) == expected
  jax.tree.map(np.testing.assert_array_equal, state.params, before)
  state, _ = step(state, batch)                         # a good step resets
  assert int(state.nonfinite_in_a_row) == 0 and int(state.nonfinite_total) == 2
  assert not np.array_equal(state.params["head"]["head"]["kernel"],
                            before["head"]["head"]["kernel"])


def test_eval_step_counts_only_unmasked_examples():
  logits_fn, params, batch = _setup()
  mask = jnp.array([1, 1, 1, 0, 0, 1, 0, 1], jnp.float32)
  out = steps.eval_step(params, {**batch, "mask": mask}, None, logits_fn=logits_fn)
  assert float(out["count"]) == 5.0
  logits = logits_fn(params, batch["image"])
  expected = np.sum((np.argmax(logits, -1) == batch["label"]) * mask)
  assert float(out["correct"]) == expected


def test_projected_grad_ratio_matches_a_dense_projection():
  logits_fn, params, batch = _setup()
  # A zero head (its initialisation) gives the backbone a zero gradient.
  head = params["head"]["head"]
  params["head"] = {"head": {**head, "kernel": jax.random.normal(
      jax.random.key(5), head["kernel"].shape)}}
  optimizer = projection.with_projection(optax.sgd(0.1), None)
  state = steps.init_train_state(params, optimizer, head_only=False)
  leaves, treedef = jax.tree.flatten(params["backbone"])
  sizes = [x.size for x in leaves]
  rng = np.random.default_rng(0)
  dense, _ = np.linalg.qr(rng.normal(size=(sum(sizes), 3)))   # orthonormal U
  splits = np.split(dense.T, np.cumsum(sizes)[:-1], axis=1)
  basis = treedef.unflatten([s.reshape((3,) + x.shape).astype(np.float32)
                             for s, x in zip(splits, leaves)])
  state = state.replace(opt_state=projection.set_projection_basis(
      state.opt_state, {"backbone": basis, "head": None}, params=params))
  step = jax.jit(lambda s, b: steps.train_step(
      s, b, jax.random.key(0), None, {}, logits_fn=logits_fn,
      optimizer=optimizer, label_smoothing=0.0, head_only=False, ratio_every=2))
  grads = jax.grad(lambda p: steps.cross_entropy(
      logits_fn(p, batch["image"], train=True,
                rng=jax.random.fold_in(jax.random.key(0), 0)),
      batch["label"]))(params)["backbone"]
  g = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads)])
  expected = np.linalg.norm(g - dense @ (dense.T @ g)) / np.linalg.norm(g)
  state, metrics = step(state, batch)
  np.testing.assert_allclose(metrics["projected_grad_ratio"], expected, rtol=1e-4)
  _, metrics = step(state, batch)
  assert np.isnan(metrics["projected_grad_ratio"])      # not computed: step 1
