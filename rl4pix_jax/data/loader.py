"""grain input pipeline: stored edit records -> fixed-shape numpy batches for the trainer.

Pipeline (per process)::

  record indices [process_index::process_count] -> shuffle(seed, reshuffled every epoch)
  -> repeat(num_epochs) -> read + decode + resize (grain threads) -> batch + tokenize (host)

Each ``next(iterator)`` returns an ``EditBatch``: ``arrays`` (numpy only, for jitted code) and
``texts`` (python strings, host side). With B = ``batch_size`` (per process), R =
``resolution``, L = 77 and K = ``max_object_tokens``::

  arrays["source"]              (B, R, R, 3) float32 in [-1, 1]
  arrays["target"]              (B, R, R, 3) float32 in [-1, 1]
  arrays["mask"]                (B, R, R) float32 in [0, 1], 1 = region the edit should change
  arrays["input_ids"]           (B, L) int32 CLIP ids of the instruction
  arrays["token_index"]         (B, K) int32 positions of the object phrase in input_ids (pad 0)
  arrays["token_mask"]          (B, K) bool, True for real phrase tokens
  arrays["caption_ids"]         (B, L) int32 CLIP ids of the target caption
  arrays["source_caption_ids"]  (B, L) int32 CLIP ids of the source caption
  arrays["example_index"]       (B,) int64 index of the record in its split
  arrays["task"]                (B,) int32 index into ``records.TASKS``
  arrays["check_*"]             shapes data only: the programmatic check's targets
                                (``shapes_check.check_targets``), stacked over the batch
  texts[name]                   list of B str for example_id, instruction, object_phrase,
                                source_caption, target_caption

The iterator's ``get_state()`` is a JSON-serialisable dict (grain's state plus counters);
``set_state`` on a fresh iterator built with the same arguments continues with exactly the next
batch. Bad records raise ``records.RecordError`` (naming record and field, then
``bad_record_fix``) unless ``skip_bad_records``: then they are dropped and counted in
``bad_records`` (part of the state).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence
from collections.abc import Sequence as SequenceABC

from absl import logging
from etils import epath
import grain
import numpy as np

from rl4pix_jax import tokenizer as tokenizer_lib
from rl4pix_jax.data import records
from rl4pix_jax.data import shapes
from rl4pix_jax.data import shapes_check

TEXT_KEYS = ("example_id", "instruction", "object_phrase", "source_caption", "target_caption")
MAX_BAD_MESSAGES = 20


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  """Options of ``make_edit_iterator``.

  Attributes:
    batch_size: examples per batch on this process.
    resolution: output image side R in pixels.
    seed: shuffle seed (the same on every process; shards are disjoint).
    shuffle: shuffle the records (reshuffled every epoch).
    num_epochs: passes over the data; None repeats forever.
    max_object_tokens: K, padded length of token_index/token_mask.
    max_length: L, CLIP sequence length.
    skip_bad_records: drop and count bad records instead of raising.
    drop_remainder: drop a last incomplete batch (only matters when num_epochs is set).
    num_threads: grain reader threads for decoding.
    prefetch_buffer_size: decoded examples grain keeps ready.
    bad_record_fix: appended to a bad record's error: how the caller's user skips bad records
      (a run: ``run_setup.BAD_RECORD_FIX``, the ``--config.data.skip_bad_records`` flag).
  """
  batch_size: int
  resolution: int = 64
  seed: int = 0
  shuffle: bool = True
  num_epochs: Optional[int] = None
  max_object_tokens: int = 8
  max_length: int = tokenizer_lib.CLIP_MAX_LENGTH
  skip_bad_records: bool = False
  drop_remainder: bool = True
  num_threads: int = 2
  prefetch_buffer_size: int = 16
  bad_record_fix: str = ""


@dataclasses.dataclass(frozen=True)
class EditBatch:
  """One batch: ``arrays`` (numpy, jit-ready) and ``texts`` (host-side strings)."""
  arrays: Dict[str, np.ndarray]
  texts: Dict[str, List[str]]


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """A record that failed validation: its index in the split and the error message."""
  index: int
  message: str


def find_dataset_dir(data_dir: str, name: str, config: Optional[str] = None) -> str:
  """Folder of a prepared tfds dataset (the one holding dataset_info.json).

  Args:
    data_dir: the tfds data_dir the dataset was prepared into.
    name: "shapes_edit" or "magicbrush".
    config: the builder config name; None when the data_dir holds only one config.
  Raises:
    ValueError: no prepared dataset, or several configs and none chosen (lists them).
  """
  # etils.epath: a local data_dir or gs:// (a dataset prepared into a bucket).
  root = epath.Path(data_dir if "://" in data_dir else os.path.expanduser(data_dir))
  pattern = f"{name}/{config or '*'}/*/dataset_info.json"
  found = sorted(os.fspath(p.parent) for p in root.glob(pattern)) if root.exists() else []
  if not found:
    raise ValueError(f"No prepared {name!r} dataset under {data_dir!r} (config "
                     f"{config or 'any'}): run `python -m launch.prepare_data --dataset={name} "
                     f"--data_dir={data_dir}` first.")
  configs = sorted({os.path.basename(os.path.dirname(p)) for p in found})
  if len(configs) > 1:
    raise ValueError(f"{data_dir!r} holds several {name!r} configs {configs}: pass one.")
  return found[-1]  # the newest version (sorted paths; versions share the major digit)


def open_split(dataset_dir: str, split: str):
  """Random-access data source of one split (no TensorFlow), from ``find_dataset_dir``."""
  import tensorflow_datasets as tfds  # local import: slow, and only needed here

  builder = tfds.builder_from_directory(dataset_dir)
  if split not in builder.info.splits:
    raise ValueError(f"Split {split!r} not in {dataset_dir!r}: it has "
                     f"{sorted(builder.info.splits)}.")
  return builder.as_data_source(split=split)


class TaskSubset(SequenceABC):
  """The records of a random-access source whose ``task`` is one of ``tasks`` (shapes_edit).

  Indices are positions in the subset, so the loader's example indices (the RL groups' keys)
  stay unique. Reads every record's ``task`` once, when built. A record whose ``task`` is
  missing or not an index into ``records.TASKS`` raises a ``records.RecordError`` naming it
  (with ``bad_record_fix`` at its end), or, with ``skip_bad_records``, is left out and counted
  in ``skipped``.
  """

  def __init__(self, source: Sequence, tasks: Sequence[str], skip_bad_records: bool = False,
               bad_record_fix: str = ""):
    wanted = {records.TASKS.index(t) for t in tasks}
    self._source = source
    self._indices = []
    self.skipped = 0
    for i in range(len(source)):
      record = source[i]
      try:
        name = records.record_name(record, i)
        task = records.check_task(records.get_field(record, "task", name), name)
      except records.RecordError as e:
        if skip_bad_records:
          self.skipped += 1
          continue
        raise e.with_fix(bad_record_fix) from None
      if task in wanted:
        self._indices.append(i)
    if self.skipped:
      logging.warning("TaskSubset: left out %d records whose task could not be read.",
                      self.skipped)
    if not self._indices:
      raise ValueError(f"No record of the tasks {sorted(tasks)} in this split "
                       f"({len(source)} records).")

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int):
    return self._source[self._indices[index]]


def decode_for_batch(index: int, record: Dict[str, Any], resolution: int,
                     skip_bad_records: bool):
  """Reads one record into per-example arrays (runs in grain threads).

  Returns:
    dict with ``source``/``target`` (R, R, 3) float32 in [-1, 1], ``mask`` (R, R) float32,
    ``task``, ``example_index`` and the text fields; or a ``BadRecord`` when skipping.
  """
  try:
    decoded = records.decode_record(record, resolution, index)
  except records.RecordError as e:
    if skip_bad_records:
      return BadRecord(index, str(e))
    raise
  if decoded["description"].startswith("{"):  # a shapes scene: what its check compares with
    try:
      edit, source_scene, _ = shapes.description_edit(decoded["description"])
    except ValueError as e:
      error = records.RecordError(records.record_name(record, index), "description", str(e))
      if skip_bad_records:
        return BadRecord(index, str(error))
      raise error from e
    decoded.update(shapes_check.check_targets(edit, source_scene.background, decoded["mask"],
                                              decoded["mask"].shape[0]))
  decoded["source"] = decoded["source"].astype(np.float32) / 127.5 - 1.0
  decoded["target"] = decoded["target"].astype(np.float32) / 127.5 - 1.0
  decoded["example_index"] = index
  return decoded


def build_example_dataset(data_source: Sequence, config: LoaderConfig, process_index: int = 0,
                          process_count: int = 1) -> grain.IterDataset:
  """The grain dataset of decoded examples (or ``BadRecord``) of this process's shard."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
  if len(data_source) < process_count:
    raise ValueError(f"The split has {len(data_source)} records, fewer than the "
                     f"{process_count} processes that must each read a shard.")
  indices = grain.MapDataset.range(len(data_source))[process_index::process_count]
  if config.shuffle:
    indices = indices.shuffle(seed=config.seed)
  indices = indices.repeat(config.num_epochs)
  resolution, skip = config.resolution, config.skip_bad_records
  examples = indices.map(
      lambda i: decode_for_batch(int(i), data_source[int(i)], resolution, skip))
  read_options = grain.ReadOptions(num_threads=config.num_threads,
                                   prefetch_buffer_size=config.prefetch_buffer_size)
  return examples.to_iter_dataset(read_options)


