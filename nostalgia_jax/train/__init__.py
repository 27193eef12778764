"""Training: pure steps, the task loop, checkpoints, metrics and reports."""

from nostalgia_jax.train.loop import train_and_evaluate
