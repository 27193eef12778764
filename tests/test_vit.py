"""The ViT backbone and task heads: shapes and checkpoint-compatible names."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nostalgia_jax.models import TaskHead, ViT, VIT_SIZES, vit_from_config


def _names(params):
  return {"/".join(k.key for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_param_names_match_big_vision():
  model = ViT(patch_size=4, representation_size=16, **VIT_SIZES["mu"])
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))["params"]
  names = _names(params)
  expected = {
      "embedding/kernel", "embedding/bias", "cls", "pos_embedding",
      "pre_logits/kernel", "pre_logits/bias",
      "Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias",
  }
  for i in range(VIT_SIZES["mu"]["depth"]):
    block = f"Transformer/encoderblock_{i}"
    expected |= {f"{block}/LayerNorm_0/scale", f"{block}/LayerNorm_1/bias",
                 f"{block}/MlpBlock_0/Dense_0/kernel",
                 f"{block}/MlpBlock_0/Dense_1/kernel"}
    for proj in ("query", "key", "value", "out"):
      expected |= {f"{block}/MultiHeadDotProductAttention_0/{proj}/kernel",
                   f"{block}/MultiHeadDotProductAttention_0/{proj}/bias"}
  assert expected <= names
  # Shapes as in the released checkpoints.
  width, heads = VIT_SIZES["mu"]["width"], VIT_SIZES["mu"]["num_heads"]
  attention = params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
  assert attention["query"]["kernel"].shape == (width, heads, width // heads)
  assert attention["out"]["kernel"].shape == (heads, width // heads, width)
  assert params["embedding"]["kernel"].shape == (4, 4, 3, width)
  assert params["pos_embedding"].shape == (1, 16, width)
  assert params["cls"].shape == (1, 1, width)


@pytest.mark.parametrize("pool_type,rep", [("tok", None), ("gap", None), ("tok", 24)])
def test_output_shapes(pool_type, rep):
  model = ViT(patch_size=2, pool_type=pool_type, representation_size=rep,
              **VIT_SIZES["mu"])
  images = jnp.ones((3, 8, 8, 3))
  params = model.init(jax.random.key(0), images)["params"]
  features = model.apply({"params": params}, images)
  assert features.shape == (3, rep or VIT_SIZES["mu"]["width"])
  assert ("cls" in params) == (pool_type == "tok")
  head = TaskHead(num_classes=7)
  head_params = head.init(jax.random.key(1), features)["params"]
  assert head_params["head"]["kernel"].shape == (features.shape[-1], 7)
  logits = head.apply({"params": head_params}, features)
  assert logits.shape == (3, 7)
  np.testing.assert_array_equal(logits, 0.0)  # zero-initialised head


def test_dropout_only_in_training():
  model = ViT(patch_size=2, dropout=0.5, **VIT_SIZES["mu"])
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  params = model.init(jax.random.key(0), images)["params"]
  eval_a = model.apply({"params": params}, images)
  eval_b = model.apply({"params": params}, images)
  np.testing.assert_array_equal(eval_a, eval_b)
  train = model.apply({"params": params}, images, train=True,
                      rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(train, eval_a)


def test_vit_from_config_variants_and_errors():
  config = ml_collections.ConfigDict(dict(
      variant="Ti/16", pool_type="tok", representation_size=0, dropout=0.0,
      dtype="float32"))
  model = vit_from_config(config)
  assert (model.width, model.depth, model.patch_size) == (192, 12, 16)
  assert model.representation_size is None
  config.variant = "XXL/16"
  with pytest.raises(ValueError, match="allowed sizes"):
    vit_from_config(config)
  config.variant = "B/x"
  with pytest.raises(ValueError, match="patch size"):
    vit_from_config(config)