class EditBatchIterator:
  """Checkpointable iterator of ``EditBatch`` (see the module docstring)."""

  def __init__(self, data_source: Sequence, tokenizer, config: LoaderConfig,
               process_index: int = 0, process_count: int = 1):
    """Builds the pipeline.

    Args:
      data_source: random-access records (``open_split``, or any sequence of record dicts).
      tokenizer: a CLIPTokenizer (``rl4pix_jax.tokenizer.load_clip_tokenizer()``).
      config: loader options.
      process_index: this process (``jax.process_index()``).
      process_count: number of processes (``jax.process_count()``).
    """
    if config.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {config.batch_size}.")
    self._config = config
    self._tokenizer = tokenizer
    self._examples = iter(build_example_dataset(data_source, config, process_index,
                                                process_count))
    self.bad_records = 0
    self.bad_messages: List[str] = []
    self.batches = 0

  def __iter__(self):
    return self

  def __next__(self) -> EditBatch:
    examples = []
    while len(examples) < self._config.batch_size:
      try:
        example = self._tokenize_phrase(next(self._examples))
      except StopIteration:
        if examples and not self._config.drop_remainder:
          break
        raise
      except records.RecordError as e:
        if not self._config.bad_record_fix:
          raise
        raise e.with_fix(self._config.bad_record_fix) from None
      if isinstance(example, BadRecord):
        self.bad_records += 1
        self.bad_messages = (self.bad_messages + [example.message])[-MAX_BAD_MESSAGES:]
        continue
      examples.append(example)
    self.batches += 1
    return self._collate(examples)

  def _tokenize_phrase(self, example):
    """Adds the phrase token positions; a phrase the tokenizer cannot place is a bad record."""
    if isinstance(example, BadRecord):
      return example
    try:
      index, mask = tokenizer_lib.find_token_positions(
          self._tokenizer, example["instruction"], example["object_phrase"],
          self._config.max_object_tokens, self._config.max_length)
    except ValueError as e:
      error = records.RecordError(f"#{example['example_index']} (id {example['example_id']!r})",
                                  "object_phrase", str(e))
      if self._config.skip_bad_records:
        return BadRecord(example["example_index"], str(error))
      raise error from e
    return dict(example, token_index=index, token_mask=mask)

  def _collate(self, examples: List[dict]) -> EditBatch:
    length = self._config.max_length

    def ids(key):
      return tokenizer_lib.tokenize(self._tokenizer, [e[key] for e in examples], length)

    arrays = {
        "source": np.stack([e["source"] for e in examples]),
        "target": np.stack([e["target"] for e in examples]),
        "mask": np.stack([e["mask"] for e in examples]).astype(np.float32),
        "input_ids": ids("instruction"),
        "token_index": np.stack([e["token_index"] for e in examples]).astype(np.int32),
        "token_mask": np.stack([e["token_mask"] for e in examples]).astype(bool),
        "caption_ids": ids("target_caption"),
        "source_caption_ids": ids("source_caption"),
        "example_index": np.asarray([e["example_index"] for e in examples], np.int64),
        "task": np.asarray([e["task"] for e in examples], np.int32),
    }
    for key in shapes_check.CHECK_TARGET_KEYS:  # shapes data only (all or none of a batch)
      if all(key in e for e in examples):
        arrays[key] = np.stack([e[key] for e in examples])
    texts = {key: [e[key] for e in examples] for key in TEXT_KEYS}
    return EditBatch(arrays, texts)

  def get_state(self) -> Dict[str, Any]:
    """JSON-serialisable state: grain's iterator state and the counters."""
    return {"examples": self._examples.get_state(), "bad_records": self.bad_records,
            "batches": self.batches}

  def set_state(self, state: Dict[str, Any]) -> None:
    """Restores ``get_state`` output (from an iterator built with the same arguments)."""
    for key in ("examples", "bad_records", "batches"):
      if key not in state:
        raise ValueError(f"Loader state lacks {key!r}: expected the dict of get_state(), got "
                         f"keys {sorted(state)}.")
    self._examples.set_state(state["examples"])
    self.bad_records = int(state["bad_records"])
    self.batches = int(state["batches"])

  def metrics(self) -> Dict[str, int]:
    """Counters for logging: ``data/bad_records``, ``data/batches``."""
    return {"data/bad_records": self.bad_records, "data/batches": self.batches}


def make_edit_iterator(data_source: Sequence, tokenizer, config: LoaderConfig,
                       process_index: int = 0, process_count: int = 1) -> EditBatchIterator:
  """Convenience constructor of ``EditBatchIterator`` (same arguments)."""
  return EditBatchIterator(data_source, tokenizer, config, process_index, process_count)
