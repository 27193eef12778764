"""The device mesh and the shardings of parameters, optimizer state and data.

One 'data' mesh axis over every device of every host: batches are split
along it and parameters are replicated (data parallelism). The functions
here are the only place that knows how arrays are laid out, so model
sharding (FSDP rules over parameter paths) can be added without touching
the training steps.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh over all devices (all hosts), axis 'data'."""
  # Auto axis types: the model code relies on the compiler propagating
  # shardings; the default Explicit types would demand annotations everywhere.
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over the 'data' axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def state_shardings(mesh, abstract_tree):
  """Shardings of a state pytree (parameters, optimizer state): replicated."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_tree)


def check_batch_size(global_batch_size: int, name: str) -> None:
  """The global batch must split evenly over devices and hosts."""
  if global_batch_size % jax.device_count():
    raise ValueError(
        f"{name}={global_batch_size} is not divisible by the number of "
        f"devices ({jax.device_count()}): use a multiple of it.")


def put_batch(host_batch: dict, mesh) -> dict:
  """Assembles the global batch from each host's part of it."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      host_batch)


def put_replicated(tree, mesh):
  """Places a host pytree (identical on every host) replicated on the mesh."""
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(
          sharding, np.asarray(x), np.shape(x)), tree)
