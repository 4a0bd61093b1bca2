"""The tfds feature spec of the stored record format (``records.RECORD_FIELDS``).

Only features that prepare and read back without TensorFlow are used: encoded images are
stored as scalar object (bytes) tensors, text as ``Text``, the task as an int32 ``Scalar``.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from rl4pix_jax.data import records


def record_features() -> tfds.features.FeaturesDict:
  """FeaturesDict with one feature per field of ``records.RECORD_FIELDS``."""
  features = {}
  for field in records.TEXT_FIELDS:
    features[field] = tfds.features.Text()
  for field in records.IMAGE_FIELDS:
    features[field] = tfds.features.Tensor(shape=(), dtype=np.object_)
  features["task"] = tfds.features.Scalar(dtype=np.int32)
  return tfds.features.FeaturesDict(features)
