"""Data: sources (records of uint8 images and labels), label-disjoint task
splits, and the grain pipelines that serve one task."""

from nostalgia_jax.data.pipeline import eval_batches, train_dataset
from nostalgia_jax.data.sources import Dataset, load_dataset
from nostalgia_jax.data.splits import TaskSplit, make_task_splits
