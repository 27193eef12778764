"""LoRA adapters for the frozen ViT backbone.

Low-rank adapters (Hu et al., 2021) add `(alpha / rank) * x A B` to the output
of chosen Dense layers of the backbone, where `A` is (in_features, rank) and
`B` is (rank, out_features). The base weights stay frozen; only the adapters
(and the task heads) train, and the adapters persist across tasks.

The adapters are ONE plain pytree, separate from the base params, because
Nostalgia's Hessian and null-space projection live in adapter space. It mirrors
the nesting of the base params, one `{'lora_a', 'lora_b'}` leaf pair per
targeted layer:

    adapters['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_0']
            ['query'] = {'lora_a': (D, r), 'lora_b': (r, H * Dh)}

`DenseGeneral` kernels are flattened to a matrix: query/key/value (D, H, Dh)
-> (D, H*Dh); the attention output (H, Dh, D) -> (H*Dh, D).

The adapted forward pass (`lora_apply`) does not change `models/vit.py`: it
runs the plain backbone under `flax.linen.intercept_methods` and adds the
low-rank path to the `__call__` of the targeted Dense/DenseGeneral modules,
which it recognises by their module path. Base params and adapters stay two
separate (jit) arguments; this module never closes over arrays.

Usage:

    adapters = init_lora(params['backbone'], targets=('query', 'value'),
                         rank=16, key=jax.random.key(0))
    features = lora_apply(vit, params['backbone'], adapters, images,
                          alpha=32.0, rank=16, dropout=0.0, train=False,
                          rng=None)
    exported = merge_lora(params['backbone'], adapters, alpha=32.0, rank=16)
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import unfreeze

Path = tuple[str, ...]

ATTENTION_TARGETS = ("query", "key", "value", "out")
# 'mlp' adapts both Dense layers of every MlpBlock.
ALLOWED_TARGETS = ATTENTION_TARGETS + ("mlp",)
DEFAULT_TARGETS = ("query", "key", "value")


def parse_targets(targets: Union[str, Iterable[str]]) -> tuple[str, ...]:
  """Normalises `config.lora.targets` to a tuple of allowed target names.

  Args:
    targets: a comma-separated string ('query,value') or a sequence of names
      from `ALLOWED_TARGETS`.

  Returns:
    The distinct names, in the given order.

  Raises:
    ValueError: on an unknown name or an empty selection.
  """
  names = targets.split(",") if isinstance(targets, str) else list(targets)
  names = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
  unknown = [n for n in names if n not in ALLOWED_TARGETS]
  if unknown:
    raise ValueError(f"lora.targets: unknown target(s) {unknown}; allowed: "
                     f"{list(ALLOWED_TARGETS)} (e.g. 'query,key,value').")
  if not names:
    raise ValueError("lora.targets is empty; name at least one of "
                     f"{list(ALLOWED_TARGETS)}.")
  return names


def lora_scale(alpha: float, rank: int) -> float:
  """The LoRA scaling `alpha / rank`."""
  return float(alpha) / int(rank)


def _target_of(path: Path) -> Optional[str]:
  """The target name of the Dense module at `path`, or None if not a target."""
  if len(path) < 2:
    return None
  parent, name = path[-2], path[-1]
  if parent.startswith("MultiHeadDotProductAttention") and name in ATTENTION_TARGETS:
    return name
  if parent.startswith("MlpBlock") and name.startswith("Dense_"):
    return "mlp"
  return None


def _num_input_axes(target: str, kernel_ndim: int) -> int:
  # Only the attention output contracts several axes: (H, Dh, D) takes H*Dh in.
  return kernel_ndim - 1 if target == "out" else 1


def _flat_params(tree: Any) -> dict[Path, Any]:
  return traverse_util.flatten_dict(unfreeze(tree))


def targeted_kernels(base_params: Any, targets: Iterable[str]) -> dict[Path, Any]:
  """The kernels that `targets` select, keyed by the path of their module.

  Args:
    base_params: backbone params (the `'params'` collection of the ViT).
    targets: target names (see `parse_targets`).

  Returns:
    `{module_path: kernel}` in sorted path order.

  Raises:
    ValueError: if the targets select no kernel of these params.
  """
  targets = parse_targets(targets)
  if set(base_params) == {"params"}:
    raise ValueError("base_params is a variables dict {'params': ...}; pass "
                     "variables['params'] (the backbone's params) instead.")
  kernels = {path[:-1]: leaf for path, leaf in _flat_params(base_params).items()
             if path[-1] == "kernel" and _target_of(path[:-1]) in targets}
  if not kernels:
    raise ValueError(f"lora.targets={targets} select no kernel of these "
                     "params; pass the params of the ViT backbone.")
  return dict(sorted(kernels.items()))


def _matrix_shape(path: Path, kernel_shape: tuple[int, ...]) -> tuple[int, int]:
  n_in = _num_input_axes(_target_of(path), len(kernel_shape))
  return (math.prod(kernel_shape[:n_in]), math.prod(kernel_shape[n_in:]))


def init_lora(base_params: Any, *, targets: Union[str, Iterable[str]] = DEFAULT_TARGETS,
              rank: int = 16, key: jax.Array) -> dict:
  """Creates adapters for the targeted layers of a ViT backbone.

  `A ~ normal(0, 1/sqrt(in_features))` and `B = 0`, so the adapted model
  starts equal to the base model. (Hence gradients and curvature w.r.t. `A`
  are zero until `B` moves away from 0.)

  Args:
    base_params: backbone params (the `'params'` collection of the ViT).
    targets: names from `ALLOWED_TARGETS` (a tuple or a comma string).
    rank: adapter rank r, 1 <= r <= min(in_features, out_features).
    key: PRNG key.

  Returns:
    A nested dict mirroring `base_params`, with `{'lora_a': (in, r),
    'lora_b': (r, out)}` float32 arrays at each targeted module path.

  Raises:
    ValueError: on an unknown target or a rank out of range.
  """
  if int(rank) != rank or rank < 1:
    raise ValueError(f"lora.rank={rank!r} must be a positive integer.")
  kernels = targeted_kernels(base_params, targets)
  keys = jax.random.split(key, len(kernels))
  flat = {}
  for layer_key, (path, kernel) in zip(keys, kernels.items()):
    d_in, d_out = _matrix_shape(path, kernel.shape)
    if rank > min(d_in, d_out):
      raise ValueError(
          f"lora.rank={rank} exceeds min(in, out)={min(d_in, d_out)} of layer "
          f"{'/'.join(path)} ({d_in} x {d_out}); choose rank <= {min(d_in, d_out)}.")
    flat[path + ("lora_a",)] = (jax.random.normal(layer_key, (d_in, rank), jnp.float32)
                                / np.sqrt(d_in))
    flat[path + ("lora_b",)] = jnp.zeros((rank, d_out), jnp.float32)
  return traverse_util.unflatten_dict(flat)


def adapter_layers(adapters: Any) -> dict[Path, tuple[jax.Array, jax.Array]]:
  """`{module_path: (lora_a, lora_b)}` of an adapter pytree, sorted by path."""
  flat = _flat_params(adapters)
  paths = sorted({path[:-1] for path in flat})
  layers = {}
  for path in paths:
    if set(k[-1] for k in flat if k[:-1] == path) != {"lora_a", "lora_b"}:
      raise ValueError(f"adapters at {'/'.join(path)} must hold exactly "
                       "'lora_a' and 'lora_b'.")
    layers[path] = (flat[path + ("lora_a",)], flat[path + ("lora_b",)])
  return layers


def _check_rank(layers: dict, rank: int) -> None:
  for path, (lora_a, lora_b) in layers.items():
    if lora_a.shape[-1] != rank or lora_b.shape[0] != rank:
      raise ValueError(
          f"rank={rank} but the adapter at {'/'.join(path)} has rank "
          f"{lora_a.shape[-1]} (lora_a {lora_a.shape}, lora_b {lora_b.shape}); "
          "pass the rank the adapters were created with.")


def _contracted_axes(module: nn.Module, ndim: int) -> int:
  """How many trailing input axes the Dense/DenseGeneral `module` contracts."""
  if not isinstance(module, nn.DenseGeneral):
    return 1
  axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
  axes = sorted(a % ndim for a in axis)
  if axes != list(range(ndim - len(axes), ndim)) or module.batch_dims:
    raise NotImplementedError(
        f"LoRA supports DenseGeneral over trailing axes only; got axis="
        f"{module.axis}, batch_dims={module.batch_dims}.")
  return len(axes)


def lora_apply(backbone_module: nn.Module, base_params: Any, adapters: Any,
               images: jax.Array, *, alpha: float, rank: int,
               dropout: float = 0.0, train: bool = False,
               rng: Optional[jax.Array] = None) -> jax.Array:
  """Forward pass of the backbone with LoRA adapters on the targeted layers.

  Each adapted layer computes `y = x W + b + (alpha/rank) dropout(x) A B`;
  dropout acts on the LoRA input only, and only with `train=True`.

  Args:
    backbone_module: the (unbound) ViT backbone.
    base_params: its params (the `'params'` collection), frozen.
    adapters: adapter pytree from `init_lora`.
    images: image batch (B, H, W, C).
    alpha: LoRA alpha; the scale is `alpha / rank`.
    rank: the adapters' rank (checked against their shapes).
    dropout: LoRA dropout rate in [0, 1).
    train: training mode (backbone dropout and LoRA dropout active).
    rng: PRNG key, needed when `train=True` and some dropout rate is > 0. It
      is split between the backbone's 'dropout' stream and LoRA dropout.

  Returns:
    The backbone's features (B, D).

  Raises:
    ValueError: on a rank mismatch, a bad dropout rate, a missing `rng`, or
      adapters whose paths match no layer of the backbone.
  """
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"lora.dropout={dropout!r} must be in [0, 1).")
  layers = adapter_layers(adapters)
  _check_rank(layers, rank)
  scale = lora_scale(alpha, rank)
  use_dropout = train and dropout > 0.0
  rngs = {}
  lora_rng = None
  if rng is not None:
    backbone_rng, lora_rng = jax.random.split(rng)
    rngs = {"dropout": backbone_rng}
  elif use_dropout:
    raise ValueError(f"lora_apply(train=True, dropout={dropout}) needs an rng.")
  # Fixed per-layer indices give each layer its own dropout mask.
  layer_index = {path: i for i, path in enumerate(layers)}
  applied = set()

  def add_low_rank_path(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != "__call__"
        or not isinstance(module, (nn.Dense, nn.DenseGeneral))):
      return next_fun(*args, **kwargs)
    path = tuple(module.scope.path)
    if path not in layers:
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    n_in = _contracted_axes(module, x.ndim)
    x = x.reshape(x.shape[:x.ndim - n_in] + (-1,))
    if use_dropout:
      keep = jax.random.bernoulli(
          jax.random.fold_in(lora_rng, layer_index[path]), 1.0 - dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - dropout), jnp.zeros_like(x))
    lora_a, lora_b = layers[path]
    delta = scale * ((x @ lora_a) @ lora_b)
    applied.add(path)
    return y + delta.reshape(y.shape).astype(y.dtype)

  with nn.intercept_methods(add_low_rank_path):
    features = backbone_module.apply({"params": base_params}, images,
                                     train=train, rngs=rngs)
  unused = sorted("/".join(p) for p in set(layers) - applied)
  if unused:
    raise ValueError(f"adapters at {unused} match no Dense layer of the "
                     "backbone; were they created with init_lora from these params?")
  return features


def merge_lora(base_params: Any, adapters: Any, *, alpha: float, rank: int) -> Any:
  """Folds the adapters into the base kernels: `W + (alpha/rank) A B`.

  The plain ViT forward with the merged params equals `lora_apply` with
  dropout off. The input params are not modified.

  Args:
    base_params: backbone params (the `'params'` collection of the ViT).
    adapters: adapter pytree from `init_lora`.
    alpha: LoRA alpha.
    rank: the adapters' rank.

  Returns:
    A new backbone params pytree (nested dicts) with merged kernels.
  """
  layers = adapter_layers(adapters)
  _check_rank(layers, rank)
  scale = lora_scale(alpha, rank)
  flat = dict(_flat_params(base_params))
  for path, (lora_a, lora_b) in layers.items():
    if path + ("kernel",) not in flat:
      raise ValueError(f"adapter at {'/'.join(path)} has no kernel in base_params.")
    kernel = flat[path + ("kernel",)]
    update = (scale * (lora_a @ lora_b)).reshape(kernel.shape)
    flat[path + ("kernel",)] = kernel + update.astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)


def count_params(tree: Any) -> int:
  """Total number of scalars in a pytree (e.g. the adapters' size)."""
  return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(tree))
