r"""Prepares a dataset (tfds, array_record) and/or writes a preview grid of shapes edits.

  python -m launch.prepare_data --dataset=shapes_edit --data_dir=~/tensorflow_datasets \
      --resolution=32 --train_size=2000 --validation_size=200 --test_size=200
  python -m launch.prepare_data --dataset=shapes_edit --preview=docs/shapes_examples.png
  python -m launch.prepare_data --dataset=magicbrush --data_dir=DIR --magicbrush_dir=PARQUETS
  python -m launch.prepare_data --dataset=magicbrush --data_dir=DIR --magicbrush_dir=DL \
      --download   # fetches osunlp/MagicBrush with huggingface_hub (needs network)

shapes_edit's defaults (resolution, split sizes, seed) are those of the default run,
configs/shapes.py, so a dataset prepared without flags is the one ``launch.train`` reads. A size
of 0 leaves that split out (e.g. a held-out test set: --train_size=0 --validation_size=0).
Every flag and the MagicBrush parquet shards (names, readability, columns) are checked before
anything is written; a bad row stops the build with a line naming the file, row and field
(--skip_bad_records skips and counts bad rows instead).
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging

from configs import shapes as shapes_config
from launch import cli

_DEFAULT = shapes_config.get_config()  # one default in one place: the default run's config
_DATASET = flags.DEFINE_enum("dataset", "shapes_edit", ["shapes_edit", "magicbrush"],
                             "Which dataset to prepare.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data_dir to write the dataset into.")
_RESOLUTION = flags.DEFINE_integer("resolution", _DEFAULT.resolution,
                                   "shapes_edit image side in pixels (default: configs/shapes.py "
                                   "resolution, the default run's).")
_TRAIN_SIZE = flags.DEFINE_integer("train_size", _DEFAULT.data.train_size,
                                   "shapes_edit train examples (0: no train split).")
_VALIDATION_SIZE = flags.DEFINE_integer("validation_size", _DEFAULT.data.validation_size,
                                        "shapes_edit validation examples (0: no split).")
_TEST_SIZE = flags.DEFINE_integer("test_size", _DEFAULT.data.test_size,
                                  "shapes_edit test examples (0: no test split).")
_SEED = flags.DEFINE_integer("seed", _DEFAULT.seed, "shapes_edit dataset seed.")
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


def _paths_under(data_dir: str, names) -> set:
  """Every file and folder path under ``data_dir/<name>`` for each of ``names``."""
  found = set()
  for name in names:
    for root, dirs, files in os.walk(os.path.join(data_dir, name)):
      found.add(root)
      found.update(os.path.join(root, n) for n in dirs + files)
  return found


def remove_new_paths(data_dir: str, names, before: set) -> None:
  """After a failed build: removes what it created under ``data_dir/<name>`` (paths absent
  from ``before``; folders only once empty), so the data folder is as it was."""
  for path in sorted(_paths_under(data_dir, names) - before, key=len, reverse=True):
    if os.path.isdir(path) and not os.path.islink(path):
      if not os.listdir(path):
        os.rmdir(path)
    elif os.path.lexists(path):
      os.remove(path)


def remove_empty_folders(folder: str) -> None:
  """Removes ``folder`` and its empty sub-folders (tfds' leftovers); keeps anything non-empty."""
  for name in os.listdir(folder):
    path = os.path.join(folder, name)
    if os.path.isdir(path) and not os.listdir(path):
      os.rmdir(path)
  if not os.listdir(folder):
    os.rmdir(folder)


def check_flags() -> None:
  """A UsageError naming the first flag that cannot work; runs before anything is written."""
  if _DATASET.value == "shapes_edit":
    if _RESOLUTION.value < 8:
      raise app.UsageError(f"--resolution={_RESOLUTION.value}: must be >= 8 pixels; e.g. "
                           f"--resolution={_DEFAULT.resolution}.")
    if _SEED.value < 0:
      raise app.UsageError(f"--seed={_SEED.value}: must be >= 0; e.g. --seed=0.")
    sizes = {"train_size": _TRAIN_SIZE.value, "validation_size": _VALIDATION_SIZE.value,
             "test_size": _TEST_SIZE.value}
    for name, value in sizes.items():
      if value < 0:
        raise app.UsageError(f"--{name}={value}: must be >= 0 (0 leaves the split out); e.g. "
                             f"--{name}={_DEFAULT.data[name]}.")
    if _DATA_DIR.value is not None and not any(sizes.values()):
      raise app.UsageError(" ".join(f"--{k}=0" for k in sizes) + ": nothing to build; give "
                           f"at least one split examples, e.g. --train_size="
                           f"{_DEFAULT.data.train_size}.")
  elif _DATA_DIR.value is not None:
    if not _MAGICBRUSH_DIR.value:
      raise app.UsageError("--dataset=magicbrush needs --magicbrush_dir=<folder of the "
                           "osunlp/MagicBrush parquet shards> (add --download to fetch them).")
    if not _DOWNLOAD.value:
      check_magicbrush_dir(os.path.expanduser(_MAGICBRUSH_DIR.value))


def check_magicbrush_dir(folder: str) -> None:
  """The shards of ``folder`` can be built: a UsageError when there are none, a
  ``records.DataFileError`` naming an unreadable one (checked before tfds writes anything)."""
  from rl4pix_jax.data import magicbrush_builder  # pylint: disable=import-outside-toplevel
  flag = f"--magicbrush_dir={_MAGICBRUSH_DIR.value}"
  if not os.path.isdir(folder):
    raise app.UsageError(f"{flag}: no such folder; put the osunlp/MagicBrush parquet shards "
                         "there, or add --download to fetch them.")
  try:
    shards = magicbrush_builder.find_parquet_shards(folder)
  except ValueError as e:
    raise app.UsageError(f"{flag}: {e} Put the osunlp/MagicBrush parquet shards there, or add "
                         "--download to fetch them.") from None
  for paths in shards.values():
    for path in paths:
      magicbrush_builder.check_parquet_file(path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _PREVIEW.value and _DATASET.value != "shapes_edit":
    raise app.UsageError("--preview is only available for --dataset=shapes_edit.")
  if _DATA_DIR.value is None and not _PREVIEW.value:
    raise app.UsageError("Pass --data_dir (to build the dataset) and/or --preview.")
  check_flags()
  if _PREVIEW.value:
    from rl4pix_jax.data import preview  # pylint: disable=import-outside-toplevel

    os.makedirs(os.path.dirname(os.path.abspath(_PREVIEW.value)), exist_ok=True)
    preview.shapes_preview(seed=_SEED.value, resolution=_RESOLUTION.value).save(_PREVIEW.value)
    print(f"Wrote {_PREVIEW.value}")
  if _DATA_DIR.value is None:
    return
  data_dir = os.path.expanduser(_DATA_DIR.value)
  if _DATASET.value == "shapes_edit" and _TRAIN_SIZE.value == 0:
    print("note: --train_size=0: the dataset has no train split (evaluation only; "
          "launch.train needs one).")
  made_data_dir = not os.path.exists(data_dir)
  touched = (_DATASET.value, "downloads", "tmp")  # what tfds writes into the data_dir
  before = _paths_under(data_dir, touched)
  # tfds leaves empty tmp*tfds folders in TMPDIR; keep them next to the data (for the build).
  scratch = os.path.join(data_dir, "tmp")
  from rl4pix_jax.workdir import datasets  # pylint: disable=import-outside-toplevel
  try:
    with datasets.tmpdir_at(scratch):
      if _DATASET.value == "shapes_edit":
        folder = prepare_shapes_edit(data_dir, _RESOLUTION.value, _TRAIN_SIZE.value,
                                     _VALIDATION_SIZE.value, _TEST_SIZE.value, _SEED.value)
      else:
        folder = prepare_magicbrush(data_dir, os.path.expanduser(_MAGICBRUSH_DIR.value),
                                    _SKIP_BAD.value, _DOWNLOAD.value)
  except BaseException:
    remove_new_paths(data_dir, touched, before)  # a failed build leaves the folder as it was
    if made_data_dir and not os.listdir(data_dir):
      os.rmdir(data_dir)
    raise
  remove_empty_folders(scratch)
  print(f"Prepared {_DATASET.value} in {folder}")


if __name__ == "__main__":
  cli.run(main)
