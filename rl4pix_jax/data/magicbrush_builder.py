"""tfds builder of MagicBrush from its official parquet shards (array_record, no TensorFlow).

Input: a folder holding the HF dataset ``osunlp/MagicBrush`` parquet files (any depth), named
``<split>-NNNNN-of-NNNNN.parquet`` with split ``train`` or ``dev`` (stored as ``validation``;
the hub has only these two: MagicBrush ships its test set as a separate zip, so a ``test`` split
needs ``test-NNNNN-of-NNNNN.parquet`` shards with the same columns),
columns ``img_id`` (str), ``turn_index`` (int), ``source_img``/``mask_img``/``target_img``
(``{"bytes": ..., "path": ...}`` structs) and ``instruction`` (str). Pass the folder as the
tfds manual dir::

  builder = Magicbrush(data_dir=DIR, file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=PARQUET_FOLDER))

Conversions into ``records.RECORD_FIELDS``:

* Mask: the dataset card defines ``mask_img`` as a free-form mask whose *white* region limits
  the edit. A pixel is in the edit region when all of its RGB channels are >= ``WHITE_LEVEL``
  (transparent pixels count as white); it is stored as a greyscale PNG with 255 = edit region.
  A mask of another size than the source image is a bad record.
* ``object_phrase``: the column ``object_phrase`` when present and non-empty, else
  ``object_phrase.extract_object_phrase(instruction)``; ``task``: column ``task`` (a name of
  ``records.TASKS``) when present, else ``object_phrase.classify_task``.
* Captions: columns ``source_caption``/``target_caption`` when present; else the target
  caption is the instruction and the source caption is "".
* ``example_id`` = ``"{img_id}-{turn_index}"``; images keep their original encoding.

Bad records (corrupt image, missing field, empty instruction, wrong mask size, phrase not in
the instruction) raise ``records.RecordError`` naming the parquet file, row and field, unless
the config has ``skip_bad_records=True``: then they are skipped, logged, and counted in
``builder.info.metadata["skipped_records"]`` per split. A shard that is not a readable parquet
file, or lacks a required column, raises ``records.DataFileError`` naming it
(``check_parquet_file`` checks one before a build starts).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Dict, Iterator, Mapping, Tuple

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from rl4pix_jax.data import object_phrase
from rl4pix_jax.data import record_features
from rl4pix_jax.data import records

WHITE_LEVEL = 250
REQUIRED_COLUMNS = ("img_id", "turn_index", "source_img", "mask_img", "instruction",
                    "target_img")
OPTIONAL_COLUMNS = ("object_phrase", "task", "source_caption", "target_caption")
SPLIT_NAMES = {"train": "train", "dev": "validation", "validation": "validation",
               "test": "test"}
HF_REPO_ID = "osunlp/MagicBrush"
# The end of a bad row's error when the build stops at it.
SKIP_FIX = ("Fix or remove the row, or rerun launch.prepare_data with --skip_bad_records to "
            "skip and count bad rows.")
_SHARD_NAME = re.compile(r"^(?P<split>[a-z]+)-\d+-of-\d+\.parquet$")


@dataclasses.dataclass(eq=False)
class MagicbrushConfig(tfds.core.BuilderConfig):
  """``skip_bad_records``: skip and count bad rows instead of stopping the build."""
  skip_bad_records: bool = False


def find_parquet_shards(folder: str) -> Dict[str, list]:
  """Split name -> sorted parquet files under ``folder`` (recursively).

  Raises:
    ValueError: no file named ``<split>-NNNNN-of-NNNNN.parquet`` under the folder.
  """
  shards: Dict[str, list] = {}
  for path in sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True)):
    match = _SHARD_NAME.match(os.path.basename(path))
    if match and match.group("split") in SPLIT_NAMES:
      shards.setdefault(SPLIT_NAMES[match.group("split")], []).append(path)
  if not shards:
    raise ValueError(f"No MagicBrush parquet shards under {folder!r}: expected files named "
                     "like train-00000-of-00051.parquet or dev-00000-of-00004.parquet.")
  return shards


def mask_from_magicbrush(image: np.ndarray) -> np.ndarray:
  """MagicBrush mask (white = edit region) -> (H, W) uint8 with 255 = edit region.

  Args:
    image: (H, W, 3) uint8 RGB (transparency already composited over white).
  """
  return np.where(np.all(image >= WHITE_LEVEL, axis=-1), 255, 0).astype(np.uint8)


def _image_bytes(value, name: str, field: str) -> bytes:
  if isinstance(value, Mapping):
    value = value.get("bytes")
  if not isinstance(value, (bytes, bytearray)) or not value:
    raise records.RecordError(name, field, "expected an image struct with non-empty 'bytes'.")
  return bytes(value)


def magicbrush_record(row: Mapping, name: str) -> Tuple[str, dict]:
  """Converts one parquet row (dict of column values) to (key, stored record).

  Raises:
    records.RecordError: naming ``name`` and the bad field.
  """
  for column in REQUIRED_COLUMNS:
    if row.get(column) is None:
      raise records.RecordError(name, column, f"missing; the row has {sorted(row)}.")
  example_id = f"{row['img_id']}-{int(row['turn_index'])}"
  name = f"{name} (id {example_id!r})"
  source_bytes = _image_bytes(row["source_img"], name, "source_img")
  target_bytes = _image_bytes(row["target_img"], name, "target_img")
  source = records.decode_image(source_bytes, name, "source_img")
  records.decode_image(target_bytes, name, "target_img")
  mask = records.decode_image(_image_bytes(row["mask_img"], name, "mask_img"), name, "mask_img")
  if mask.shape != source.shape:
    raise records.RecordError(name, "mask_img", f"has size {mask.shape[:2]} (H, W) but the "
                              f"source image is {source.shape[:2]}; expected equal sizes.")
  instruction = records.check_text(row["instruction"], name, "instruction")
  phrase = records.as_text(row.get("object_phrase") or "").strip()
  phrase = phrase or object_phrase.extract_object_phrase(instruction)
  records.check_phrase(instruction, phrase, name)
  task = records.as_text(row.get("task") or "").strip() or object_phrase.classify_task(
      instruction)
  if task not in records.TASKS:
    raise records.RecordError(name, "task", f"{task!r} is not one of {records.TASKS}.")
  return example_id, {
      "example_id": example_id,
      "source_image": source_bytes,
      "target_image": target_bytes,
      "mask_image": records.encode_png(mask_from_magicbrush(mask)),
      "instruction": instruction,
      "object_phrase": phrase,
      "source_caption": records.as_text(row.get("source_caption") or "").strip(),
      "target_caption": records.as_text(row.get("target_caption") or "").strip() or instruction,
      "task": records.TASKS.index(task),
      "description": "",
  }


def check_parquet_file(path: str):
  """The opened ``pyarrow.parquet.ParquetFile`` of a shard with every required column.

  Raises:
    records.DataFileError: not a readable parquet file, or a required column is missing.
  """
  import pyarrow.parquet as pq  # local import: only the MagicBrush build needs pyarrow

  try:
    parquet = pq.ParquetFile(path)
    names = set(parquet.schema_arrow.names)
  except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for non-parquet data
    raise records.DataFileError(
        f"{path}: not a readable parquet file ({type(e).__name__}: {e}); replace it with the "
        "shard from osunlp/MagicBrush, or move it out of the folder.") from None
  missing = [c for c in REQUIRED_COLUMNS if c not in names]
  if missing:
    raise records.DataFileError(
        f"{path}: lacks the MagicBrush column(s) {missing} (it has {sorted(names)}); expected "
        f"the osunlp/MagicBrush columns {list(REQUIRED_COLUMNS)}.")
  return parquet


def read_parquet_rows(path: str, batch_size: int = 16) -> Iterator[dict]:
  """Rows of one parquet file as dicts (read in small batches to bound memory)."""
  parquet = check_parquet_file(path)
  names = set(parquet.schema_arrow.names)
  columns = [c for c in REQUIRED_COLUMNS + OPTIONAL_COLUMNS if c in names]
  for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
    yield from batch.to_pylist()


def download_parquet_shards(folder: str) -> str:  # pragma: no cover - needs network
  """Downloads the MagicBrush parquet shards with huggingface_hub into ``folder``."""
  from huggingface_hub import snapshot_download

  return snapshot_download(repo_id=HF_REPO_ID, repo_type="dataset", local_dir=folder,
                           allow_patterns=["*.parquet", "README.md"])


class Magicbrush(tfds.core.GeneratorBasedBuilder):
  """MagicBrush (Zhang et al. 2023) edit turns in the shared record format."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [MagicbrushConfig(name="default"),
                     MagicbrushConfig(name="skip_bad", skip_bad_records=True)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the osunlp/MagicBrush parquet shards (train-*.parquet, dev-*.parquet) in the manual "
      "dir, e.g. with `python -m launch.prepare_data --dataset=magicbrush --download`.")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=record_features.record_features(),
        description="MagicBrush instruction-guided edits with masks (CC BY 4.0).",
        homepage="https://osu-nlp-group.github.io/MagicBrush",
        metadata=tfds.core.MetadataDict(skipped_records={}),
    )

  def _split_generators(self, dl_manager):
    shards = find_parquet_shards(os.fspath(dl_manager.manual_dir))
    return {split: self._generate_examples(split, paths) for split, paths in shards.items()}

  def _generate_examples(self, split: str, paths):
    skip = self.builder_config.skip_bad_records
    skipped = 0
    for path in paths:
      for row_index, row in enumerate(read_parquet_rows(path)):
        name = f"{os.path.basename(path)} row {row_index}"
        try:
          key, record = magicbrush_record(row, name)
        except records.RecordError as e:
          if not skip:
            raise e.with_fix(SKIP_FIX) from None
          skipped += 1
          logging.warning("Skipping bad MagicBrush record: %s", e)
          continue
        yield key, record
    self.info.metadata["skipped_records"][split] = skipped
