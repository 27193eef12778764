"""Up-front checks of a config: every bad value is reported before any work
(or any file in the workdir) is done, with the allowed values named."""

from __future__ import annotations

from nostalgia_jax.data.pipeline import AUGMENTATIONS
from nostalgia_jax.data.sources import DATASETS
from nostalgia_jax.data.splits import CLASS_ORDERS
from nostalgia_jax.models.vit import POOL_TYPES, VIT_SIZES
from nostalgia_jax.optim.optimizers import OPTIMIZERS

MODES = ("finetune",)
DTYPES = ("float32", "bfloat16")


def _choice(errors, name, value, allowed):
  if value not in allowed:
    errors.append(f"config.{name}={value!r}; allowed: {tuple(allowed)}")


def _positive(errors, name, value, minimum=1):
  if not isinstance(value, (int, float)) or value < minimum:
    errors.append(f"config.{name}={value!r}; it must be >= {minimum}")


def validate_config(config) -> None:
  """Raises ValueError listing every invalid field of `config`."""
  errors: list[str] = []
  _choice(errors, "mode", config.mode, MODES)
  _choice(errors, "data.name", config.data.name, DATASETS)
  _choice(errors, "data.class_order", config.data.class_order, CLASS_ORDERS)
  _choice(errors, "data.augment", config.data.augment, AUGMENTATIONS)
  _choice(errors, "model.pool_type", config.model.pool_type, POOL_TYPES)
  _choice(errors, "model.dtype", config.model.dtype, DTYPES)
  _choice(errors, "optim.name", config.optim.name, OPTIMIZERS)
  size, _, patch = config.model.variant.partition("/")
  if size not in VIT_SIZES or not patch.isdigit() or int(patch) < 1:
    errors.append(f"config.model.variant={config.model.variant!r}; expected "
                  f"SIZE/PATCH with SIZE in {tuple(VIT_SIZES)}, e.g. 'B/16'")
  _positive(errors, "data.num_tasks", config.data.num_tasks)
  _positive(errors, "train.batch_size", config.train.batch_size)
  _positive(errors, "train.eval_batch_size", config.train.eval_batch_size)
  _positive(errors, "train.steps", config.train.steps)
  _positive(errors, "train.head_warmup_steps", config.train.head_warmup_steps, 0)
  _positive(errors, "train.eval_every", config.train.eval_every)
  _positive(errors, "train.log_every", config.train.log_every)
  _positive(errors, "train.max_nonfinite_steps", config.train.max_nonfinite_steps)
  _positive(errors, "optim.warmup_steps", config.optim.warmup_steps, 0)
  _positive(errors, "optim.weight_decay", config.optim.weight_decay, 0)
  for name in ("backbone_lr", "head_lr"):
    _positive(errors, f"optim.{name}", config.optim[name], 0)
  if not 0.0 <= config.train.label_smoothing < 1.0:
    errors.append(f"config.train.label_smoothing={config.train.label_smoothing}; "
                  "it must be in [0, 1)")
  if not 0.0 <= config.model.dropout < 1.0:
    errors.append(f"config.model.dropout={config.model.dropout}; it must be in [0, 1)")
  if errors:
    raise ValueError("invalid config:\n  " + "\n  ".join(errors))
