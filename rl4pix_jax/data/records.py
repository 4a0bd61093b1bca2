"""The stored record format shared by the tfds builders, and its validation and decoding.

Both builders (``shapes_edit``, ``magicbrush``) write records with the fields of
``RECORD_FIELDS``:

  example_id      str    unique id ("shapes-<seed>-<index>", "<img_id>-<turn_index>")
  source_image    bytes  encoded image (PNG or JPEG, any size/mode)
  target_image    bytes  encoded image of the edited scene
  mask_image      bytes  encoded greyscale PNG, same size as source; 255 = region the edit
                         should change, 0 = keep (MagicBrush masks are converted on build)
  instruction     str    the edit instruction, non-empty
  object_phrase   str    the edited object's phrase; must occur in the instruction
  source_caption  str    caption of the source image ("" when unknown)
  target_caption  str    caption of the target image (the CLIP reward's text)
  task            int    index into ``TASKS``
  description     str    JSON scene description (shapes only; "" otherwise)

Conversions (documented, not errors): greyscale, palette, CMYK and 16-bit images become RGB;
RGBA/LA are composited over white; a target of another size than the source is resized to
it; non-square images are centre-cropped to a square before resizing; resized masks are soft
(area-averaged) in [0, 1].
Errors: ``RecordError`` (a ValueError) naming the record id/index and the field (and, where the
caller knows one, the option that skips bad records); ``DataFileError`` naming a source file
that cannot be read at all.
"""

from __future__ import annotations

import io
from typing import Any, Mapping, Optional, Tuple

import numpy as np
from PIL import Image

TASKS: Tuple[str, ...] = ("replacement", "removal", "insertion", "transformation")
TEXT_FIELDS = ("example_id", "instruction", "object_phrase", "source_caption",
               "target_caption", "description")
IMAGE_FIELDS = ("source_image", "target_image", "mask_image")
RECORD_FIELDS = TEXT_FIELDS[:1] + IMAGE_FIELDS + TEXT_FIELDS[1:] + ("task",)


class RecordError(ValueError):
  """A record is malformed; the message names the record and the field, then ``fix``."""

  def __init__(self, record: str, field: str, problem: str, fix: str = ""):
    self.record = record
    self.field = field
    self.problem = problem
    self.fix = fix
    super().__init__(f"Record {record}, field {field!r}: {problem}" + (f" {fix}" if fix else ""))

  def with_fix(self, fix: str) -> "RecordError":
    """The same error with ``fix`` (e.g. the flag that skips bad records) at its end."""
    return RecordError(self.record, self.field, self.problem, fix)


class DataFileError(ValueError):
  """A dataset source file cannot be read (not the format its name says, missing columns);
  the message names the file."""


def as_text(value: Any) -> str:
  """A tfds Text value (bytes or str) as str."""
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  if isinstance(value, np.ndarray) and value.shape == ():
    return as_text(value.item())
  return str(value)


def get_field(record: Mapping[str, Any], field: str, record_name: str) -> Any:
  """``record[field]``, or RecordError naming the record when it is missing."""
  if field not in record:
    raise RecordError(record_name, field, f"missing; the record has {sorted(record)}.")
  return record[field]


def encode_png(image: np.ndarray) -> bytes:
  """PNG bytes of a (H, W, 3) RGB or (H, W) greyscale uint8 array."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim not in (2, 3):
    raise ValueError(f"encode_png expects (H, W[, 3]) uint8, got {image.shape} {image.dtype}.")
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def _open_image(data: Any, record_name: str, field: str) -> Image.Image:
  if isinstance(data, np.ndarray) and data.shape == ():
    data = data.item()
  if not isinstance(data, (bytes, bytearray, np.bytes_)) or not data:
    raise RecordError(record_name, field,
                      f"expected non-empty encoded image bytes, got {type(data).__name__}.")
  try:
    image = Image.open(io.BytesIO(bytes(data)))
    image.load()
  except Exception as e:  # PIL raises several types for corrupt/truncated data.
    raise RecordError(record_name, field, f"corrupt or truncated image ({e}).") from e
  return image


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB; transparency is composited over white."""
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  if image.mode in ("I;16", "I;16B", "I;16L", "I"):
    array = np.asarray(image, np.float64)
    scale = 255.0 / max(float(array.max()), 1.0) if array.max() > 255 else 1.0
    return Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8)).convert("RGB")
  return image.convert("RGB")


def decode_image(data: Any, record_name: str, field: str) -> np.ndarray:
  """Decodes an encoded image to RGB.

  Returns:
    (H, W, 3) uint8.
  Raises:
    RecordError: corrupt, truncated or non-bytes data.
  """
  return np.asarray(to_rgb(_open_image(data, record_name, field)))


def decode_mask(data: Any, record_name: str, field: str = "mask_image") -> np.ndarray:
  """Decodes a stored mask (greyscale PNG, 255 = edit region).

  Returns:
    (H, W) float32 in [0, 1].
  """
  image = _open_image(data, record_name, field)
  if image.mode != "L":
    image = to_rgb(image).convert("L")
  return np.asarray(image, np.float32) / 255.0


