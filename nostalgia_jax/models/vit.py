"""Vision Transformer backbone and task heads, in Flax linen.

Parameter names follow big_vision's `models/vit.py` (and therefore the
released ViT checkpoints), so pretrained weights can be loaded by name:

    embedding/{kernel,bias}            patch embedding (a strided Conv)
    cls                                 CLS token (1, 1, width)
    pos_embedding                       learned position embedding (1, N, width)
    Transformer/encoderblock_{i}/LayerNorm_0, MultiHeadDotProductAttention_0/
        {query,key,value,out}/{kernel,bias}, LayerNorm_1,
        MlpBlock_0/Dense_{0,1}
    Transformer/encoder_norm
    pre_logits/{kernel,bias}            optional representation layer

The backbone returns the (pre-logits) representation of an image batch. The
classifier of each task is a separate `TaskHead` whose parameters live
outside the backbone, so that task t's head exists from task t on and only
the current task's head is trained.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

# Sizes of the standard ViT variants: width, depth, MLP width, heads.
VIT_SIZES = {
    "mu": dict(width=32, depth=2, mlp_dim=64, num_heads=2),     # unit tests
    "pico": dict(width=64, depth=4, mlp_dim=128, num_heads=4),  # embedded digits
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
}

POOL_TYPES = ("tok", "gap")


class MlpBlock(nn.Module):
  """Transformer MLP: Dense -> GELU -> Dropout -> Dense."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    width = x.shape[-1]
    init = dict(kernel_init=nn.initializers.xavier_uniform(),
                bias_init=nn.initializers.normal(stddev=1e-6))
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, **init)(x)
    x = nn.gelu(x)
    x = nn.Dropout(rate=self.dropout)(x, deterministic=not train)
    return nn.Dense(width, dtype=self.dtype, **init)(x)


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block: x + MHSA(LN(x)); x + MLP(LN(x))."""
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        kernel_init=nn.initializers.xavier_uniform(),
        deterministic=True,
        dtype=self.dtype,
    )(y, y)
    y = nn.Dropout(rate=self.dropout)(y, deterministic=not train)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype)(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype)(y, train=train)
    y = nn.Dropout(rate=self.dropout)(y, deterministic=not train)
    return x + y


class Encoder(nn.Module):
  """Stack of `depth` encoder blocks followed by the final LayerNorm."""
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    for i in range(self.depth):
      x = Encoder1DBlock(self.mlp_dim, self.num_heads, self.dropout, self.dtype,
                         name=f"encoderblock_{i}")(x, train=train)
    return nn.LayerNorm(name="encoder_norm", dtype=self.dtype)(x)


class ViT(nn.Module):
  """ViT backbone: images (B, H, W, C) in [-1, 1] -> representation (B, D).

  Attributes:
    patch_size: side of the square patches.
    width, depth, mlp_dim, num_heads: transformer sizes (see `VIT_SIZES`).
    pool_type: 'tok' (CLS token, as the reference) or 'gap' (mean of tokens).
    representation_size: if set, a `pre_logits` Dense + tanh layer of that
      width (as in the released ImageNet-21k checkpoints).
    dropout: dropout rate in the blocks (active only with `train=True`).
    dtype: activation dtype (parameters stay float32).
  """
  patch_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  pool_type: str = "tok"
  representation_size: Optional[int] = None
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"pool_type={self.pool_type!r}; allowed: {POOL_TYPES}.")
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID",
                name="embedding", dtype=self.dtype)(images.astype(self.dtype))
    b, h, w, c = x.shape
    x = jnp.reshape(x, (b, h * w, c))
    pos = self.param("pos_embedding", nn.initializers.normal(stddev=1 / c**0.5),
                     (1, h * w, c), jnp.float32)
    x = x + pos.astype(self.dtype)
    if self.pool_type == "tok":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(self.dtype), (b, 1, 1)), x], 1)
    x = nn.Dropout(rate=self.dropout)(x, deterministic=not train)
    x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dropout,
                self.dtype, name="Transformer")(x, train=train)
    x = x[:, 0] if self.pool_type == "tok" else jnp.mean(x, axis=1)
    if self.representation_size is not None:
      x = nn.tanh(nn.Dense(self.representation_size, name="pre_logits",
                           dtype=self.dtype)(x))
    return x.astype(jnp.float32)


class TaskHead(nn.Module):
  """Linear classifier of one task (zero-initialised, as in big_vision)."""
  num_classes: int

  @nn.compact
  def __call__(self, features):
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                    name="head")(features)


def vit_from_config(model_config) -> ViT:
  """Builds the backbone from `config.model` (variant 'S/16' style or sizes)."""
  size, _, patch = model_config.variant.partition("/")
  if size not in VIT_SIZES:
    raise ValueError(
        f"config.model.variant={model_config.variant!r}: unknown size {size!r}; "
        f"allowed sizes: {sorted(VIT_SIZES)} (e.g. 'B/16').")
  if not patch.isdigit() or int(patch) < 1:
    raise ValueError(
        f"config.model.variant={model_config.variant!r}: the patch size after "
        "'/' must be a positive integer (e.g. 'B/16').")
  return ViT(
      patch_size=int(patch),
      pool_type=model_config.pool_type,
      representation_size=model_config.get("representation_size") or None,
      dropout=model_config.dropout,
      dtype=jnp.dtype(model_config.dtype),
      **VIT_SIZES[size],
  )
