"""What each continual-learning mode carries from one task to the next.

The carried state (`continual`, a dict of arrays saved in every checkpoint):

  finetune   {}
  l2sp       {'anchor': trainable backbone at the start of the sequence}
  ewc        {'anchor': trainable backbone after the last task,
              'fisher': online diagonal Fisher}              (from task 1 on)
  nostalgia  {'basis': curvature basis U (backbone-like, leading axis r),
              'eigenvalues': (r,)}                            (from task 1 on)

`penalty_fn` turns it into a loss term (L2-SP, EWC); `install_basis` puts
Nostalgia's basis into the optimizer state; `after_task` computes the new
state from the task just trained. Everything acts on the trainable backbone
(`params['backbone']`: the ViT weights, or the LoRA adapters).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from nostalgia_jax import curvature
from nostalgia_jax.curvature import tree_math
from nostalgia_jax.optim import fisher as fisher_lib
from nostalgia_jax.optim import penalties, projection
from nostalgia_jax.train.steps import cross_entropy

MODES = ("finetune", "nostalgia", "l2sp", "ewc")
ESTIMATORS = ("mean_hessian", "per_batch")
PLACEMENTS = ("auto", "before", "after")
FISHER_LABELS = ("sampled", "true")


def _copy(tree):
  # The train step donates its state: carried arrays must never alias the
  # parameters or the optimizer state, or donation would delete them.
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def initial_state(config, backbone) -> dict:
  """The carried state before the first task."""
  if config.mode == "l2sp":
    return {"anchor": _copy(backbone)}
  return {}


def penalty_fn(config) -> Optional[Callable[[Any, dict], jax.Array]]:
  """`penalty(params, continual)` added to the training loss, or None."""
  if config.mode == "l2sp":
    alpha, beta = config.l2sp.alpha, config.l2sp.beta

    def l2sp(params, continual):
      return penalties.l2sp_penalty(params["backbone"], continual["anchor"],
                                    params["head"], alpha=alpha, beta=beta)
    return l2sp
  if config.mode == "ewc":
    strength = config.ewc.strength

    def ewc(params, continual):
      if "fisher" not in continual:   # first task: nothing to protect yet
        return jnp.zeros((), jnp.float32)
      return penalties.ewc_penalty(params["backbone"], continual["anchor"],
                                   continual["fisher"], strength=strength)
    return ewc
  return None


def projection_placement(config) -> Optional[str]:
  """Where the projection sits ('before'/'after' the base optimizer), or None.

  'auto' projects the gradients for SGD (momentum is then a sum of projected
  gradients: updates stay in the null space) and the final updates for Adam
  and AdamW (whose per-coordinate scaling would leave it).
  """
  if config.mode != "nostalgia":
    return None
  placement = config.nostalgia.placement
  if placement == "auto":
    return "before" if config.optim.name == "sgd" else "after"
  return placement


def install_basis(config, opt_state, continual: dict, params):
  """Opt state with the carried basis set in its projection (if any)."""
  if "basis" not in continual:
    return opt_state
  # A copy: the optimizer state is donated to the train step. (One extra
  # basis in memory during training; fine up to LoRA-space or small-k
  # full-backbone bases.)
  return projection.set_projection_basis(
      opt_state, {"backbone": _copy(continual["basis"]), "head": None},
      eigenvalues=continual["eigenvalues"], soft=config.nostalgia.soft,
      basis_dtype=jnp.dtype(config.nostalgia.basis_dtype), params=params)


# -- After a task -------------------------------------------------------------

def _task_loss(classifier, label_smoothing, backbone, batch, context):
  logits = classifier.logits({"backbone": backbone, "head": context["head"]},
                             batch["image"], frozen=context["frozen"])
  return cross_entropy(logits, batch["label"], label_smoothing)


def _task_logits(classifier, backbone, batch, context):
  return classifier.logits({"backbone": backbone, "head": context["head"]},
                           batch["image"], frozen=context["frozen"])


def _output_loss(label_smoothing, logits, batch):
  return cross_entropy(logits, batch["label"], label_smoothing)


@functools.lru_cache(maxsize=8)
def _curvature_fns(classifier, label_smoothing: float):
  # One function object per (model, loss): the curvature operators take them
  # as static jit arguments, so every task reuses one compilation.
  return (functools.partial(_task_loss, classifier, label_smoothing),
          functools.partial(_task_logits, classifier),
          functools.partial(_output_loss, label_smoothing))


def _matvec(config, classifier, backbone, batches, context):
  loss_fn, logits_fn, output_loss_fn = _curvature_fns(
      classifier, float(config.train.label_smoothing))
  return curvature.curvature_matvec(
      config.nostalgia.curvature, backbone, batches, loss_fn=loss_fn,
      logits_fn=logits_fn, output_loss_fn=output_loss_fn, context=context)


def task_curvature(config, classifier, params, frozen, batches, key):
  """Top-k eigenpairs of the task-loss curvature w.r.t. the backbone.

  Args:
    config: the run config (`config.nostalgia`).
    classifier: the `Classifier`.
    params: {'backbone', 'head'} after the task (the head is held fixed).
    frozen: frozen base weights (LoRA) or None.
    batches: N stacked un-augmented batches {'image', 'label'} (N, B, ...).
    key: PRNG key of the Lanczos start vectors.

  Returns:
    (CurvatureBasis of rank k, record dict with timings and counts).
  """
  cfg = config.nostalgia
  context = {"head": params["head"], "frozen": frozen}
  backbone = params["backbone"]
  num_iters = cfg.num_iters or None
  start = time.perf_counter()
  if cfg.estimator == "mean_hessian":
    matvec = _matvec(config, classifier, backbone, batches, context)
    result = curvature.lanczos_eigenpairs(matvec, backbone, cfg.k,
                                          num_iters=num_iters, key=key)
    batch_hvps = result.num_matvecs * matvec.num_batches
  else:  # 'per_batch': the reference's estimator, one Lanczos per batch.
    make = lambda batch: _matvec(config, classifier, backbone,
                                 jax.tree.map(lambda x: x[None], batch), context)
    result = curvature.per_batch_eigenpairs(make, batches, backbone, cfg.k,
                                            num_iters=num_iters, key=key)
    batch_hvps = result.num_matvecs
  jax.block_until_ready(result.eigenvectors)
  eigenvalues = np.asarray(result.eigenvalues, np.float64)
  record = {
      "eigenvalues": [float(x) for x in eigenvalues],
      "lanczos_iterations": int(result.num_iters),
      "matvecs": int(result.num_matvecs),
      "batch_hvps": int(batch_hvps),
      "breakdown": bool(result.breakdown),
      "max_residual": float(np.nanmax(np.asarray(result.residual_norms)))
                      if np.isfinite(np.asarray(result.residual_norms)).any() else None,
      "seconds": time.perf_counter() - start,
  }
  basis = curvature.CurvatureBasis(jnp.asarray(result.eigenvalues, jnp.float32),
                                   result.eigenvectors)
  return basis, record


def merge_into(config, continual: dict, new: curvature.CurvatureBasis,
               task: int) -> curvature.CurvatureBasis:
  """The carried basis merged with the new task's eigenpairs."""
  cfg = config.nostalgia
  old = (curvature.CurvatureBasis(continual["eigenvalues"], continual["basis"])
         if "basis" in continual else None)
  if cfg.merge == "average":
    weight_new = cfg.ema_rate if cfg.ema_rate > 0 else 1.0 / (task + 1)
    return curvature.merge_average(old, new, rank=cfg.k, weight_new=weight_new)
  return curvature.merge_union(old, new, max_rank=cfg.max_rank,
                               tol=cfg.union_tol, priority=cfg.union_priority)


