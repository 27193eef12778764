"""Pure training and evaluation steps (jitted by the task loop).

The classifier is split into a backbone (shared by all tasks) and one head
per task. A step sees the trainable parameters {'backbone', 'head'} of the
current task; during head warm-up only the head is differentiated and
updated. Arrays that a step reads but never updates (frozen LoRA base
weights, a penalty's anchor and Fisher) are jit arguments too, never
constants baked into the program. A step whose loss or gradients are not finite is skipped (the state
is kept as it was) and counted, so one bad batch cannot write NaNs into the
parameters.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from nostalgia_jax import sharding as shd
from nostalgia_jax.optim import projection

LogitsFn = Callable[..., jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a training phase updates.

  Attributes:
    step: steps taken in this phase (drives the learning-rate schedule).
    params: {'backbone': ..., 'head': ...} of the current task.
    opt_state: optimizer state of the trainable part of `params`.
    nonfinite_in_a_row: consecutive skipped (non-finite) steps.
    nonfinite_total: skipped steps in this phase.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite_in_a_row: jax.Array
  nonfinite_total: jax.Array


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Mean softmax cross-entropy with optional label smoothing."""
  targets = optax.smooth_labels(
      jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def _tree_all_finite(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _projection_ratio(grads, opt_state, step, every: int):
  """||g - U U^T g|| / ||g|| on the backbone gradient, if a basis is set.

  The share of the task gradient that the Nostalgia projection lets through
  (1: nothing removed); None when no basis is in the optimizer state. It
  reads the whole basis once more, so it is computed on one step in `every`
  only (NaN on the others).
  """
  states = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, projection.NostalgiaProjectionState))
            if isinstance(s, projection.NostalgiaProjectionState) and s.basis is not None]
  if not states:
    return None

  def ratio():
    kept = projection.project_out(grads, states[0].basis)
    return optax.global_norm(kept["backbone"]) / (
        optax.global_norm(grads["backbone"]) + 1e-30)

  return jax.lax.cond(step % every == 0, ratio,
                      lambda: jnp.full((), jnp.nan, jnp.float32))


def train_step(state: TrainState, batch: dict, rng: jax.Array, frozen: Any,
               continual: Any, *, logits_fn: LogitsFn,
               optimizer: optax.GradientTransformation, label_smoothing: float,
               head_only: bool, penalty_fn=None,
               ratio_every: int = 1) -> tuple[TrainState, dict]:
  """One optimizer step on `batch`; returns the new state and metrics.

  Args:
    state: the phase's state.
    batch: {'image': (B, H, W, C), 'label': (B,)} (global arrays).
    rng: dropout key of the phase (the step number is folded in).
    frozen: frozen base weights for `logits_fn` (LoRA), or None.
    continual: arrays carried across tasks that `penalty_fn` reads.
    logits_fn: `logits_fn(params, images, *, frozen, train, rng)`, e.g.
      `Classifier.logits`.
    optimizer: acts on `state.params` ({'backbone','head'}) or, with
      `head_only`, on `state.params['head']`.
    label_smoothing: label-smoothing factor of the cross-entropy.
    head_only: differentiate and update the head only (warm-up).
    penalty_fn: optional regulariser `penalty_fn(params, continual)` added
      to the loss (L2-SP, EWC).
    ratio_every: compute the `projected_grad_ratio` metric every this many
      steps (NaN in between).
  """

  rng = jax.random.fold_in(rng, state.step)

  def loss_fn(trainable):
    params = ({"backbone": state.params["backbone"], "head": trainable}
              if head_only else trainable)
    logits = logits_fn(params, batch["image"], frozen=frozen, train=True, rng=rng)
    task_loss = cross_entropy(logits, batch["label"], label_smoothing)
    loss = (task_loss if penalty_fn is None
            else task_loss + penalty_fn(params, continual))
    return loss, (task_loss, logits)

  trainable = state.params["head"] if head_only else state.params
  (loss, (task_loss, logits)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(trainable)
  updates, new_opt_state = optimizer.update(grads, state.opt_state, trainable)
  new_trainable = optax.apply_updates(trainable, updates)
  new_params = ({"backbone": state.params["backbone"], "head": new_trainable}
                if head_only else new_trainable)

  finite = jnp.isfinite(loss) & _tree_all_finite(updates)
  keep = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt_state, state.opt_state),
      nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
  metrics = {
      "loss": loss,
      "task_loss": task_loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
      "grad_norm": optax.global_norm(grads),
      "update_norm": optax.global_norm(updates),
  }
  if not head_only:
    ratio = _projection_ratio(grads, state.opt_state, state.step, ratio_every)
    if ratio is not None:
      metrics["projected_grad_ratio"] = ratio
  return new_state, metrics


def eval_step(params, batch: dict, frozen: Any, *, logits_fn: LogitsFn) -> dict:
  """Number of correct predictions and of real (unmasked) examples."""
  logits = logits_fn(params, batch["image"], frozen=frozen, train=False)
  correct = (jnp.argmax(logits, -1) == batch["label"]) * batch["mask"]
  return {"correct": jnp.sum(correct), "count": jnp.sum(batch["mask"])}


def init_train_state(params, optimizer, *, head_only: bool) -> TrainState:
  trainable = params["head"] if head_only else params
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(trainable),
                    nonfinite_in_a_row=jnp.zeros((), jnp.int32),
                    nonfinite_total=jnp.zeros((), jnp.int32))


def jit_train_step(mesh, state_sharding, **kwargs):
  """`train_step` jitted with explicit shardings and a donated state."""
  return jax.jit(
      functools.partial(train_step, **kwargs),
      in_shardings=(state_sharding, shd.batch_sharding(mesh), shd.replicated(mesh),
                    shd.replicated(mesh), shd.replicated(mesh)),
      out_shardings=(state_sharding, shd.replicated(mesh)),
      donate_argnums=(0,))


def jit_eval_step(mesh, params_sharding, *, logits_fn):
  return jax.jit(
      functools.partial(eval_step, logits_fn=logits_fn),
      in_shardings=(params_sharding, shd.batch_sharding(mesh),
                    shd.replicated(mesh)),
      out_shardings=shd.replicated(mesh))

