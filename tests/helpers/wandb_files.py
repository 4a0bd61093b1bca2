"""Reads W&B's offline run files (``<dir>/wandb/offline-run-*/run-<id>.wandb``) back.

wandb >= 0.19 no longer ships a Python reader (``wandb.sdk.internal.datastore`` moved into
its Go core), so this parses the documented transaction-log format: a 7-byte header
(``:W&B``, magic 0xBEE1, version 0), then LevelDB-log blocks of 32 KiB, each record chunk
with a 7-byte header (crc32c, little-endian length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4),
each record a serialized ``wandb_internal_pb2.Record``.
"""

import glob
import json
import math
import os
import struct
from typing import Dict, Iterator, List

BLOCK = 32 * 1024
FILE_HEADER = 7
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> Iterator[bytes]:
  if data[:4] != b":W&B":
    raise ValueError("not a W&B transaction log (no ':W&B' header)")
  offset, pending = FILE_HEADER, b""
  while offset + CHUNK_HEADER <= len(data):
    room = BLOCK - offset % BLOCK
    if room < CHUNK_HEADER:  # block trailer: zero padding
      offset += room
      continue
    _, length, kind = struct.unpack("<IHB", data[offset:offset + CHUNK_HEADER])
    chunk = data[offset + CHUNK_HEADER:offset + CHUNK_HEADER + length]
    offset += CHUNK_HEADER + length
    if kind == 0 and length == 0:  # zero fill at the end of a file still being written
      offset += room - CHUNK_HEADER
      continue
    if kind == FULL:
      yield chunk
    elif kind == FIRST:
      pending = chunk
    elif kind == MIDDLE:
      pending += chunk
    elif kind == LAST:
      yield pending + chunk
      pending = b""


def read_records(path: str) -> list:
  """The ``Record`` protos of a ``.wandb`` file, in order."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=import-outside-toplevel
  with open(path, "rb") as f:
    data = f.read()
  records = []
  for payload in _payloads(data):
    record = wandb_internal_pb2.Record()
    record.ParseFromString(payload)
    records.append(record)
  return records


def read_history(path: str) -> List[Dict[str, object]]:
  """Every ``run.log`` row of a ``.wandb`` file as {key: decoded JSON value}."""
  rows = []
  for record in read_records(path):
    if record.WhichOneof("record_type") != "history":
      continue
    row = {}
    for item in record.history.item:
      key = item.key or "/".join(item.nested_key)
      row[key] = json.loads(item.value_json)
    rows.append(row)
  return rows


def offline_runs(wandb_parent: str) -> List[str]:
  """The offline run folders under ``<wandb_parent>/wandb`` (oldest first)."""
  return sorted(glob.glob(os.path.join(wandb_parent, "wandb", "offline-run-*")))


def run_file(run_folder: str) -> str:
  (path,) = glob.glob(os.path.join(run_folder, "run-*.wandb"))
  return path


def run_id(run_folder: str) -> str:
  """The W&B run id of an offline run folder, from its ``run-<id>.wandb`` file. (Not from the
  folder's name: wandb names it ``offline-run-<time>-<id>`` and appends ``-1``, ``-2``, ... when
  a run of the same id started in the same second, e.g. a quick resume.)"""
  return os.path.basename(run_file(run_folder))[len("run-"):-len(".wandb")]


def images(rows, name: str) -> list:
  """The history rows that logged an image under ``name``."""
  return [r for r in rows if r.get(f"{name}/_type") == "image-file"]


def assert_logged(history, rows, step_key: str = "epoch") -> None:
  """Every metrics.jsonl value (``history``), at its step, is in the W&B history ``rows``."""
  assert history
  for line in history:
    found = [r for r in rows if r.get(step_key) == line[step_key] and set(line) <= set(r)]
    assert found, f"{step_key} {line[step_key]}: {sorted(line)} not logged to W&B"
    for key, value in line.items():
      got = found[0][key]
      assert got == value or (isinstance(value, float) and math.isnan(value)
                              and (got is None or got == "NaN" or math.isnan(got))), key


def set_offline(monkeypatch, home) -> None:
  """W&B offline (no network, no login) with its config, cache and data folders in ``home``."""
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
    monkeypatch.setenv(name, os.path.join(str(home), name.lower()))
  monkeypatch.delenv("WANDB_RUN_ID", raising=False)
