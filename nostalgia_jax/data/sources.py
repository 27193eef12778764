"""Random-access data sources: records {'image': uint8 (H, W, 3), 'label': int}.

Every dataset (the embedded digits now; ImageNet folders and TFDS later)
is served as a pair of `grain` random-access sources (train and test) that
also expose their label array, so task splits are made without decoding.
"""

from __future__ import annotations

import dataclasses

import numpy as np

DATASETS = ("digits",)


class ArraySource:
  """A grain `RandomAccessDataSource` over in-memory arrays."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 (N, H, W, 3), got "
                       f"{images.dtype} {images.shape}.")
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    self._images = images
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index):
    return {"image": self._images[index], "label": self.labels[index]}

  def __repr__(self):
    return f"ArraySource(n={len(self)}, image_shape={self._images.shape[1:]})"


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and test sources of one dataset and what the model must know."""
  train: ArraySource
  test: ArraySource
  num_classes: int
  image_shape: tuple[int, int, int]


def load_digits(test_fraction: float, split_seed: int) -> Dataset:
  """scikit-learn's 1797 8x8 handwritten digits (shipped with the package).

  Pixel values 0..16 are scaled to 0..255 and replicated to 3 channels so
  the digits flow through the same RGB pipeline as natural images. The
  train/test split is stratified per class and fixed by `split_seed`.
  """
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top

  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"config.data.test_fraction={test_fraction}; it must be "
                     "in (0, 1), e.g. 0.25.")
  digits = sk_datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  images = np.repeat(images[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)
  train_idx, test_idx = model_selection.train_test_split(
      np.arange(len(labels)), test_size=test_fraction, stratify=labels,
      random_state=split_seed)
  train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
  return Dataset(train=ArraySource(images[train_idx], labels[train_idx]),
                 test=ArraySource(images[test_idx], labels[test_idx]),
                 num_classes=10, image_shape=images.shape[1:])


def load_dataset(data_config) -> Dataset:
  """The dataset named by `config.data.name`."""
  if data_config.name == "digits":
    return load_digits(data_config.test_fraction, data_config.split_seed)
  raise ValueError(f"config.data.name={data_config.name!r}; allowed: {DATASETS}.")
