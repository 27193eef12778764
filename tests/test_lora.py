"""Tests of the LoRA adapters: exactness at init, merge, one-layer maths,
frozen base under training, dropout, argument checks and jit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nostalgia_jax.models import lora
from nostalgia_jax.models.vit import VIT_SIZES, ViT

ALPHA, RANK = 32.0, 4
ALL_TARGETS = ("query", "key", "value", "out", "mlp")
QUERY_0 = ("Transformer", "encoderblock_0", "MultiHeadDotProductAttention_0", "query")


@pytest.fixture(scope="module")
def setup():
  backbone = ViT(patch_size=4, **VIT_SIZES["mu"])
  images = jax.random.uniform(jax.random.key(1), (3, 8, 8, 3), minval=-1, maxval=1)
  params = backbone.init(jax.random.key(0), images)["params"]
  return backbone, params, images


def _randomise(adapters, seed):
  """Random nonzero A and B (init has B = 0)."""
  leaves, treedef = jax.tree_util.tree_flatten(adapters)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _apply(backbone, params, adapters, images, **kw):
  kw = {"alpha": ALPHA, "rank": RANK, "dropout": 0.0, "train": False,
        "rng": None, **kw}
  return lora.lora_apply(backbone, params, adapters, images, **kw)


def test_shapes_and_init(setup):
  _, params, _ = setup
  adapters = lora.init_lora(params, targets="query,key,value,out,mlp",
                            rank=RANK, key=jax.random.key(2))
  width, heads, mlp = 32, 2, 64
  block = adapters["Transformer"]["encoderblock_1"]
  attn = block["MultiHeadDotProductAttention_0"]
  for name in ("query", "key", "value"):
    assert attn[name]["lora_a"].shape == (width, RANK)
    assert attn[name]["lora_b"].shape == (RANK, width)  # H * Dh
  assert attn["out"]["lora_a"].shape == (width, RANK)  # H * Dh in
  assert attn["out"]["lora_b"].shape == (RANK, width)
  assert block["MlpBlock_0"]["Dense_0"]["lora_a"].shape == (width, RANK)
  assert block["MlpBlock_0"]["Dense_0"]["lora_b"].shape == (RANK, mlp)
  assert block["MlpBlock_0"]["Dense_1"]["lora_a"].shape == (mlp, RANK)
  # 2 blocks x 6 layers x (A, B).
  assert len(jax.tree_util.tree_leaves(adapters)) == 24
  for lora_a, lora_b in lora.adapter_layers(adapters).values():
    assert np.all(np.asarray(lora_b) == 0) and np.any(np.asarray(lora_a) != 0)
  default = lora.init_lora(params, rank=RANK, key=jax.random.key(2))
  assert lora.count_params(default) == 2 * 3 * (RANK * width * 2)


def test_zero_b_equals_base_exactly(setup):
  backbone, params, images = setup
  adapters = lora.init_lora(params, targets=ALL_TARGETS, rank=RANK,
                            key=jax.random.key(2))
  base = backbone.apply({"params": params}, images)
  np.testing.assert_array_equal(_apply(backbone, params, adapters, images), base)


def test_merge_equals_adapted_and_differs_from_base(setup):
  backbone, params, images = setup
  adapters = _randomise(lora.init_lora(params, targets=ALL_TARGETS, rank=RANK,
                                       key=jax.random.key(2)), seed=3)
  adapted = _apply(backbone, params, adapters, images)
  merged = lora.merge_lora(params, adapters, alpha=ALPHA, rank=RANK)
  merged_out = backbone.apply({"params": merged}, images)
  base = backbone.apply({"params": params}, images)
  np.testing.assert_allclose(merged_out, adapted, atol=1e-5, rtol=1e-5)
  assert np.max(np.abs(adapted - base)) > 1e-2
  # merge_lora returns a new tree; the base kernels are unchanged.
  assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(params)


def _record_query_0(store):
  """Interceptor that records the input and output of block 0's query."""
  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and tuple(context.module.scope.path) == QUERY_0:
      store["x"], store["y"] = np.asarray(args[0]), np.asarray(y)
    return y
  return record


def test_one_query_layer_matches_numpy(setup):
  backbone, params, images = setup
  adapters = _randomise(lora.init_lora(params, targets=("query",), rank=RANK,
                                       key=jax.random.key(2)), seed=4)
  base_io, adapted_io = {}, {}
  with nn.intercept_methods(_record_query_0(base_io)):
    backbone.apply({"params": params}, images)
  with nn.intercept_methods(_record_query_0(adapted_io)):
    _apply(backbone, params, adapters, images)
  # Block 0's query input does not depend on any adapter.
  np.testing.assert_allclose(adapted_io["x"], base_io["x"], atol=1e-6)
  x = base_io["x"]                                  # (B, N, D)
  query = params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["query"]
  kernel, bias = np.asarray(query["kernel"]), np.asarray(query["bias"])  # (D,H,Dh)
  a = np.asarray(adapters["Transformer"]["encoderblock_0"]
                 ["MultiHeadDotProductAttention_0"]["query"]["lora_a"])
  b = np.asarray(adapters["Transformer"]["encoderblock_0"]
                 ["MultiHeadDotProductAttention_0"]["query"]["lora_b"])
  d, h, dh = kernel.shape
  expected_base = np.einsum("bnd,dhk->bnhk", x, kernel) + bias
  expected_delta = ((ALPHA / RANK) * (x.reshape(-1, d) @ a @ b)).reshape(x.shape[:2] + (h, dh))
  np.testing.assert_allclose(base_io["y"], expected_base, atol=1e-5)
  np.testing.assert_allclose(adapted_io["y"] - base_io["y"], expected_delta, atol=1e-5)
  assert np.max(np.abs(expected_delta)) > 1e-2


