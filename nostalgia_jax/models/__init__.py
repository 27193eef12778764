"""Models: the ViT backbone and per-task heads (LoRA adapters plug in here)."""

from nostalgia_jax.models.vit import TaskHead, ViT, VIT_SIZES, vit_from_config
