r"""Prepares a dataset (tfds, array_record) and/or writes a preview grid of shapes edits.

  python -m launch.prepare_data --dataset=shapes_edit --data_dir=~/tensorflow_datasets \
      --resolution=64 --train_size=2000 --validation_size=200 --test_size=200
  python -m launch.prepare_data --dataset=shapes_edit --preview=docs/shapes_examples.png
  python -m launch.prepare_data --dataset=magicbrush --data_dir=DIR --magicbrush_dir=PARQUETS
  python -m launch.prepare_data --dataset=magicbrush --data_dir=DIR --magicbrush_dir=DL \
      --download   # fetches osunlp/MagicBrush with huggingface_hub (needs network)
"""

from __future__ import annotations

import os
import tempfile

from absl import app
from absl import flags
from absl import logging

from launch import cli

_DATASET = flags.DEFINE_enum("dataset", "shapes_edit", ["shapes_edit", "magicbrush"],
                             "Which dataset to prepare.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir to write the dataset into.")
_RESOLUTION = flags.DEFINE_integer("resolution", 64, "shapes_edit image side in pixels.")
_TRAIN_SIZE = flags.DEFINE_integer("train_size", 2000, "shapes_edit train examples.")
_VALIDATION_SIZE = flags.DEFINE_integer("validation_size", 200, "shapes_edit validation size.")
_TEST_SIZE = flags.DEFINE_integer("test_size", 200, "shapes_edit test examples.")
_SEED = flags.DEFINE_integer("seed", 0, "shapes_edit dataset seed.")
_MAGICBRUSH_DIR = flags.DEFINE_string("magicbrush_dir", None,
                                      "Folder with the MagicBrush parquet shards.")
_DOWNLOAD = flags.DEFINE_bool("download", False,
                              "Download MagicBrush into --magicbrush_dir with huggingface_hub.")
_SKIP_BAD = flags.DEFINE_bool("skip_bad_records", False,
                              "MagicBrush: skip and count bad rows instead of failing.")
_PREVIEW = flags.DEFINE_string("preview", None,
                               "shapes_edit: write a PNG grid of example edits to this path.")


def prepare_shapes_edit(data_dir: str, resolution: int, train_size: int, validation_size: int,
                        test_size: int, seed: int) -> str:
  """Builds shapes_edit into ``data_dir``; returns the dataset folder."""
  from rl4pix_jax.data import shapes_edit_builder

  builder = shapes_edit_builder.make_builder(data_dir, resolution, train_size, validation_size,
                                             test_size, seed)
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


def prepare_magicbrush(data_dir: str, parquet_dir: str, skip_bad_records: bool,
                       download: bool = False) -> str:
  """Builds magicbrush from local parquet shards (downloading them first if asked)."""
  import tensorflow_datasets as tfds
  from rl4pix_jax.data import magicbrush_builder

  if download:  # pragma: no cover - needs network
    magicbrush_builder.download_parquet_shards(parquet_dir)
  builder = magicbrush_builder.Magicbrush(
      config="skip_bad" if skip_bad_records else "default", data_dir=data_dir,
      file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=parquet_dir))
  logging.info("Skipped records: %s", builder.info.metadata.get("skipped_records"))
  return os.fspath(builder.data_dir)


def remove_empty_folders(folder: str) -> None:
  """Removes ``folder`` and its empty sub-folders (tfds' leftovers); keeps anything non-empty."""
  for name in os.listdir(folder):
    path = os.path.join(folder, name)
    if os.path.isdir(path) and not os.listdir(path):
      os.rmdir(path)
  if not os.listdir(folder):
    os.rmdir(folder)


def main(argv):
  del argv
  if _PREVIEW.value:
    if _DATASET.value != "shapes_edit":
      raise app.UsageError("--preview is only available for --dataset=shapes_edit.")
    from rl4pix_jax.data import preview

    os.makedirs(os.path.dirname(os.path.abspath(_PREVIEW.value)), exist_ok=True)
    preview.shapes_preview(seed=_SEED.value, resolution=_RESOLUTION.value).save(_PREVIEW.value)
    print(f"Wrote {_PREVIEW.value}")
  if _DATA_DIR.value is None:
    if not _PREVIEW.value:
      raise app.UsageError("Pass --data_dir (to build the dataset) and/or --preview.")
    return
  data_dir = os.path.expanduser(_DATA_DIR.value)
  # tfds leaves empty tmp*tfds folders in TMPDIR; keep them next to the data.
  scratch = os.path.join(data_dir, "tmp")
  os.makedirs(scratch, exist_ok=True)
  os.environ["TMPDIR"] = scratch
  tempfile.tempdir = scratch
  if _DATASET.value == "shapes_edit":
    folder = prepare_shapes_edit(data_dir, _RESOLUTION.value, _TRAIN_SIZE.value,
                                 _VALIDATION_SIZE.value, _TEST_SIZE.value, _SEED.value)
  else:
    if not _MAGICBRUSH_DIR.value:
      raise app.UsageError("--dataset=magicbrush needs --magicbrush_dir (parquet folder).")
    folder = prepare_magicbrush(data_dir, os.path.expanduser(_MAGICBRUSH_DIR.value),
                                _SKIP_BAD.value, _DOWNLOAD.value)
  remove_empty_folders(scratch)
  print(f"Prepared {_DATASET.value} in {folder}")


if __name__ == "__main__":
  cli.run(main)
