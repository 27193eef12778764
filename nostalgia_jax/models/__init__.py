"""Models: the ViT backbone, task heads, LoRA adapters, the classifier."""

from nostalgia_jax.models.classifier import Classifier, apply_head, classifier_from_config
from nostalgia_jax.models.vit import TaskHead, ViT, VIT_SIZES, vit_from_config
