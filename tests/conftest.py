"""Shared test set-up: quiet TensorFlow, absl flags usable in-process."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # pylint: disable=g-import-not-at-top

# Libraries that read absl flags (grain's prefetch, clu) need them parsed.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()
