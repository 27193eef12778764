"""Up-front checks of a config: every bad value is reported before any work
(or any file in the workdir) is done, with the allowed values named."""

from __future__ import annotations

from nostalgia_jax.curvature import CURVATURE_KINDS, MERGE_MODES
from nostalgia_jax.data.pipeline import AUGMENTATIONS
from nostalgia_jax.data.sources import DATASETS
from nostalgia_jax.data.splits import CLASS_ORDERS
from nostalgia_jax.models.vit import POOL_TYPES, VIT_SIZES
from nostalgia_jax.models.lora import ALLOWED_TARGETS
from nostalgia_jax.optim.optimizers import OPTIMIZERS
from nostalgia_jax.train.continual import (ESTIMATORS, FISHER_LABELS, MODES,
                                           PLACEMENTS)

DTYPES = ("float32", "bfloat16")
UNION_PRIORITIES = ("old_first", "eigenvalue")


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
  _check_nostalgia(errors, config)
  _check_baselines(errors, config)
  if errors:
    raise ValueError("invalid config:\n  " + "\n  ".join(errors))


def _check_nostalgia(errors, config):
  cfg = config.nostalgia
  _choice(errors, "nostalgia.curvature", cfg.curvature, CURVATURE_KINDS)
  _choice(errors, "nostalgia.estimator", cfg.estimator, ESTIMATORS)
  _choice(errors, "nostalgia.merge", cfg.merge, MERGE_MODES)
  _choice(errors, "nostalgia.union_priority", cfg.union_priority, UNION_PRIORITIES)
  _choice(errors, "nostalgia.placement", cfg.placement, PLACEMENTS)
  _choice(errors, "nostalgia.basis_dtype", cfg.basis_dtype, DTYPES)
  _positive(errors, "nostalgia.k", cfg.k)
  _positive(errors, "nostalgia.num_batches", cfg.num_batches)
  _positive(errors, "nostalgia.batch_size", cfg.batch_size)
  if cfg.num_iters and cfg.num_iters < cfg.k:
    errors.append(f"config.nostalgia.num_iters={cfg.num_iters} < k={cfg.k}: "
                  "Lanczos needs at least k steps (0 picks the default)")
  if cfg.merge == "union" and cfg.max_rank < cfg.k:
    errors.append(f"config.nostalgia.max_rank={cfg.max_rank} < k={cfg.k}")
  if not 0.0 <= cfg.ema_rate < 1.0:
    errors.append(f"config.nostalgia.ema_rate={cfg.ema_rate}; it must be in "
                  "[0, 1) (0: equal weights over tasks)")
  if not 0.0 < cfg.union_tol < 1.0:
    errors.append(f"config.nostalgia.union_tol={cfg.union_tol}; it must be in (0, 1)")
  if (config.mode == "nostalgia" and config.optim.weight_decay > 0 and
      (cfg.placement == "before" or
       (cfg.placement == "auto" and config.optim.name == "sgd"))):
    errors.append(
        f"config.optim.weight_decay={config.optim.weight_decay} with Nostalgia "
        "projecting the gradients: the decay term would move the weights along "
        "the protected directions. Set optim.weight_decay=0 (the default), or "
        "nostalgia.placement='after' to project the decayed update too")


def _check_baselines(errors, config):
  _positive(errors, "l2sp.alpha", config.l2sp.alpha, 0)
  _positive(errors, "l2sp.beta", config.l2sp.beta, 0)
  _positive(errors, "ewc.strength", config.ewc.strength, 0)
  _positive(errors, "ewc.num_examples", config.ewc.num_examples)
  _positive(errors, "ewc.batch_size", config.ewc.batch_size)
  _choice(errors, "ewc.fisher_labels", config.ewc.fisher_labels, FISHER_LABELS)
  if not 0.0 <= config.ewc.gamma <= 1.0:
    errors.append(f"config.ewc.gamma={config.ewc.gamma}; it must be in [0, 1]")
  _positive(errors, "lora.rank", config.lora.rank)
  _positive(errors, "lora.alpha", config.lora.alpha, 0)
  if not 0.0 <= config.lora.dropout < 1.0:
    errors.append(f"config.lora.dropout={config.lora.dropout}; it must be in [0, 1)")
  targets = [t.strip() for t in str(config.lora.targets).split(",") if t.strip()]
  bad = [t for t in targets if t not in ALLOWED_TARGETS]
  if bad or not targets:
    errors.append(f"config.lora.targets={config.lora.targets!r}; a comma-separated "
                  f"list from {ALLOWED_TARGETS}")
