"""The one path layer of run folders: local paths and anything ``etils.epath`` reaches (gs://).

Every file a run reads or writes outside Orbax (config.json, metrics.jsonl, TensorBoard events,
sample grids, the reward curve, stage model_config.json, evaluation reports) goes through these
functions, so a workdir may be ``gs://bucket/run`` (through gcsfs; Orbax and TensorStore reach
the same bucket on their own). Object stores have no append and no rename of files: text files
are rewritten whole (``write_text``), which is atomic per object on GCS and done through a
temporary file and ``os.replace`` on local disk.
"""

from __future__ import annotations

import io
import os
from typing import List, Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_remote(path: PathLike) -> bool:
  """True for URLs (``gs://...``), False for local paths."""
  return "://" in os.fspath(path)


def path(p: PathLike) -> epath.Path:
  """``p`` as an ``epath.Path`` (local paths with ``~`` expanded)."""
  p = os.fspath(p)
  return epath.Path(p if is_remote(p) else os.path.expanduser(p))


def join(base: PathLike, *parts: str) -> str:
  """``base/part/...`` as a string, for local paths and URLs alike."""
  return os.fspath(path(base).joinpath(*parts))


def exists(p: PathLike) -> bool:
  return path(p).exists()


def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


def makedirs(p: PathLike) -> None:
  """Creates the folder and its parents (on object stores folders are implicit: gcsfs makes
  this a no-op for a path inside an existing bucket)."""
  path(p).mkdir(parents=True, exist_ok=True)


def read_text(p: PathLike) -> str:
  return path(p).read_text(encoding="utf-8")


def write_text(p: PathLike, text: str) -> None:
  """Writes the whole file atomically (a reader sees the old or the new text)."""
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(p):
    target.write_text(text, encoding="utf-8")  # one object upload
    return
  tmp = target.parent / (target.name + ".tmp")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, target)


def write_bytes(p: PathLike, data: bytes) -> None:
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_bytes(data)


def save_image(image, p: PathLike, format: str = "PNG") -> None:  # pylint: disable=redefined-builtin
  """Saves a PIL image to a local path or URL."""
  buffer = io.BytesIO()
  image.save(buffer, format=format)
  write_bytes(p, buffer.getvalue())


def read_image(p: PathLike):
  """A PNG (or any PIL format) of a local path or URL, loaded as a PIL image."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(io.BytesIO(path(p).read_bytes())) as image:
    image.load()
    return image.copy()


def glob(pattern_root: PathLike, pattern: str) -> List[str]:
  """Paths under ``pattern_root`` matching the relative glob ``pattern``, sorted."""
  root = path(pattern_root)
  if not root.exists():
    return []
  return sorted(os.fspath(p) for p in root.glob(pattern))


def copy_tree_to(local_folder: str, destination: PathLike) -> None:
  """Copies every file of a local folder to ``destination`` (overwriting), for logs that a
  library writes locally (TensorBoard events) and a remote workdir keeps."""
  for root, _, names in os.walk(local_folder):
    for name in names:
      source = os.path.join(root, name)
      relative = os.path.relpath(source, local_folder)
      with open(source, "rb") as f:
        write_bytes(join(destination, *relative.split(os.sep)), f.read())
