"""Base optimizers and learning-rate schedules of the training phases.

The trainable parameters of a phase are a dict {'backbone': ..., 'head': ...}
(full training) or the head alone (head warm-up). Backbone and head get
their own learning rate, each with linear warm-up and cosine decay.
Nostalgia's projection wraps the whole update (task heads are not covered by
the basis, so they pass through unchanged).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from nostalgia_jax.optim import projection

OPTIMIZERS = ("sgd", "adam", "adamw")


def warmup_cosine(peak_lr: float, total_steps: int, warmup_steps: int):
  """Linear warm-up from 0 to `peak_lr`, then cosine decay to 0."""
  if total_steps <= 0:
    raise ValueError(f"a training phase needs at least one step, got {total_steps}.")
  warmup_steps = min(warmup_steps, total_steps - 1)
  if warmup_steps == 0:
    return optax.cosine_decay_schedule(peak_lr, total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=0.0)


def _decay_mask(params):
  # Weight decay on matrices only: biases, LayerNorm scales, embeddings'
  # biases and the CLS token are conventionally left alone.
  return jax.tree.map(lambda x: jnp.ndim(x) > 1, params)


def base_optimizer(name: str, learning_rate, *, momentum: float = 0.9,
                   nesterov: bool = False, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
  """`sgd` (optionally Nesterov momentum), `adam` or `adamw`.

  Weight decay is decoupled for `adamw` and added to the gradient (L2) for
  `sgd` and `adam`; it applies to matrices only.
  """
  if name == "sgd":
    sgd = optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov)
    if weight_decay:
      return optax.chain(optax.add_decayed_weights(weight_decay, _decay_mask), sgd)
    return sgd
  if name == "adam":
    adam = optax.adam(learning_rate, b1=b1, b2=b2)
    if weight_decay:
      return optax.chain(optax.add_decayed_weights(weight_decay, _decay_mask), adam)
    return adam
  if name == "adamw":
    return optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay,
                       mask=_decay_mask)
  raise ValueError(f"config.optim.name={name!r}; allowed: {OPTIMIZERS}.")


def _from_config(optim_config, learning_rate, weight_decay):
  return base_optimizer(
      optim_config.name, learning_rate, momentum=optim_config.momentum,
      nesterov=optim_config.nesterov, weight_decay=weight_decay)


def head_warmup_optimizer(optim_config, steps: int) -> optax.GradientTransformation:
  """The head-only optimizer of the warm-up phase (backbone frozen)."""
  schedule = warmup_cosine(optim_config.head_lr, steps, 0)
  return _from_config(optim_config, schedule, optim_config.weight_decay)


def full_optimizer(optim_config, steps: int, *,
                   projection_placement: Optional[str] = None
                   ) -> optax.GradientTransformation:
  """The optimizer of full training: {'backbone': ..., 'head': ...}.

  Args:
    optim_config: `config.optim`.
    steps: number of full-training steps of the task (schedule length).
    projection_placement: None (no projection), or 'before' / 'after' the
      base optimizer: where Nostalgia's projection sits. It is built with
      no basis; the task loop sets the basis into the optimizer state with
      `projection.set_projection_basis`, so the same optimizer (and the same
      compiled step) serves every task.
  """
  warmup = optim_config.warmup_steps
  def per_group(lr):
    return _from_config(optim_config, warmup_cosine(lr, steps, warmup),
                        optim_config.weight_decay)
  optimizer = optax.multi_transform(
      {"backbone": per_group(optim_config.backbone_lr),
       "head": per_group(optim_config.head_lr)},
      {"backbone": "backbone", "head": "head"})
  if projection_placement is None:
    return optimizer
  return projection.with_projection(optimizer, None, placement=projection_placement)


def learning_rates(optim_config, steps: int, step: int) -> dict:
  """The backbone and head learning rates at `step` of full training."""
  warmup = optim_config.warmup_steps
  return {
      "backbone": float(warmup_cosine(optim_config.backbone_lr, steps, warmup)(step)),
      "head": float(warmup_cosine(optim_config.head_lr, steps, warmup)(step)),
  }
