"""L2-SP and EWC penalties against hand-computed values on tiny trees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nostalgia_jax.optim.penalties import assert_trees_match, ewc_penalty, l2sp_penalty


def _tree(a, b):
  return {"dense": {"kernel": jnp.asarray(a, jnp.float32)}, "bias": jnp.asarray(b, jnp.float32)}


def test_l2sp_matches_hand_computed_value():
  backbone = _tree([[1.0, 2.0]], [3.0])
  anchor = _tree([[0.0, 1.0]], [1.0])  # drift: 1, 1, 2 -> squared norm 6
  head = {"kernel": jnp.asarray([2.0, -1.0])}  # squared norm 5
  value = l2sp_penalty(backbone, anchor, head, alpha=0.5, beta=0.1)
  np.testing.assert_allclose(value, 0.5 / 2 * 6 + 0.1 / 2 * 5, rtol=1e-6)
  # No head term: None and {} contribute nothing.
  np.testing.assert_allclose(l2sp_penalty(backbone, anchor, None, alpha=2.0, beta=7.0), 6.0)
  np.testing.assert_allclose(l2sp_penalty(backbone, anchor, {}, alpha=2.0, beta=7.0), 6.0)


def test_l2sp_is_zero_at_anchor_and_gradient_is_alpha_times_drift():
  anchor = _tree([[0.5, -1.0]], [2.0])
  assert float(l2sp_penalty(anchor, anchor, {}, alpha=3.0, beta=0.0)) == 0.0
  backbone = _tree([[1.5, -1.0]], [0.0])
  grad = jax.grad(lambda b: l2sp_penalty(b, anchor, {}, alpha=3.0, beta=0.0))(backbone)
  np.testing.assert_allclose(grad["dense"]["kernel"], [[3.0, 0.0]])
  np.testing.assert_allclose(grad["bias"], [-6.0])


def test_ewc_matches_hand_computed_value_under_jit():
  params = _tree([[1.0, 2.0]], [3.0])
  anchor = _tree([[0.0, 0.0]], [1.0])  # diffs 1, 2, 2
  fisher = _tree([[2.0, 0.5]], [0.25])  # 2*1 + 0.5*4 + 0.25*4 = 5
  value = jax.jit(lambda p, a, f: ewc_penalty(p, a, f, strength=4.0))(params, anchor, fisher)
  np.testing.assert_allclose(value, 4.0 / 2 * 5, rtol=1e-6)


def test_bfloat16_params_are_accumulated_in_float32():
  params = {"w": jnp.full((1000,), 1.0, jnp.bfloat16)}
  anchor = {"w": jnp.zeros((1000,), jnp.bfloat16)}
  value = l2sp_penalty(params, anchor, {}, alpha=2.0, beta=0.0)
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(value, 1000.0)


def test_missing_leaf_is_named():
  params = _tree([[1.0, 2.0]], [3.0])
  anchor = {"dense": {"kernel": jnp.zeros((1, 2))}}
  with pytest.raises(ValueError, match=r"in backbone but not in anchor: \['bias'\]"):
    l2sp_penalty(params, anchor, {}, alpha=1.0, beta=0.0)


def test_shape_mismatch_is_named():
  params = _tree([[1.0, 2.0]], [3.0])
  fisher = _tree([[1.0, 2.0]], [3.0, 4.0])
  with pytest.raises(ValueError, match=r"\['bias'\] \(1,\) vs \(2,\)"):
    ewc_penalty(params, params, fisher, strength=1.0)


def test_extra_leaf_in_fisher_is_named():
  params = {"a": jnp.zeros(2)}
  fisher = {"a": jnp.zeros(2), "lora": jnp.zeros(3)}
  with pytest.raises(ValueError, match=r"in fisher but not in params: \['lora'\]"):
    ewc_penalty(params, params, fisher, strength=1.0)


def test_matching_trees_pass_and_long_lists_are_truncated():
  assert_trees_match({"a": jnp.zeros(2)}, {"a": np.ones(2)})
  many = {f"w{i}": jnp.zeros(1) for i in range(9)}
  with pytest.raises(ValueError, match=r"and 4 more"):
    assert_trees_match(many, {}, names=("params", "anchor"))
