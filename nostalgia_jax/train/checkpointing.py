"""Checkpoints at task boundaries, and the workdir's config guard.

A run's workdir holds `config.json` (the resolved config of the run that
created it) and `checkpoints/` (an orbax CheckpointManager). Checkpoint
step t means "t tasks finished"; it holds a `state` pytree (backbone, heads,
optimizer state, mode-specific curvature or penalty state) and `meta` JSON
(the accuracy matrix so far, per-task records, the shapes of variable-size
state). Every process of a multi-host run calls save and restore on the same
shared directory; orbax coordinates them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

# Config fields that may change between a run and its resumption without
# changing what the run computes.
RESUME_NEUTRAL_FIELDS = ("train.log_every", "checkpoint.max_to_keep")


class IncompatibleWorkdirError(ValueError):
  """The workdir was written by a run with a different configuration."""


def flatten_dict(d: dict, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  flat = {}
  for key, value in d.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(flatten_dict(value, path + "."))
    else:
      flat[path] = value
  return flat


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """A JSON-able dict of the config (round-tripped through JSON)."""
  return json.loads(config.to_json_best_effort())


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict, *,
                         allow_config_change: bool = False) -> None:
  """Writes `config.json`, or refuses a workdir of a different config.

  Raises:
    IncompatibleWorkdirError: the workdir's config differs in fields that
      change results, and `allow_config_change` is False.
  """
  path = epath.Path(workdir) / "config.json"
  current = config_to_dict(config)
  if path.exists():
    saved = json.loads(path.read_text())
    old, new = flatten_dict(saved), flatten_dict(current)
    differing = sorted(k for k in set(old) | set(new)
                       if old.get(k) != new.get(k) and k not in RESUME_NEUTRAL_FIELDS)
    if differing and not allow_config_change:
      details = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
                          for k in differing[:10])
      raise IncompatibleWorkdirError(
          f"workdir {workdir} was written by a run with a different config "
          f"({details}). Use a new --workdir, or pass --allow_config_change "
          "to resume this one with the new config anyway.")
    if not differing:
      return
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / "config.json.tmp"
    tmp.write_text(json.dumps(current, indent=2, sort_keys=True))
    os.replace(tmp, path)


def make_manager(workdir: str, max_to_keep: Optional[int]) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep or None, enable_async_checkpointing=True,
      create=True)
  return ocp.CheckpointManager(
      epath.Path(workdir).absolute() / "checkpoints", options=options)


def save(manager: ocp.CheckpointManager, tasks_done: int, state: Any,
         opt_state: Any, meta: dict) -> None:
  """Saves the state after `tasks_done` tasks (asynchronously).

  `opt_state` (the last task's optimizer state) is a separate item: it is
  kept for inspection and is not needed to resume at a task boundary, where
  every task starts a fresh optimizer.
  """
  items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
  if opt_state is not None:
    items["opt_state"] = ocp.args.StandardSave(opt_state)
  manager.save(tasks_done, args=ocp.args.Composite(**items))


def export_model(workdir: str, vit_params: Any, heads: dict) -> str:
  """Writes the final model as plain ViT weights + task heads (orbax).

  With LoRA the adapters are merged into the ViT weights first, so the export
  loads into the plain `ViT` module (and gives the adapted model's outputs).
  Returns the export directory, `WORKDIR/export`.
  """
  path = epath.Path(workdir).absolute() / "export"
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, {"vit": vit_params, "heads": heads}, force=True)
    checkpointer.wait_until_finished()
  return str(path)


def tree_spec(tree: Any) -> Any:
  """JSON description (shape, dtype) of a nested dict of arrays."""
  if isinstance(tree, dict):
    return {key: tree_spec(value) for key, value in tree.items()}
  return {"__array__": True, "shape": list(tree.shape), "dtype": str(tree.dtype)}


def abstract_from_spec(spec: Any, sharding) -> Any:
  """`jax.ShapeDtypeStruct`s (with `sharding`) from a `tree_spec`."""
  if spec.get("__array__"):
    return jax.ShapeDtypeStruct(tuple(spec["shape"]), spec["dtype"],
                                sharding=sharding)
  return {key: abstract_from_spec(value, sharding) for key, value in spec.items()}


def restore_meta(manager: ocp.CheckpointManager, tasks_done: int) -> dict:
  try:
    restored = manager.restore(
        tasks_done, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
  except Exception as e:  # orbax raises several types for unreadable data.
    raise _unreadable(manager, tasks_done, e) from e
  return restored.meta


def restore_state(manager: ocp.CheckpointManager, tasks_done: int,
                  abstract_state: Any) -> Any:
  """Restores the state into `abstract_state`'s structure and shardings."""
  try:
    restored = manager.restore(tasks_done, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
  except Exception as e:  # orbax raises several types for unreadable data.
    raise _unreadable(manager, tasks_done, e) from e
  return restored.state


def _unreadable(manager, tasks_done, error) -> IncompatibleWorkdirError:
  return IncompatibleWorkdirError(
      f"the checkpoint after task {tasks_done - 1} in {manager.directory} "
      f"cannot be restored for this config ({type(error).__name__}: "
      f"{str(error)[:300]}). It was written by another version or config, or "
      "is damaged: use a new --workdir (the existing one is left untouched).")
