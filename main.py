r"""Continual fine-tuning of a ViT on a sequence of tasks.

  python main.py --config configs/default.py --workdir runs/default
  python main.py --config configs/default.py:tiny --workdir runs/tiny \
      --config.optim.backbone_lr=0.01

Re-running the same command on the same workdir resumes after the last
finished task. This file only parses flags: the logic lives in
`nostalgia_jax.train` so that it can be tested.
"""

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from nostalgia_jax.train import train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:variants]).",
    lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
flags.DEFINE_bool("allow_config_change", False,
                  "Resume a workdir that was written with a different config.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietCheckpointing(std_logging.Filter):
  """Drops orbax's per-save INFO chatter; its warnings and errors pass."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietCheckpointing())
  results = train_and_evaluate(FLAGS.config, FLAGS.workdir,
                               allow_config_change=FLAGS.allow_config_change)
  logging.info("Average accuracy %.4f, backward transfer %s, forgetting %s; "
               "results in %s/results.json", results["average_accuracy"],
               results["backward_transfer"], results["forgetting"], FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
