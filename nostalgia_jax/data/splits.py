"""Label-disjoint task splits: which classes and which examples each task owns.

A split is computed from label arrays only (never from decoded images), as
index lists per task, so a 5-task split does not read and discard 80% of the
records of every pass.
"""

from __future__ import annotations

import dataclasses

import numpy as np

CLASS_ORDERS = ("fixed", "seeded")


@dataclasses.dataclass(frozen=True)
class TaskSplit:
  """The classes and examples of one task.

  Attributes:
    task: the task index.
    classes: original class ids of the task; the local label of class
      `classes[i]` is `i`, so every task head has `len(classes)` outputs.
    train_indices: indices into the train source of this task's examples.
    test_indices: indices into the test source of this task's examples.
  """
  task: int
  classes: tuple[int, ...]
  train_indices: np.ndarray
  test_indices: np.ndarray

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def label_map(self, num_classes_total: int) -> np.ndarray:
    """Lookup table: original class id -> local label (-1 outside the task)."""
    table = np.full((num_classes_total,), -1, np.int32)
    table[list(self.classes)] = np.arange(len(self.classes), dtype=np.int32)
    return table


def class_order(num_classes: int, order: str, seed: int) -> np.ndarray:
  """The order in which classes are dealt to tasks ('fixed' or 'seeded')."""
  if order == "fixed":
    return np.arange(num_classes)
  if order == "seeded":
    return np.random.default_rng(seed).permutation(num_classes)
  raise ValueError(f"config.data.class_order={order!r}; allowed: {CLASS_ORDERS}.")


def make_task_splits(train_labels: np.ndarray, test_labels: np.ndarray, *,
                     num_classes: int, num_tasks: int, order: str,
                     seed: int) -> list[TaskSplit]:
  """Deals the classes into `num_tasks` label-disjoint tasks.

  Classes are taken in `class_order(...)` and cut into contiguous groups of
  (almost) equal size; every class belongs to exactly one task.
  """
  if num_tasks < 1 or num_classes < 2 * num_tasks:
    raise ValueError(
        f"config.data.num_tasks={num_tasks} with {num_classes} classes: every "
        f"task needs at least 2 classes, so num_tasks must be in "
        f"[1, {num_classes // 2}].")
  groups = np.array_split(class_order(num_classes, order, seed), num_tasks)
  splits = []
  for t, group in enumerate(groups):
    classes = tuple(int(c) for c in group)
    splits.append(TaskSplit(
        task=t, classes=classes,
        train_indices=np.flatnonzero(np.isin(train_labels, classes)),
        test_indices=np.flatnonzero(np.isin(test_labels, classes))))
  return splits
