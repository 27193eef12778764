"""Shared set-up of the benchmarks: a small ViT trained on one digits task.

Curvature benchmarks are only meaningful on a *trained* network (a spectrum
with a few outliers over a bulk), so `trained_model` trains a ViT for a few
hundred SGD steps on task 0 of the embedded digits (5 tasks of 2 classes)
with the library's own `train_step`, and `curvature_operator` builds the HVP
/ GGN operator exactly as `train/continual.py` does (same loss functions,
the task head and the frozen LoRA weights passed as `context`).

Timing helper `interleaved_medians` runs the compared functions round-robin
(the machine is shared; interleaving spreads the noise evenly) and reports
medians after warm-up.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from nostalgia_jax import curvature
from nostalgia_jax.data import pipeline, sources, splits
from nostalgia_jax.models.classifier import Classifier, LoraSpec
from nostalgia_jax.models.vit import VIT_SIZES, ViT
from nostalgia_jax.train import continual, steps

# The reference trains with label smoothing 0.1; it also keeps the loss (and
# so the Hessian) away from the ~0 of an overfit 2-class task.
LABEL_SMOOTHING = 0.1


@dataclasses.dataclass
class TrainedModel:
  classifier: Classifier
  params: Any          # {'backbone', 'head'}
  frozen: Any          # frozen ViT weights under LoRA, else None
  examples: dict       # task examples {'image': (n,H,W,3), 'label': (n,)}
  final_loss: float
  num_params: int      # trainable backbone parameters


def make_classifier(variant: str, image_size: int,
                    lora: Optional[LoraSpec] = None) -> Classifier:
  size, _, patch = variant.partition("/")
  vit = ViT(patch_size=int(patch), **VIT_SIZES[size])
  return Classifier(backbone=vit, image_shape=(image_size, image_size, 3),
                    lora=lora)


def task_examples(image_size: int = 8, task: int = 0,
                  num_examples: int = 4096) -> dict:
  """Task `task` of digits (5 tasks x 2 classes), upsampled to image_size."""
  data = sources.load_digits(test_fraction=0.25, split_seed=0)
  task_splits = splits.make_task_splits(
      data.train.labels, data.test.labels, num_classes=data.num_classes,
      num_tasks=5, order="fixed", seed=0)
  ex = pipeline.task_examples(data.train, task_splits[task],
                              num_classes_total=data.num_classes,
                              num_examples=num_examples, seed=0)
  factor = image_size // ex["image"].shape[1]
  if factor > 1:  # nearest-neighbour upsampling for bigger patch grids
    ex["image"] = np.repeat(np.repeat(ex["image"], factor, 1), factor, 2)
  return ex


def trained_model(variant: str = "pico/2", image_size: int = 8,
                  steps_: int = 300, batch_size: int = 32,
                  lora: Optional[LoraSpec] = None, seed: int = 0,
                  learning_rate: float = 0.05,
                  head_only: bool = False) -> TrainedModel:
  """Trains backbone + head (SGD momentum 0.9) with `steps.train_step`.

  `head_only=True` trains the head alone (the loop's warm-up), keeping the
  backbone at its initialisation. (A zero-initialised head makes the loss
  independent of the backbone: its Hessian w.r.t. the backbone is 0.)
  """
  classifier = make_classifier(variant, image_size, lora)
  ex = task_examples(image_size)
  keys = jax.random.split(jax.random.key(seed), 4)
  vit = classifier.init_vit(keys[0])
  if lora is None:
    backbone, frozen = vit, None
  else:
    backbone, frozen = classifier.init_adapters(vit, keys[1]), vit
  num_classes = int(ex["label"].max()) + 1
  params = {"backbone": backbone,
            "head": classifier.init_head(num_classes, keys[2])}
  optimizer = optax.sgd(learning_rate, momentum=0.9)
  state = steps.init_train_state(params, optimizer, head_only=head_only)
  step = jax.jit(functools.partial(
      steps.train_step, logits_fn=classifier.logits, optimizer=optimizer,
      label_smoothing=LABEL_SMOOTHING, head_only=head_only))
  rng = np.random.default_rng(seed)
  metrics = {"loss": jnp.nan}
  for _ in range(steps_):
    idx = rng.choice(len(ex["label"]), batch_size, replace=False)
    batch = {"image": jnp.asarray(ex["image"][idx]),
             "label": jnp.asarray(ex["label"][idx])}
    state, metrics = step(state, batch, keys[3], frozen, None)
  return TrainedModel(classifier, state.params, frozen, ex,
                      float(metrics["loss"]),
                      sum(x.size for x in jax.tree.leaves(
                          state.params["backbone"])))


def fixed_batches(examples: dict, num_batches: int, batch_size: int,
                  seed: int = 1) -> dict:
  """N stacked batches {'image': (N,B,H,W,3), 'label': (N,B)} (no repeats)."""
  n = num_batches * batch_size
  if n > len(examples["label"]):
    raise ValueError(f"{num_batches} x {batch_size} examples requested; the "
                     f"task has {len(examples['label'])}.")
  idx = np.random.default_rng(seed).permutation(len(examples["label"]))[:n]
  return {k: jnp.asarray(v[idx].reshape((num_batches, batch_size)
                                        + v.shape[1:]))
          for k, v in examples.items()}


def curvature_operator(model: TrainedModel, batches: dict,
                       kind: str = "hessian") -> curvature.CountedMatvec:
  """The operator exactly as `continual._matvec` builds it."""
  loss_fn, logits_fn, output_loss_fn = continual._curvature_fns(  # pylint: disable=protected-access
      model.classifier, LABEL_SMOOTHING)
  context = {"head": model.params["head"], "frozen": model.frozen}
  return curvature.curvature_matvec(
      kind, model.params["backbone"], batches, loss_fn=loss_fn,
      logits_fn=logits_fn, output_loss_fn=output_loss_fn, context=context)


def backbone_gradient_fn(model: TrainedModel) -> Callable:
  """Jitted gradient of the same task loss w.r.t. the backbone (one batch)."""
  loss_fn, _, _ = continual._curvature_fns(model.classifier, LABEL_SMOOTHING)  # pylint: disable=protected-access
  grad = jax.jit(jax.grad(loss_fn))
  context = {"head": model.params["head"], "frozen": model.frozen}
  return lambda backbone, batch: grad(backbone, batch, context)


def flat_operator(matvec: Callable, like: Any):
  """(dim, flat numpy matvec, unravel) for scipy on the same operator."""
  flat, unravel = ravel_pytree(like)
  def apply(x):
    out = matvec(unravel(jnp.asarray(np.ravel(x), flat.dtype)))
    return np.asarray(ravel_pytree(out)[0], np.float64)
  return flat.size, apply, unravel


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int,
                        warmup: int = 2) -> dict[str, float]:
  """Median seconds per call of each fn, timed round-robin after warm-up."""
  for _ in range(warmup):
    for fn in fns.values():
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def machine() -> str:
  import os, platform  # pylint: disable=g-import-not-at-top,multiple-imports
  return (f"{platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, jax {jax.__version__} "
          f"{jax.devices()[0].platform}")