def test_training_adapters_keeps_base_frozen(setup):
  backbone, params, images = setup
  base_copy = jax.tree_util.tree_map(np.array, params)
  adapters = lora.init_lora(params, targets=ALL_TARGETS, rank=RANK,
                            key=jax.random.key(2))
  target = jax.random.normal(jax.random.key(5), (images.shape[0], 32))

  def loss_fn(adapters, params):
    features = _apply(backbone, params, adapters, images)
    return jnp.mean((features - target) ** 2)

  optimizer = optax.sgd(0.5)
  opt_state = optimizer.init(adapters)
  initial = adapters

  @jax.jit
  def step(adapters, opt_state, params):
    loss, grads = jax.value_and_grad(loss_fn)(adapters, params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(adapters, updates), opt_state, loss, grads

  losses = []
  for i in range(4):
    adapters, opt_state, loss, grads = step(adapters, opt_state, params)
    losses.append(float(loss))
    for path, (grad_a, grad_b) in lora.adapter_layers(grads).items():
      # B = 0 at init makes dL/dA = 0 at the first step only.
      assert np.any(np.asarray(grad_b) != 0), (i, path)
      if i > 0:
        assert np.any(np.asarray(grad_a) != 0), (i, path)
  assert losses[-1] < losses[0]
  jax.tree_util.tree_map(
      lambda x, y: np.testing.assert_array_equal(np.asarray(x), y), params, base_copy)
  for (a0, b0), (a1, b1) in zip(lora.adapter_layers(initial).values(),
                                lora.adapter_layers(adapters).values()):
    assert not np.array_equal(a0, a1) and not np.array_equal(b0, b1)


def test_dropout(setup):
  backbone, params, images = setup
  adapters = _randomise(lora.init_lora(params, rank=RANK, key=jax.random.key(2)), 6)
  rng = jax.random.key(7)
  clean = _apply(backbone, params, adapters, images)
  eval_mode = _apply(backbone, params, adapters, images, dropout=0.5, rng=rng)
  dropped = _apply(backbone, params, adapters, images, dropout=0.5, train=True, rng=rng)
  again = _apply(backbone, params, adapters, images, dropout=0.5, train=True, rng=rng)
  other = _apply(backbone, params, adapters, images, dropout=0.5, train=True,
                 rng=jax.random.key(8))
  np.testing.assert_array_equal(eval_mode, clean)
  assert np.max(np.abs(dropped - clean)) > 1e-3
  np.testing.assert_array_equal(dropped, again)
  assert np.max(np.abs(dropped - other)) > 1e-3
  with pytest.raises(ValueError, match="needs an rng"):
    _apply(backbone, params, adapters, images, dropout=0.5, train=True)


def test_errors(setup):
  backbone, params, images = setup
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"unknown target.*'qkv'.*allowed.*'mlp'"):
    lora.init_lora(params, targets=("query", "qkv"), rank=RANK, key=key)
  with pytest.raises(ValueError, match="empty"):
    lora.init_lora(params, targets="", rank=RANK, key=key)
  with pytest.raises(ValueError, match="positive integer"):
    lora.init_lora(params, rank=0, key=key)
  with pytest.raises(ValueError, match="exceeds min"):
    lora.init_lora(params, rank=33, key=key)
  with pytest.raises(ValueError, match=r"pass variables\['params'\]"):
    lora.init_lora({"params": params}, rank=RANK, key=key)
  with pytest.raises(ValueError, match="select no kernel"):
    lora.init_lora({"head": {"kernel": jnp.zeros((2, 2))}}, rank=1, key=key)
  adapters = lora.init_lora(params, rank=RANK, key=key)
  with pytest.raises(ValueError, match="rank=8 but"):
    lora.lora_apply(backbone, params, adapters, images, alpha=ALPHA, rank=8)
  with pytest.raises(ValueError, match="dropout"):
    _apply(backbone, params, adapters, images, dropout=1.0)
  stray = {"Transformer": {"encoderblock_9": adapters["Transformer"]["encoderblock_0"]}}
  with pytest.raises(ValueError, match="match no Dense layer"):
    _apply(backbone, params, stray, images)
  assert lora.parse_targets(" query, value ,query") == ("query", "value")


def test_jit(setup):
  backbone, params, images = setup
  adapters = _randomise(lora.init_lora(params, targets=ALL_TARGETS, rank=RANK,
                                       key=jax.random.key(2)), seed=9)
  traces = []

  def counted(*args, **kwargs):
    traces.append(1)
    return lora.lora_apply(*args, **kwargs)

  jitted = jax.jit(counted, static_argnums=0,
                   static_argnames=("alpha", "rank", "dropout", "train"))
  kw = dict(alpha=ALPHA, rank=RANK, dropout=0.1, train=True)
  out = jitted(backbone, params, adapters, images, rng=jax.random.key(1), **kw)
  eager = lora.lora_apply(backbone, params, adapters, images, rng=jax.random.key(1), **kw)
  np.testing.assert_allclose(out, eager, atol=1e-5)
  # New adapter values and a new rng reuse the compiled program.
  jitted(backbone, params, _randomise(adapters, 10), images, rng=jax.random.key(2), **kw)
  assert len(traces) == 1
