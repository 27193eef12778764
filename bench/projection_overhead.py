"""Cost of the Nostalgia projection in the train step, and against its floor.

    .venv/bin/python -m bench.projection_overhead
        [--models pico/2@8:full:32,Ti/4@32:lora:8] [--ranks 32,160]
        [--lora_rank 16] [--repeats 20]

Each model spec is variant@image_size:full|lora:batch_size. For each, timed
interleaved in one loop (medians after warm-up, block_until_ready):
  step      jitted `steps.train_step` with SGD momentum, no projection,
            state donated as `steps.jit_train_step` does (also timed
            without donation: "nodonate");
  step+U_k  the same step with `nostalgia(lr, basis)` (projection of the
            backbone gradient before SGD) for each basis rank k;
  proj_k    jitted `project_out(grads, basis)` alone;
  floor_k   a jitted reduction reading every basis element twice
            (sum(U * sum(U)): the second pass needs the first's result),
            the memory floor of U^T g followed by U c.
Also the bandwidth of a 256 MB in-place (donated) x + 1, and (2 x basis bytes) / bandwidth.
Basis values are random (timing does not depend on them).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from bench import common
from nostalgia_jax.curvature import tree_math
from nostalgia_jax.models.classifier import LoraSpec
from nostalgia_jax.optim import projection
from nostalgia_jax.train import steps


@jax.jit
def _read_twice(basis):
  total = sum(jnp.sum(b) for b in jax.tree.leaves(basis))
  return sum(jnp.sum(b * total) for b in jax.tree.leaves(basis))


@functools.partial(jax.jit, donate_argnums=0)
def _copy(x):
  return x + 1.0


def copy_bandwidth(repeats: int) -> float:
  """Bytes moved (read + write) per second by a 256 MB elementwise copy."""
  x = [jnp.ones((64 * 2**20,), jnp.float32)]
  nbytes = x[0].nbytes
  def copy():  # donated: in place, so no fresh 256 MB (page faults) a call
    x[0] = _copy(x[0])
    return x[0]
  t = common.interleaved_medians({"copy": copy}, repeats)["copy"]
  return 2 * nbytes / t


def measure(spec: str, ranks, lora_rank: int, repeats: int, bandwidth: float):
  variant_size, mode, batch_size = spec.split(":")
  variant, _, image_size = variant_size.partition("@")
  lora = (LoraSpec(targets=("query", "key", "value"), rank=lora_rank,
                   alpha=2.0 * lora_rank, dropout=0.0)
          if mode == "lora" else None)
  model = common.trained_model(variant, int(image_size), steps_=0, lora=lora)
  batch = jax.tree.map(lambda x: x[0], common.fixed_batches(
      model.examples, 1, int(batch_size)))
  params = model.params
  rng = jax.random.key(0)

  def step_fn(basis, donate):
    # A donated state is deleted by the call: give it its own buffers.
    own = lambda tree: jax.tree.map(jnp.copy, tree)
    basis = None if basis is None else own(basis)
    optimizer = projection.nostalgia(0.01, basis, momentum=0.9)
    state = [steps.init_train_state(own(params), optimizer, head_only=False)]
    step = jax.jit(functools.partial(
        steps.train_step, logits_fn=model.classifier.logits,
        optimizer=optimizer, label_smoothing=0.1, head_only=False),
                   donate_argnums=(0,) if donate else ())
    def call():
      out = step(state[0], batch, rng, model.frozen, None)
      if donate:  # the donated state is consumed: feed the new one back
        state[0] = out[0]
      return out
    return call

  grads = common.backbone_gradient_fn(model)(params["backbone"], batch)
  fns = {"step": step_fn(None, True), "step_nd": step_fn(None, False)}
  nbytes = {}
  for k in ranks:
    basis = tree_math.basis_zeros(params["backbone"], k)
    basis = jax.tree.map(lambda b, i=k: jax.random.normal(
        jax.random.key(i), b.shape, b.dtype) * 1e-3, basis)
    nbytes[k] = sum(b.nbytes for b in jax.tree.leaves(basis))
    fns[f"step+U_{k}"] = step_fn({"backbone": basis, "head": None}, True)
    fns[f"step_nd+U_{k}"] = step_fn({"backbone": basis, "head": None}, False)
    project = jax.jit(projection.project_out)
    fns[f"proj_{k}"] = functools.partial(project, grads, basis)
    fns[f"floor_{k}"] = functools.partial(_read_twice, basis)
  t = common.interleaved_medians(fns, repeats)
  print(f"\n## {spec}: {model.num_params} trainable backbone params "
        f"({'LoRA r=%d on q,k,v' % lora_rank if lora else 'full backbone'}), "
        f"batch {batch_size}")
  print(f"step without projection: {1e3 * t['step']:.2f} ms donated, "
        f"{1e3 * t['step_nd']:.2f} ms not donated")
  print(f"{'k':>4}{'basis MB':>10}{'step+U ms':>11}{'step ratio':>12}"
        f"{'ratio nodonate':>16}"
        f"{'proj ms':>9}{'floor ms':>10}{'proj/floor':>12}"
        f"{'bw floor ms':>13}{'proj/bw':>9}")
  for k in ranks:
    bw_floor = 2 * nbytes[k] / bandwidth
    print(f"{k:>4}{nbytes[k] / 1e6:>10.1f}{1e3 * t[f'step+U_{k}']:>11.2f}"
          f"{t[f'step+U_{k}'] / t['step']:>12.3f}"
          f"{t[f'step_nd+U_{k}'] / t['step_nd']:>16.3f}"
          f"{1e3 * t[f'proj_{k}']:>9.3f}{1e3 * t[f'floor_{k}']:>10.3f}"
          f"{t[f'proj_{k}'] / t[f'floor_{k}']:>12.2f}"
          f"{1e3 * bw_floor:>13.3f}{t[f'proj_{k}'] / bw_floor:>9.2f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="pico/2@8:full:32,Ti/4@32:lora:8")
  parser.add_argument("--ranks", default="32,160",
                      type=lambda s: [int(x) for x in s.split(",")])
  parser.add_argument("--lora_rank", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=20)
  args = parser.parse_args()
  bandwidth = copy_bandwidth(args.repeats)
  print(f"# {common.machine()}; medians of {args.repeats} interleaved "
        f"rounds; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read+write)")
  for spec in args.models.split(","):
    measure(spec, args.ranks, args.lora_rank, args.repeats, bandwidth)


if __name__ == "__main__":
  main()
