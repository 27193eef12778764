"""Curvature of the task loss: pytree linear algebra, Hessian/GGN operators,
Lanczos top-k eigenpairs and the merging of curvature bases across tasks."""

from nostalgia_jax.curvature.lanczos import (
    EigenResult,
    default_num_iters,
    lanczos_eigenpairs,
    per_batch_eigenpairs,
    top_eigenpairs,
)
from nostalgia_jax.curvature.merge import (
    MERGE_MODES,
    CurvatureBasis,
    merge_bases,
    merge_average,
    merge_union,
    truncate,
)
from nostalgia_jax.curvature.operators import (
    CURVATURE_KINDS,
    CountedMatvec,
    curvature_matvec,
    ggn_matvec,
    hessian_matvec,
)

__all__ = [
    "CURVATURE_KINDS",
    "MERGE_MODES",
    "CountedMatvec",
    "CurvatureBasis",
    "EigenResult",
    "curvature_matvec",
    "default_num_iters",
    "ggn_matvec",
    "hessian_matvec",
    "lanczos_eigenpairs",
    "merge_bases",
    "merge_average",
    "merge_union",
    "per_batch_eigenpairs",
    "top_eigenpairs",
    "truncate",
]
