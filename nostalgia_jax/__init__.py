"""nostalgia_jax: Hessian-aware constrained fine-tuning for continual learning.

Layers (one folder each): `data` (sources, label splits, grain pipelines),
`models` (ViT backbone, task heads), `curvature` (Hessian-vector products,
Lanczos, merging of eigenspaces), `optim` (base optimizers, the Nostalgia
projection, penalties), `train` (steps, task loop, checkpoints, reports),
and `sharding` (mesh and array layouts).
"""

__version__ = "0.1.0"
