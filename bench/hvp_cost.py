"""HVP time / gradient time on the same batch, for a few ViT sizes.

    .venv/bin/python -m bench.hvp_cost [--models mu/4@8,pico/2@8,Ti/4@32]
        [--batch_sizes 32,32,8] [--repeats 20] [--train_steps 0]

For each model (variant@image_size) it times, on one fixed batch (N = 1):
  grad  jax.jit(jax.grad(task loss)) w.r.t. the backbone (the loss function
        `train/continual.py` hands to the curvature operators),
  hvp   the library's `hessian_matvec` (forward-over-reverse),
  ggn   the library's `ggn_matvec` (J^T H_out J v),
interleaved round-robin, after warm-up (compilation excluded), each call
ended by block_until_ready; medians of `--repeats` rounds. The cost of a
matvec does not depend on the weights' values, so by default the models are
not trained (`--train_steps` to train them first).
"""

from __future__ import annotations

import argparse

import jax

from bench import common
from nostalgia_jax.curvature import tree_math


def measure(variant: str, image_size: int, batch_size: int, repeats: int,
            train_steps: int) -> dict:
  model = common.trained_model(variant, image_size, steps_=train_steps,
                               batch_size=min(batch_size, 32))
  batches = common.fixed_batches(model.examples, 1, batch_size)
  batch = jax.tree.map(lambda x: x[0], batches)
  backbone = model.params["backbone"]
  v = tree_math.tree_random_normal(jax.random.key(1), backbone)
  grad = common.backbone_gradient_fn(model)
  hvp = common.curvature_operator(model, batches, "hessian")
  ggn = common.curvature_operator(model, batches, "ggn")
  t = common.interleaved_medians({
      "grad": lambda: grad(backbone, batch),
      "hvp": lambda: hvp(v),
      "ggn": lambda: ggn(v),
  }, repeats)
  return dict(model=f"{variant}@{image_size}", params=model.num_params,
              batch=batch_size, **t)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="mu/4@8,pico/2@8,Ti/4@32")
  parser.add_argument("--batch_sizes", default="32,32,8")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--train_steps", type=int, default=0)
  args = parser.parse_args()
  models = args.models.split(",")
  sizes = [int(b) for b in args.batch_sizes.split(",")]
  if len(sizes) != len(models):
    parser.error("--batch_sizes needs one entry per --models entry.")
  print(f"# {common.machine()}; medians of {args.repeats} interleaved rounds")
  print(f"{'model':<13}{'params':>10}{'batch':>6}{'grad ms':>10}"
        f"{'hvp ms':>10}{'ggn ms':>10}{'hvp/grad':>10}{'ggn/grad':>10}")
  for spec, batch_size in zip(models, sizes):
    variant, _, image_size = spec.partition("@")
    r = measure(variant, int(image_size or 8), batch_size, args.repeats,
                args.train_steps)
    print(f"{r['model']:<13}{r['params']:>10}{r['batch']:>6}"
          f"{1e3 * r['grad']:>10.2f}{1e3 * r['hvp']:>10.2f}"
          f"{1e3 * r['ggn']:>10.2f}{r['hvp'] / r['grad']:>10.2f}"
          f"{r['ggn'] / r['grad']:>10.2f}", flush=True)


if __name__ == "__main__":
  main()