def center_crop_square(image: np.ndarray) -> np.ndarray:
  """Crops the central square of a (H, W, ...) array."""
  height, width = image.shape[:2]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  return image[top:top + side, left:left + side]


def resize_image(image: np.ndarray, resolution: int) -> np.ndarray:
  """Centre-crops to a square and resizes (bicubic). (H, W, 3) uint8 -> (R, R, 3) uint8."""
  square = center_crop_square(image)
  if square.shape[0] == resolution:
    return square
  return np.asarray(Image.fromarray(square).resize((resolution, resolution), Image.BICUBIC))


def resize_mask(mask: np.ndarray, resolution: int) -> np.ndarray:
  """Centre-crops and resizes a mask by area averaging. (H, W) float -> (R, R) float32 [0, 1]."""
  square = center_crop_square(np.asarray(mask, np.float32))
  if square.shape[0] == resolution:
    return square
  image = Image.fromarray(square, mode="F")
  resample = Image.BOX if square.shape[0] > resolution else Image.BILINEAR
  resized = np.asarray(image.resize((resolution, resolution), resample), np.float32)
  return np.clip(resized, 0.0, 1.0)


def check_text(value: Any, record_name: str, field: str, allow_empty: bool = False) -> str:
  """Validates a text field; returns it stripped."""
  text = as_text(value).strip()
  if not text and not allow_empty:
    raise RecordError(record_name, field, "is empty; expected a non-empty string.")
  return text


def check_phrase(instruction: str, phrase: str, record_name: str) -> Tuple[int, int]:
  """Character span of ``phrase`` in ``instruction`` (case-insensitive, first occurrence).

  Raises:
    RecordError (field "object_phrase") when the phrase is empty or does not occur.
  """
  if not phrase:
    raise RecordError(record_name, "object_phrase", "is empty; expected a phrase of the "
                      f"instruction {instruction!r}.")
  start = instruction.lower().find(phrase.lower())
  if start < 0:
    raise RecordError(record_name, "object_phrase",
                      f"{phrase!r} does not occur in the instruction {instruction!r}.")
  return start, start + len(phrase)


def check_task(value: Any, record_name: str) -> int:
  """Validates the task index (0..len(TASKS)-1)."""
  try:
    task = int(np.asarray(value))
  except (TypeError, ValueError) as e:
    raise RecordError(record_name, "task", f"is not an integer ({e}).") from None
  if not 0 <= task < len(TASKS):
    raise RecordError(record_name, "task", f"{task} is not a task index in [0, {len(TASKS)}) "
                      f"({TASKS}).")
  return task


def record_name(record: Mapping[str, Any], index: Optional[int]) -> str:
  """'#<index> (id <example_id>)' for error messages."""
  example_id = as_text(record["example_id"]) if "example_id" in record else "?"
  return f"#{index} (id {example_id!r})" if index is not None else f"id {example_id!r}"


def decode_record(record: Mapping[str, Any], resolution: int,
                  index: Optional[int] = None) -> dict:
  """Validates and decodes one stored record at a fixed resolution.

  Args:
    record: a stored record (see the module docstring); text as str or bytes.
    resolution: R, the output side in pixels.
    index: the record's index in its split (for error messages).

  Returns:
    dict with ``source``/``target`` (R, R, 3) uint8, ``mask`` (R, R) float32 in [0, 1],
    ``task`` int, and the str fields ``example_id``, ``instruction``, ``object_phrase``,
    ``source_caption``, ``target_caption``, ``description``.

  Raises:
    RecordError: a missing field, corrupt image, mask of another size than the source,
      empty instruction, or an object phrase that does not occur in the instruction.
  """
  name = record_name(record, index)
  for field in RECORD_FIELDS:
    get_field(record, field, name)
  source = decode_image(record["source_image"], name, "source_image")
  target = decode_image(record["target_image"], name, "target_image")
  mask = decode_mask(record["mask_image"], name)
  if mask.shape != source.shape[:2]:
    raise RecordError(name, "mask_image", f"has size {mask.shape} (H, W) but the source image "
                      f"is {source.shape[:2]}; expected equal sizes.")
  if target.shape != source.shape:
    target = np.asarray(Image.fromarray(target).resize(source.shape[1::-1], Image.BICUBIC))
  instruction = check_text(record["instruction"], name, "instruction")
  phrase = check_text(record["object_phrase"], name, "object_phrase", allow_empty=True)
  check_phrase(instruction, phrase, name)
  return {
      "example_id": check_text(record["example_id"], name, "example_id"),
      "source": resize_image(source, resolution),
      "target": resize_image(target, resolution),
      "mask": resize_mask(mask, resolution),
      "instruction": instruction,
      "object_phrase": phrase,
      "source_caption": check_text(record["source_caption"], name, "source_caption", True),
      "target_caption": check_text(record["target_caption"], name, "target_caption", True),
      "task": check_task(record["task"], name),
      "description": as_text(record["description"]),
  }
