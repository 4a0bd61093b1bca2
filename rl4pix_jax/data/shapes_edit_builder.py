"""tfds builder of the synthetic "shapes edit" dataset (array_record, no TensorFlow needed).

Build with ``python -m launch.prepare_data --dataset=shapes_edit --data_dir=DIR``, or::

  builder = ShapesEdit(config=shapes_edit_config(64, 2000, 200, 200), data_dir=DIR,
                       file_format="array_record")
  builder.download_and_prepare()

Split ``s`` (train 0, validation 1, test 2) of a config with seed ``seed`` holds
``shapes.make_example(3 * seed + s, i, resolution)`` for ``i`` in ``range(size)``.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from rl4pix_jax.data import record_features
from rl4pix_jax.data import shapes

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(eq=False)
class ShapesEditConfig(tfds.core.BuilderConfig):
  """Resolution (pixels), split sizes (examples) and seed of a shapes_edit build."""
  resolution: int = 64
  train_size: int = 2000
  validation_size: int = 200
  test_size: int = 200
  seed: int = 0


def split_seed(seed: int, split: str) -> int:
  """The ``shapes.make_example`` seed of ``split`` in the dataset with ``seed``: 3 seed + s.

  Dataset seeds 0, 1, 2 ... thus never share a scene stream; example ``i`` of a split is
  ``make_example(split_seed(seed, split), i)`` whatever the split's size.
  """
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
  return 3 * seed + SPLITS.index(split)


def shapes_edit_config(resolution: int = 64, train_size: int = 2000,
                       validation_size: int = 200, test_size: int = 200,
                       seed: int = 0) -> ShapesEditConfig:
  """A config named ``r{res}_train{n}_val{n}_test{n}_seed{seed}`` (its folder under data_dir)."""
  for label, size in (("train_size", train_size), ("validation_size", validation_size),
                      ("test_size", test_size)):
    if size < 0:
      raise ValueError(f"{label} must be >= 0, got {size}.")
  if resolution < 8:
    raise ValueError(f"resolution must be >= 8 pixels, got {resolution}.")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}.")
  name = f"r{resolution}_train{train_size}_val{validation_size}_test{test_size}_seed{seed}"
  return ShapesEditConfig(
      name=name, description=f"{resolution}x{resolution} shapes edits, seed {seed}.",
      resolution=resolution, train_size=train_size, validation_size=validation_size,
      test_size=test_size, seed=seed)


class ShapesEdit(tfds.core.GeneratorBasedBuilder):
  """Synthetic shapes edits with exact masks (see ``rl4pix_jax.data.shapes``)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [shapes_edit_config(r) for r in (32, 64, 128, 256)]
  DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[1].name

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=record_features.record_features(),
        description=("Procedural scenes of coloured shapes with one edit each (replacement, "
                     "removal, insertion, transformation), instruction, object phrase, exact "
                     "edit mask and captions."),
        homepage="https://github.com/rl4pix-jax",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    sizes = (config.train_size, config.validation_size, config.test_size)
    return {split: self._generate_examples(split_seed(config.seed, split), size)
            for split, size in zip(SPLITS, sizes) if size > 0}

  def _generate_examples(self, split_seed: int, size: int):
    resolution = self.builder_config.resolution
    for index in range(size):
      example = shapes.make_example(split_seed, index, resolution)
      yield example.example_id, shapes.example_to_record(example)


def make_builder(data_dir: str, resolution: int = 64, train_size: int = 2000,
                 validation_size: int = 200, test_size: int = 200,
                 seed: int = 0) -> ShapesEdit:
  """A ``ShapesEdit`` builder (array_record) for these settings, writing under ``data_dir``.

  The predefined configs are used by name (tfds rejects a custom config with a predefined
  config's name); other settings get a custom config of the same naming scheme.
  """
  config = shapes_edit_config(resolution, train_size, validation_size, test_size, seed)
  predefined = {c.name for c in ShapesEdit.BUILDER_CONFIGS}
  return ShapesEdit(config=config.name if config.name in predefined else config,
                    data_dir=data_dir, file_format="array_record")