def after_task(config, *, task: int, classifier, params, frozen,
               continual: dict, examples: Optional[dict], key) -> tuple[dict, dict]:
  """The carried state after `task`, and records of what was computed.

  The records ({'curvature': {...}} for Nostalgia, {'fisher': {...}} for EWC,
  else {}) go into the task's entry of results.json.

  Args:
    examples: the task's fixed un-augmented examples (see
      `data.pipeline.task_examples`) for modes that need data, else None.
  """
  if config.mode == "nostalgia":
    cfg = config.nostalgia
    num_batches = min(cfg.num_batches, len(examples["label"]) // cfg.batch_size)
    if num_batches < cfg.num_batches:
      logging.warning("Task %d has %d training examples: the curvature uses %d "
                      "batches of %d instead of %d.", task, len(examples["label"]),
                      num_batches, cfg.batch_size, cfg.num_batches)
    n = num_batches * cfg.batch_size
    batches = jax.tree.map(
        lambda x: jnp.asarray(x[:n]).reshape((num_batches, cfg.batch_size)
                                             + x.shape[1:]), examples)
    new, record = task_curvature(config, classifier, params, frozen, batches, key)
    merged = merge_into(config, continual, new, task)
    record["basis_rank"] = int(merged.rank)
    record["basis_eigenvalues"] = [float(x) for x in np.asarray(merged.eigenvalues)]
    logging.info("Task %d curvature: top eigenvalues %s; %d HVP batches in "
                 "%.1fs; basis rank %d.", task,
                 np.round(record["eigenvalues"][:5], 4), record["batch_hvps"],
                 record["seconds"], record["basis_rank"])
    return ({"basis": merged.vectors, "eigenvalues": merged.eigenvalues},
            {"curvature": record})
  if config.mode == "ewc":
    cfg = config.ewc
    start = time.perf_counter()
    fisher_logits = functools.partial(_task_logits, classifier)
    new = fisher_lib.diagonal_fisher(
        lambda backbone, images, context: fisher_logits(
            backbone, {"image": images}, context),
        params["backbone"], examples["image"], key=key,
        labels=None if cfg.fisher_labels == "sampled" else examples["label"],
        batch_size=cfg.batch_size, context={"head": params["head"], "frozen": frozen})
    fisher = fisher_lib.online_fisher_update(continual.get("fisher"), new,
                                             gamma=cfg.gamma)
    total = sum(float(jnp.sum(x)) for x in jax.tree.leaves(fisher))
    largest = max(float(jnp.max(x)) for x in jax.tree.leaves(fisher))
    stiffness = config.optim.backbone_lr * cfg.strength * largest
    if config.optim.name == "sgd" and stiffness >= 2.0:
      # Gradient descent on strength/2 F w^2 oscillates and grows when
      # lr * strength * F > 2: the next task would likely diverge.
      logging.warning(
          "EWC after task %d: backbone_lr * strength * max(Fisher) = %.2f >= 2; "
          "SGD on the penalty is unstable and training will likely diverge. "
          "Lower config.ewc.strength (or backbone_lr), or use gamma < 1.",
          task, stiffness)
    record = {"fisher_examples": int(len(examples["image"])),
              "fisher_mean": total / max(tree_math.tree_size(fisher), 1),
              "fisher_max": largest, "sgd_stiffness": stiffness,
              "seconds": time.perf_counter() - start}
    return {"anchor": _copy(params["backbone"]), "fisher": fisher}, {"fisher": record}
  return continual, {}


def examples_needed(config) -> int:
  """How many fixed training examples `after_task` needs (0: none)."""
  if config.mode == "nostalgia":
    return config.nostalgia.num_batches * config.nostalgia.batch_size
  if config.mode == "ewc":
    return config.ewc.num_examples
  return 0
