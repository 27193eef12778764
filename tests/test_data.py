"""Embedded digits, label-disjoint task splits and the grain pipelines."""

import numpy as np
import pytest

from nostalgia_jax.data import eval_batches, make_task_splits, train_dataset
from nostalgia_jax.data.pipeline import make_augmentation
from nostalgia_jax.data.sources import ArraySource, load_digits


@pytest.fixture(scope="module")
def digits():
  return load_digits(test_fraction=0.25, split_seed=0)


def _splits(dataset, num_tasks=5, order="fixed", seed=0):
  return make_task_splits(dataset.train.labels, dataset.test.labels,
                          num_classes=dataset.num_classes, num_tasks=num_tasks,
                          order=order, seed=seed)


def test_digits_source(digits):
  assert len(digits.train) + len(digits.test) == 1797
  record = digits.train[0]
  assert record["image"].shape == (8, 8, 3) and record["image"].dtype == np.uint8
  assert record["image"].max() <= 255
  # Stratified: every class is in both splits with ~25% in test.
  for c in range(10):
    n_train = np.sum(digits.train.labels == c)
    n_test = np.sum(digits.test.labels == c)
    assert abs(n_test / (n_train + n_test) - 0.25) < 0.02
  again = load_digits(test_fraction=0.25, split_seed=0)
  np.testing.assert_array_equal(again.test.labels, digits.test.labels)


@pytest.mark.parametrize("order", ["fixed", "seeded"])
def test_splits_disjoint_complete_deterministic(digits, order):
  splits = _splits(digits, order=order, seed=3)
  classes = [c for s in splits for c in s.classes]
  assert sorted(classes) == list(range(10))           # complete, disjoint
  assert all(s.num_classes == 2 for s in splits)
  for name in ("train", "test"):
    source = getattr(digits, name)
    indices = np.concatenate([getattr(s, f"{name}_indices") for s in splits])
    assert sorted(indices) == list(range(len(source)))  # every example once
    for s in splits:
      labels = source.labels[getattr(s, f"{name}_indices")]
      assert set(labels) == set(s.classes)
  again = _splits(digits, order=order, seed=3)
  for a, b in zip(splits, again):
    assert a.classes == b.classes
    np.testing.assert_array_equal(a.train_indices, b.train_indices)
  if order == "fixed":
    assert [s.classes for s in splits] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
  else:
    other = _splits(digits, order=order, seed=4)
    assert [s.classes for s in other] != [s.classes for s in splits]


def test_uneven_split_and_errors(digits):
  splits = _splits(digits, num_tasks=3)
  assert [s.num_classes for s in splits] == [4, 3, 3]
  with pytest.raises(ValueError, match="num_tasks must be in"):
    _splits(digits, num_tasks=6)
  with pytest.raises(ValueError, match="allowed"):
    _splits(digits, order="random")


def test_label_remap(digits):
  split = _splits(digits)[2]                           # classes (4, 5)
  table = split.label_map(10)
  assert table[4] == 0 and table[5] == 1 and table[0] == -1


def test_train_pipeline_batches_and_determinism(digits):
  split = _splits(digits)[1]
  make = lambda seed: train_dataset(digits.train, split, num_classes_total=10,
                                    batch_size=16, seed=seed, augment="translate")
  ds = make(0)
  batch = ds[0]
  assert batch["image"].shape == (16, 8, 8, 3) and batch["image"].dtype == np.float32
  assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
  assert set(np.unique(batch["label"])) <= {0, 1}
  # Same seed -> same batches (order and augmentation); other seed differs.
  for i in (0, 7, 40):                                # 40 is past one epoch
    np.testing.assert_array_equal(make(0)[i]["image"], ds[i]["image"])
  assert not np.array_equal(make(1)[0]["image"], ds[0]["image"])
  # One epoch visits every training example of the task once.
  epoch = len(split.train_indices) // 16
  labels = np.concatenate([ds[i]["label"] for i in range(epoch)])
  assert len(labels) == epoch * 16
  with pytest.raises(ValueError, match="lower config.train.batch_size"):
    train_dataset(digits.train, split, num_classes_total=10, batch_size=10_000,
                  seed=0)


def test_translation_augmentation_is_a_shift():
  image = np.zeros((8, 8, 3), np.uint8)
  image[3, 4] = 200
  augment = make_augmentation("translate", pad=1)
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(50):
    out = augment({"image": image, "label": 0}, rng)["image"]
    y, x = np.argwhere(out[..., 0] == 200)[0]
    assert abs(y - 3) <= 1 and abs(x - 4) <= 1 and out.sum() == image.sum()
    seen.add((y, x))
  assert len(seen) > 1
  with pytest.raises(ValueError, match="allowed"):
    make_augmentation("mixup", pad=1)


def test_eval_batches_cover_each_example_once(digits):
  split = _splits(digits)[0]
  batches = list(eval_batches(digits.test, split, num_classes_total=10,
                              batch_size=32))
  assert all(b["image"].shape == (32, 8, 8, 3) for b in batches)
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])[mask > 0]
  assert mask.sum() == len(split.test_indices)
  expected = split.label_map(10)[digits.test.labels[split.test_indices]]
  np.testing.assert_array_equal(labels, expected)


def test_array_source_validates():
  with pytest.raises(ValueError, match="uint8"):
    ArraySource(np.zeros((2, 8, 8, 1), np.uint8), np.zeros(2))
  with pytest.raises(ValueError, match="labels"):
    ArraySource(np.zeros((2, 8, 8, 3), np.uint8), np.zeros(3))
