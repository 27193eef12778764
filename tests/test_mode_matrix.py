"""Every mode runs with every base optimizer, with and without LoRA."""

import itertools

import pytest

from configs import default as default_config
from nostalgia_jax.train import loop
from nostalgia_jax.train.validation import validate_config

MODES = ("finetune", "nostalgia", "l2sp", "ewc")
OPTIMIZERS = ("sgd", "adam", "adamw")


def _config(mode, optimizer, lora):
  config = default_config.get_config("tiny")
  config.mode, config.optim.name, config.lora.enabled = mode, optimizer, lora
  config.lora.rank, config.nostalgia.k, config.nostalgia.num_batches = 2, 4, 1
  config.ewc.num_examples = 32
  config.train.steps, config.train.head_warmup_steps = 3, 1
  config.optim.warmup_steps = 1
  if optimizer != "sgd":
    config.optim.backbone_lr = config.optim.head_lr = 1e-3
  return config


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,optimizer",
    list(itertools.product(MODES, OPTIMIZERS)))
def test_every_mode_with_every_optimizer(tmp_path, mode, optimizer):
  # LoRA alternates so that each mode runs both with and without it.
  lora = (MODES.index(mode) + OPTIMIZERS.index(optimizer)) % 2 == 1
  results = loop.train_and_evaluate(_config(mode, optimizer, lora), str(tmp_path))
  assert results["complete"]
  assert all(0.0 <= a <= 1.0 for a in results["accuracy_matrix"][-1])
  if mode == "nostalgia":
    assert results["tasks"][0]["curvature"]["basis_rank"] == 4


def test_weight_decay_with_projected_gradients_is_refused():
  config = _config("nostalgia", "sgd", False)
  config.optim.weight_decay = 1e-4
  with pytest.raises(ValueError, match="weight_decay"):
    validate_config(config)
  config.nostalgia.placement = "after"                   # projected decay: fine
  validate_config(config)


def test_k_not_below_the_parameter_count_is_refused(tmp_path):
  config = _config("nostalgia", "sgd", True)
  config.lora.rank, config.lora.targets = 1, "query"
  config.nostalgia.k = 10_000
  with pytest.raises(ValueError, match="number of trainable backbone parameters"):
    loop.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
