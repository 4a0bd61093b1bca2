"""``ensure_dataset``: the prepared tfds folder a config names, built on first use (shapes).

The synthetic shapes_edit set is generated locally on first use, so every run and test works
offline; MagicBrush must have been prepared (``launch.prepare_data``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

import ml_collections

from rl4pix_jax.data import loader
from rl4pix_jax.data import shapes_edit_builder
from rl4pix_jax.workdir import files, layout


@contextlib.contextmanager
def tmpdir_at(folder: str) -> Iterator[None]:
  """Points TMPDIR and ``tempfile.tempdir`` at ``folder`` (created) while the block runs, then
  restores both: tfds leaves empty tmp*tfds folders in the temporary directory."""
  os.makedirs(folder, exist_ok=True)
  old_env, old_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
  os.environ["TMPDIR"] = tempfile.tempdir = str(folder)
  try:
    yield
  finally:
    tempfile.tempdir = old_tempdir
    if old_env is None:
      os.environ.pop("TMPDIR", None)
    else:
      os.environ["TMPDIR"] = old_env


def ensure_dataset(config: ml_collections.ConfigDict, stages_root: str) -> str:
  """The folder of the prepared dataset (the one holding dataset_info.json).

  Args:
    config: a run or stage config (``data.dataset``, ``data.data_dir`` and, for shapes_edit,
      the sizes, ``resolution`` and ``seed``).
    stages_root: the stages root; the data lives in ``layout.data_dir(config, stages_root)``.
  Raises:
    ValueError: an unknown dataset, or MagicBrush not prepared (says how).
  """
  root = layout.data_dir(config, stages_root)
  name = config.data.dataset
  if name == "shapes_edit":
    return _ensure_shapes_edit(config, root)
  if name == "magicbrush":
    return loader.find_dataset_dir(root, name, config.data.config_name or None)
  raise ValueError(f"config.data.dataset={name!r}: use 'shapes_edit' or 'magicbrush'.")


def _ensure_shapes_edit(config: ml_collections.ConfigDict, data_dir: str) -> str:
  name = shapes_edit_builder.shapes_edit_config(
      config.resolution, config.data.train_size, config.data.validation_size,
      config.data.test_size, config.seed).name
  try:
    return loader.find_dataset_dir(data_dir, "shapes_edit", name)
  except ValueError:
    pass
  if files.is_remote(data_dir):
    raise ValueError(
        f"No shapes_edit {name} data in {data_dir!r}, and it is generated on local disk only: "
        "pass --config.data.data_dir=<a local folder> (the run folder itself may stay on "
        "gs://), or copy a prepared data folder there.")
  os.makedirs(data_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=data_dir) as scratch:  # tfds leaves tmp folders
    previous = tempfile.tempdir
    tempfile.tempdir = scratch
    try:
      builder = shapes_edit_builder.make_builder(
          data_dir, config.resolution, config.data.train_size, config.data.validation_size,
          config.data.test_size, config.seed)
      builder.download_and_prepare()
    finally:
      tempfile.tempdir = previous
  return loader.find_dataset_dir(data_dir, "shapes_edit", name)
