"""Memory of the curvature basis and of a Lanczos run.

    .venv/bin/python -m bench.memory [--variant Ti/4] [--image_size 32]
        [--batch_size 8] [--k 16] [--iters 16,32] [--basis_k 32]

1. Basis bytes per parameter: a basis built by `lanczos_eigenpairs`
   (k = --basis_k) stored through `projection_state` in float32 and
   bfloat16; actual `nbytes` / trainable parameter count.
2. Peak memory of a Lanczos run (k = --k, m in --iters, N = 1 batch): the
   process RSS sampled every 2 ms by a thread during a second run (the first
   one compiles), minus the RSS just before it, next to the Krylov basis
   size m x params x 4 bytes. (`jax.devices()[0].memory_stats()` is None on
   CPU.) Also XLA's compiled memory analysis of the jitted matvec and of the
   reorthogonalisation step (temporaries beyond arguments and outputs).
"""

from __future__ import annotations

import argparse
import threading
import time

import jax
import jax.numpy as jnp
import psutil

from bench import common
from nostalgia_jax import curvature
from nostalgia_jax.curvature import lanczos, tree_math
from nostalgia_jax.optim import projection


class PeakRss:
  """Samples this process's RSS in a thread; `peak` after exit (bytes)."""

  def __enter__(self):
    self._process = psutil.Process()
    self.start = self.peak = self._process.memory_info().rss
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def _sample(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self._process.memory_info().rss)
      time.sleep(0.002)

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self._process.memory_info().rss)


def _mb(x: float) -> str:
  return f"{x / 2**20:.1f}"


def analysis(compiled) -> str:
  stats = compiled.memory_analysis()
  if stats is None:
    return "n/a"
  return (f"args {_mb(stats.argument_size_in_bytes)} MiB, out "
          f"{_mb(stats.output_size_in_bytes)} MiB, temp "
          f"{_mb(stats.temp_size_in_bytes)} MiB")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variant", default="Ti/4")
  parser.add_argument("--image_size", type=int, default=32)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--k", type=int, default=16)
  parser.add_argument("--iters", default="16,32",
                      type=lambda s: [int(x) for x in s.split(",")])
  parser.add_argument("--basis_k", type=int, default=32)
  args = parser.parse_args()
  print(f"# {common.machine()}")
  # Head warmed up (a zero-initialised head gives a zero Hessian).
  model = common.trained_model(args.variant, args.image_size, steps_=20,
                               batch_size=args.batch_size, head_only=True)
  batches = common.fixed_batches(model.examples, 1, args.batch_size)
  matvec = common.curvature_operator(model, batches)
  backbone = model.params["backbone"]
  params = model.num_params
  print(f"## {args.variant}@{args.image_size}: {params} backbone params, "
        f"HVP on N=1 batch of {args.batch_size}")

  result = curvature.lanczos_eigenpairs(matvec, backbone, args.basis_k,
                                        num_iters=args.basis_k,
                                        key=jax.random.key(0))
  print(f"\nbasis of k={args.basis_k} built by Lanczos, stored in the "
        "projection state:")
  print(f"{'dtype':<10}{'nbytes':>14}{'bytes/param':>13}{'= k x':>7}")
  for dtype in (jnp.float32, jnp.bfloat16):
    state = projection.projection_state(
        {"backbone": result.eigenvectors, "head": None},
        basis_dtype=dtype)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state.basis))
    print(f"{jnp.dtype(dtype).name:<10}{nbytes:>14}{nbytes / params:>13.1f}"
          f"{nbytes / params / args.basis_k:>7.1f}")
  del result, state

  print("\ncompiled memory analysis (XLA, CPU):")
  v = tree_math.tree_random_normal(jax.random.key(1), backbone)
  hvp = matvec.fn  # functools.partial of the jitted `_mean_hvp`
  compiled = hvp.func.lower(*hvp.args, v).compile()
  print(f"  HVP (one batch)            : {analysis(compiled)}")
  for m in args.iters:
    krylov = tree_math.basis_zeros(backbone, m)
    compiled = lanczos._orthogonalise.lower(krylov, v).compile()  # pylint: disable=protected-access
    print(f"  reorthogonalise, m={m:<4}    : {analysis(compiled)} "
          f"(Krylov basis {_mb(m * params * 4)} MiB)")
    del krylov

  print(f"\npeak RSS of a Lanczos run (k={args.k}), second run of each m:")
  print(f"{'m':>4}{'Krylov MiB':>12}{'peak-start MiB':>16}{'ratio':>8}"
        f"{'seconds':>9}")
  for m in args.iters:
    for attempt in range(2):
      with PeakRss() as rss:
        start = time.perf_counter()
        out = curvature.lanczos_eigenpairs(matvec, backbone, args.k,
                                           num_iters=m, key=jax.random.key(0))
        jax.block_until_ready(out.eigenvectors)
        seconds = time.perf_counter() - start
      del out
    krylov_bytes = m * params * 4
    print(f"{m:>4}{_mb(krylov_bytes):>12}{_mb(rss.peak - rss.start):>16}"
          f"{(rss.peak - rss.start) / krylov_bytes:>8.2f}{seconds:>9.1f}")


if __name__ == "__main__":
  main()
