"""grain input pipelines over one task's label split.

`train_dataset` streams shuffled, augmented, repeated batches of a task;
`eval_batches` makes one deterministic, padded pass over its test examples.
Both work on any source of records {'image': uint8 (H, W, 3), 'label': int}
(see `sources.py`), so every dataset goes through the same code. Each host
reads its own shard of the task (`jax.process_index()`), and batches are
per-host: the training loop assembles the global batch across hosts.
"""

from __future__ import annotations

from typing import Iterator

import grain
import jax
import numpy as np

from nostalgia_jax.data.splits import TaskSplit

AUGMENTATIONS = ("none", "translate", "translate_flip")


class _TaskView:
  """A random-access view of one task: selected indices, local labels."""

  def __init__(self, source, indices: np.ndarray, label_map: np.ndarray):
    self._source = source
    self._indices = np.asarray(indices)
    self._label_map = label_map

  def __len__(self):
    return len(self._indices)

  def __getitem__(self, index):
    record = self._source[int(self._indices[index])]
    return {"image": record["image"],
            "label": self._label_map[record["label"]]}


def _host_shard(indices: np.ndarray) -> np.ndarray:
  return indices[jax.process_index()::jax.process_count()]


def normalize(record):
  """uint8 pixels -> float32 in [-1, 1] (the range ViT checkpoints expect)."""
  image = record["image"].astype(np.float32) / 127.5 - 1.0
  return {"image": image, "label": np.int32(record["label"])}


def make_augmentation(name: str, pad: int):
  """A `random_map` function for augmentation `name` (see AUGMENTATIONS)."""
  if name not in AUGMENTATIONS:
    raise ValueError(f"config.data.augment={name!r}; allowed: {AUGMENTATIONS}.")

  def augment(record, rng: np.random.Generator):
    image = record["image"]
    if name.startswith("translate") and pad > 0:
      # Random translation by up to `pad` pixels, filling with the
      # background (0): pad, then crop a window of the original size.
      h, w = image.shape[:2]
      padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
      dy, dx = rng.integers(0, 2 * pad + 1, size=2)
      image = padded[dy:dy + h, dx:dx + w]
    if name.endswith("flip") and rng.random() < 0.5:
      image = image[:, ::-1]
    return {"image": image, "label": record["label"]}

  return augment


def train_dataset(source, split: TaskSplit, *, num_classes_total: int,
                  batch_size: int, seed: int, augment: str = "none",
                  pad: int = 1) -> grain.MapDataset:
  """Shuffled, augmented, endlessly repeated batches of one task.

  Returns a `grain.MapDataset` whose element `i` is training batch `i`
  (a new permutation every epoch), so the batch at any step can be
  recomputed exactly, which makes the data position trivially resumable.

  Args:
    source: a random-access source of the training records.
    split: the task's split (its `train_indices` are used).
    num_classes_total: number of classes of the dataset.
    batch_size: per-host batch size.
    seed: seeds the order and the augmentation.
    augment: one of AUGMENTATIONS.
    pad: maximum translation in pixels for the 'translate' augmentations.
  """
  indices = _host_shard(split.train_indices)
  if len(indices) < batch_size:
    raise ValueError(
        f"task {split.task} has {len(indices)} training examples on this host, "
        f"fewer than the per-host batch size {batch_size}: lower "
        "config.train.batch_size.")
  view = _TaskView(source, indices, split.label_map(num_classes_total))
  return (grain.MapDataset.source(view).seed(seed).shuffle().repeat()
          .random_map(make_augmentation(augment, pad)).map(normalize)
          .batch(batch_size, drop_remainder=True))


def eval_batches(source, split: TaskSplit, *, num_classes_total: int,
                 batch_size: int) -> Iterator[dict]:
  """One pass over the task's test examples in fixed-size, masked batches.

  The last batch is padded to `batch_size` (so evaluation compiles once) and
  carries `mask` = 0 on the padding. Every host yields the same number of
  batches (hosts with a shorter shard yield fully masked ones), since each
  batch is one collective step across hosts.
  """
  indices = _host_shard(split.test_indices)
  largest_shard = -(-len(split.test_indices) // jax.process_count())
  num_batches = -(-largest_shard // batch_size)
  view = _TaskView(source, indices, split.label_map(num_classes_total))
  dataset = grain.MapDataset.source(view).map(normalize).batch(
      batch_size, drop_remainder=False)
  image_shape = source[0]["image"].shape
  for i in range(num_batches):
    if i < len(dataset):
      batch = dataset[i]
    else:
      batch = {"image": np.zeros((0,) + image_shape, np.float32),
               "label": np.zeros((0,), np.int32)}
    n = len(batch["label"])
    pad = batch_size - n
    yield {
        "image": np.pad(batch["image"], ((0, pad),) + ((0, 0),) * 3),
        "label": np.pad(batch["label"], (0, pad)),
        "mask": np.concatenate([np.ones(n, np.float32),
                                np.zeros(pad, np.float32)]),
    }


def task_examples(source, split: TaskSplit, *, num_classes_total: int,
                  num_examples: int, seed: int) -> dict:
  """A fixed random subset of a task's training examples, un-augmented.

  For the after-task computations (curvature batches, EWC Fisher), which
  need a fixed operator: no augmentation, the same examples on every host.

  Returns:
    {'image': float32 (n, H, W, C) in [-1, 1], 'label': int32 (n,)} with
    n = min(num_examples, number of training examples of the task).
  """
  order = np.random.default_rng(seed).permutation(len(split.train_indices))
  chosen = split.train_indices[np.sort(order[:num_examples])]
  view = _TaskView(source, chosen, split.label_map(num_classes_total))
  records = [normalize(view[i]) for i in range(len(view))]
  return {"image": np.stack([r["image"] for r in records]),
          "label": np.stack([r["label"] for r in records])}
