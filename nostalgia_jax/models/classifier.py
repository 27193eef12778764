"""The continual classifier: a ViT backbone (optionally LoRA-adapted) + heads.

Parameters are split by role, which is what the training code needs:

  params = {'backbone': trainable backbone, 'head': head of the current task}
  frozen = the base ViT weights when LoRA is on (never updated), else None

With LoRA off the trainable backbone *is* the ViT's parameter tree; with
LoRA on it is the adapter tree and the ViT weights travel as `frozen`. Either
way curvature, projection and penalties act on `params['backbone']` only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

from nostalgia_jax.models import lora as lora_lib
from nostalgia_jax.models.vit import TaskHead, ViT, vit_from_config


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Static LoRA settings (see `models/lora.py`)."""
  targets: tuple[str, ...]
  rank: int
  alpha: float
  dropout: float


def apply_head(head_params, features):
  """A task head (`TaskHead` parameters) applied to features; any width."""
  dense = head_params["head"]
  return features @ dense["kernel"] + dense["bias"]


@dataclasses.dataclass(frozen=True)
class Classifier:
  """Backbone module, LoRA settings and how to call them.

  Attributes:
    backbone: the ViT module.
    image_shape: (H, W, C) of the inputs.
    lora: LoRA settings, or None for full-backbone training.
  """
  backbone: ViT
  image_shape: tuple[int, int, int]
  lora: Optional[LoraSpec] = None

  def init_vit(self, key) -> Any:
    images = jnp.zeros((1,) + tuple(self.image_shape), jnp.float32)
    return self.backbone.init(key, images)["params"]

  def init_adapters(self, vit_params, key) -> Any:
    return lora_lib.init_lora(vit_params, targets=self.lora.targets,
                              rank=self.lora.rank, key=key)

  def feature_width(self) -> int:
    """Width of the representation the heads see (pre_logits or tokens)."""
    return self.backbone.representation_size or self.backbone.width

  def init_head(self, num_classes: int, key) -> Any:
    return TaskHead(num_classes).init(
        key, jnp.zeros((1, self.feature_width())))["params"]

  def features(self, backbone_params, images, *, frozen=None, train=False,
               rng=None):
    if self.lora is None:
      rngs = {"dropout": rng} if (train and rng is not None) else None
      return self.backbone.apply({"params": backbone_params}, images,
                                 train=train, rngs=rngs)
    return lora_lib.lora_apply(
        self.backbone, frozen, backbone_params, images, alpha=self.lora.alpha,
        rank=self.lora.rank, dropout=self.lora.dropout, train=train, rng=rng)

  def logits(self, params, images, *, frozen=None, train=False, rng=None):
    """Logits of the current head for {'backbone': ..., 'head': ...}."""
    features = self.features(params["backbone"], images, frozen=frozen,
                             train=train, rng=rng)
    return apply_head(params["head"], features)

  def export_vit(self, backbone_params, frozen) -> Any:
    """Plain ViT weights equivalent to the (adapted) backbone."""
    if self.lora is None:
      return backbone_params
    return lora_lib.merge_lora(frozen, backbone_params, alpha=self.lora.alpha,
                               rank=self.lora.rank)


def classifier_from_config(config, image_shape) -> Classifier:
  lora = None
  if config.lora.enabled:
    lora = LoraSpec(targets=lora_lib.parse_targets(config.lora.targets),
                    rank=config.lora.rank, alpha=float(config.lora.alpha),
                    dropout=config.lora.dropout)
  return Classifier(backbone=vit_from_config(config.model),
                    image_shape=tuple(image_shape), lora=lora)
