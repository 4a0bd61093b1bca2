"""Programmatic edit-accuracy check for the shapes dataset (used by evaluation).

Definition (all on the example's pixel grid, colours on the 0..255 scale):

* Colour classes: every pixel of the edited image is assigned the nearest colour (Euclidean RGB)
  among the palette and the scene's background colour.
* ``object_iou`` (replacement, insertion, transformation): IoU between (a) the pixels inside the
  search region (edit mask union the requested object's region) classified as the requested
  colour and (b) the requested object's region (coverage >= 0.5). This checks colour, shape,
  size and position at once. ``before_iou`` is the same IoU against the edited object's source
  region (replacement, transformation; nan otherwise). ``edit_ok`` = ``object_iou >=
  IOU_THRESHOLD`` and ``object_iou >= before_iou`` (the result resembles the requested object
  at least as much as the original one: a near-miss such as an unchanged diamond for "turn the
  diamond into a star" fails).
* ``removed_fraction`` (removal): fraction of the removed object's region (coverage >= 0.5)
  still classified as its colour. ``edit_ok`` = ``removed_fraction <= REMOVED_THRESHOLD``.
* ``outside_change``: mean absolute difference to the source outside the edit mask, in grey
  levels. ``preserved_ok`` = ``outside_change <= OUTSIDE_THRESHOLD``.
* ``success`` = ``edit_ok and preserved_ok``.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

from rl4pix_jax.data import shapes
from rl4pix_jax.data import shapes_render
from rl4pix_jax.data import shapes_scene as sc

IOU_THRESHOLD = 0.5
REMOVED_THRESHOLD = 0.2
OUTSIDE_THRESHOLD = 8.0


def image_to_uint8_scale(image: np.ndarray, resolution: int) -> np.ndarray:
  """Edited image -> (R, R, 3) float32 in 0..255.

  Args:
    image: (R, R, 3) uint8 in 0..255, or floating point in [-1, 1] (the model's range).
    resolution: the example's side R.
  """
  image = np.asarray(image)
  if image.shape != (resolution, resolution, 3):
    raise ValueError(f"Edited image has shape {image.shape}: expected "
                     f"({resolution}, {resolution}, 3) like the example.")
  if image.dtype == np.uint8:
    return image.astype(np.float32)
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError(f"Edited image dtype {image.dtype}: expected uint8 or float in [-1, 1].")
  return (np.clip(image.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5


def colour_classes(image: np.ndarray, background: str):
  """Nearest-colour class per pixel.

  Args:
    image: (R, R, 3) float32 in 0..255.
    background: the scene's background name.

  Returns:
    ((R, R) int32 class indices, list of class names: palette names then "background").
  """
  names = list(sc.PALETTE) + ["background"]
  colours = np.asarray(list(sc.PALETTE.values()) + [sc.BACKGROUNDS[background]], np.float32)
  distances = np.linalg.norm(image[:, :, None, :] - colours[None, None], axis=-1)
  return np.argmin(distances, axis=-1).astype(np.int32), names


def _iou(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.sum(a & b) / max(np.sum(a | b), 1))


def check_edit(edited_image: np.ndarray, example: shapes.ShapesEditExample) -> Dict[str, float]:
  """Checks an edited image against a shapes example (see the module docstring).

  Args:
    edited_image: (R, R, 3) uint8, or float in [-1, 1], at the example's resolution.
    example: the example (``make_example`` or ``shapes.example_from_record``).

  Returns:
    dict with float ``object_iou`` (nan for removal), ``before_iou`` (nan unless replacement
    or transformation), ``removed_fraction`` (nan unless removal),
    ``outside_change`` (grey levels), and 0/1 floats ``edit_ok``, ``preserved_ok``, ``success``.
  """
  resolution = example.resolution
  image = image_to_uint8_scale(edited_image, resolution)
  classes, names = colour_classes(image, example.source_scene.background)
  edit = example.edit
  object_iou = before_iou = removed_fraction = float("nan")
  if edit.after is not None:
    region = shapes_render.object_coverage(edit.after, resolution) >= 0.5
    search = region | (example.mask > 0)
    requested = (classes == names.index(edit.after.color)) & search
    object_iou = _iou(requested, region)
    edit_ok = object_iou >= IOU_THRESHOLD
    if edit.before is not None:
      before_region = shapes_render.object_coverage(edit.before, resolution) >= 0.5
      before_iou = _iou(requested, before_region)
      edit_ok = edit_ok and object_iou >= before_iou
  else:
    region = shapes_render.object_coverage(edit.before, resolution) >= 0.5
    still = (classes == names.index(edit.before.color)) & region
    removed_fraction = float(np.sum(still) / max(np.sum(region), 1))
    edit_ok = removed_fraction <= REMOVED_THRESHOLD
  outside = example.mask <= 0
  difference = np.abs(image - example.source.astype(np.float32)).mean(axis=-1)
  outside_change = float(difference[outside].mean()) if outside.any() else 0.0
  preserved_ok = outside_change <= OUTSIDE_THRESHOLD
  return {
      "object_iou": object_iou,
      "before_iou": before_iou,
      "removed_fraction": removed_fraction,
      "outside_change": outside_change,
      "edit_ok": float(edit_ok),
      "preserved_ok": float(preserved_ok),
      "success": float(edit_ok and preserved_ok),
  }


# Keys of ``check_targets`` (the loader adds them to shapes batches; the ``shapes_check``
# reward reads them from ``RewardInputs.shapes_check``).
CHECK_TARGET_KEYS = ("check_region", "check_before", "check_outside", "check_colours",
                     "check_colour", "check_removal", "check_has_before")
KIND_OBJECT, KIND_REMOVAL = 0, 1


def check_targets(edit: shapes.Edit, background: str, mask: np.ndarray,
                  resolution: int) -> Dict[str, np.ndarray]:
  """What :func:`check_edit` compares an edit with, as arrays a jitted reward can read.

  Args:
    edit: the example's edit (``example.edit``).
    background: the source scene's background name.
    mask: (R, R) float edit mask in [0, 1] (binarised at 0.5, as ``example_from_record``).
    resolution: R.

  Returns:
    dict of ``check_region`` (R, R) float32 0/1: the requested object's region (insertion,
    replacement, transformation) or the removed object's (removal); ``check_before`` (R, R)
    float32 0/1: the edited object's source region (replacement, transformation; zeros
    otherwise); ``check_outside`` (R, R) float32 0/1: outside the edit mask;
    ``check_colours`` (C, 3) float32 0..255: the palette then the background colour (the
    classes of ``colour_classes``); ``check_colour`` () int32: the class of the requested
    (or removed) colour; ``check_removal`` () int32 1 for removal; ``check_has_before`` ()
    float32 1 when ``check_before`` applies.
  """
  names = list(sc.PALETTE) + ["background"]
  colours = np.asarray(list(sc.PALETTE.values()) + [sc.BACKGROUNDS[background]], np.float32)
  binary = (np.asarray(mask) >= 0.5)
  obj = edit.after if edit.after is not None else edit.before
  region = shapes_render.object_coverage(obj, resolution) >= 0.5
  has_before = edit.after is not None and edit.before is not None
  before = (shapes_render.object_coverage(edit.before, resolution) >= 0.5 if has_before
            else np.zeros_like(region))
  return {
      "check_region": region.astype(np.float32),
      "check_before": before.astype(np.float32),
      "check_outside": (~binary).astype(np.float32),
      "check_colours": colours,
      "check_colour": np.int32(names.index(obj.color)),
      "check_removal": np.int32(KIND_REMOVAL if edit.after is None else KIND_OBJECT),
      "check_has_before": np.float32(has_before),
  }
