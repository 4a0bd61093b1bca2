"""Tiny MagicBrush shards in the hub's parquet layout (osunlp/MagicBrush columns)."""

import io
import os
from typing import Dict, Iterable, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def encoded(array: np.ndarray, fmt: str = "PNG", mode: str = None) -> bytes:
  """``array`` (H, W, C) uint8 as the bytes of a ``fmt`` image file."""
  image = Image.fromarray(array)
  if mode:
    image = image.convert(mode)
  buffer = io.BytesIO()
  image.save(buffer, format=fmt)
  return buffer.getvalue()


def write_parquet(folder, name: str, rows: List[dict]) -> None:
  """One parquet shard ``folder/name`` holding ``rows``."""
  os.makedirs(folder, exist_ok=True)
  pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, name))


def session_rows(rng: np.random.Generator, ids: Iterable[str], instructions: Dict[str, str],
                 corrupt: Iterable[str] = (), side: int = 40,
                 default_instruction: str = "remove the red car") -> List[dict]:
  """Rows of edit sessions ``"<img_id>-<turn>"``: random sources, a square mask, targets that
  are the source plus noise; turn k's source is turn k-1's target (as in MagicBrush). Turn-2
  targets are JPEG, the rest PNG; ids in ``corrupt`` get unreadable source bytes."""
  mask = np.zeros((side, side, 3), np.uint8)
  mask[side // 5:side * 3 // 5, side // 5:side * 3 // 5] = 255
  targets = {}
  rows = []
  for example_id in ids:
    img_id, turn = example_id.split("-")
    source = targets.get(f"{img_id}-{int(turn) - 1}")
    if source is None:
      source = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    target = np.clip(source.astype(np.int32) + rng.integers(-60, 60, source.shape), 0,
                     255).astype(np.uint8)
    targets[example_id] = target
    rows.append(dict(
        img_id=img_id, turn_index=int(turn),
        source_img={"bytes": b"\x89PNG broken" if example_id in corrupt else encoded(source),
                    "path": None},
        mask_img={"bytes": encoded(mask), "path": None},
        instruction=instructions.get(example_id, default_instruction),
        target_img={"bytes": encoded(target, "JPEG" if turn == "2" else "PNG"),
                    "path": None}))
  return rows
