"""``shapes_check``: a verifiable reward from the shapes dataset's programmatic edit check.

The same definition as ``data.shapes_check.check_edit`` (nearest-colour classes, the
requested object's IoU, the removed fraction, the change outside the mask), computed in
jax from the per-example targets the loader adds to shapes batches
(``data.shapes_check.check_targets``, passed as ``RewardInputs.shapes_check``). Value:

  edit_score + success,  edit_score = object_iou - max(0, before_iou - object_iou)
                                      (insertion, replacement, transformation)
                                    = 1 - removed_fraction  (removal)

so the continuous part rewards partial progress (an object of the right colour at the
right place, a removal under way) and the 0/1 ``success`` of the check (edit_ok and
preserved_ok) rewards what evaluation counts. Range [-1, 2]. Enable it with
``c.reward.extra = {"shapes_check": weight}``; it needs shapes data (MagicBrush has no
programmatic check).

``shapes_location`` scores where the requested colour appeared, for the edits that draw an
object (insertion, replacement, transformation):

  1 - |centroid(new) - centroid(region)| / (R sqrt 2)

with ``new`` the pixels classed as the requested colour in the edit but not in the source and
``region`` the requested object's region; 0 when no pixel became that colour, and 0 for
removal. Range [0, 1] (1: the new colour is centred on the requested object). The IoU of
``shapes_check`` is 0 for an object drawn in the wrong place however near it is; this term
grades the distance, so a GRPO group of wrongly placed insertions still has a reward spread.
"""

from __future__ import annotations

from typing import Dict, Mapping

import jax.numpy as jnp

from rl4pix_jax.data import shapes_check as check_lib
from rl4pix_jax.rewards.inputs import RewardContext, RewardInputs
from rl4pix_jax.rewards.registry import register_reward


def _masked_iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """IoU of (B, H, W) 0/1 float masks per row, (B,); 0 when both are empty."""
  inter = jnp.sum(a * b, axis=(1, 2))
  union = jnp.sum(jnp.maximum(a, b), axis=(1, 2))
  return inter / jnp.maximum(union, 1.0)


def _to_255(images: jnp.ndarray) -> jnp.ndarray:
  """(B, H, W, 3) float in [0, 1] -> the same on the 0..255 grey-level scale, rounded."""
  return jnp.round(jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0)


def _requested_colour(image_255: jnp.ndarray, targets: Mapping[str, jnp.ndarray]
                      ) -> jnp.ndarray:
  """(B, H, W) 0/1 float32: pixels whose nearest colour class is the requested one."""
  colours = targets["check_colours"].astype(jnp.float32)  # (B, C, 3)
  distances = jnp.sum((image_255[:, :, :, None, :] - colours[:, None, None]) ** 2, axis=-1)
  classes = jnp.argmin(distances, axis=-1)  # (B, H, W)
  return (classes == targets["check_colour"][:, None, None]).astype(jnp.float32)


def _centroid(weights: jnp.ndarray) -> jnp.ndarray:
  """(B, H, W) non-negative weights -> (B, 2) (row, column) centroid in pixels (0 if empty)."""
  rows = jnp.arange(weights.shape[1], dtype=jnp.float32)[None, :, None]
  cols = jnp.arange(weights.shape[2], dtype=jnp.float32)[None, None, :]
  total = jnp.maximum(jnp.sum(weights, axis=(1, 2)), 1e-6)
  return jnp.stack([jnp.sum(weights * rows, axis=(1, 2)) / total,
                    jnp.sum(weights * cols, axis=(1, 2)) / total], axis=-1)


def location_scores(edited: jnp.ndarray, source: jnp.ndarray,
                    targets: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
  """``shapes_location`` of a batch (module docstring), (B,) float32 in [0, 1].

  Args:
    edited, source: (B, H, W, 3) float in [0, 1].
    targets: ``check_targets`` arrays stacked over the batch (leading B).
  """
  new = _requested_colour(_to_255(edited), targets) * (
      1.0 - _requested_colour(_to_255(source), targets))
  region = targets["check_region"].astype(jnp.float32)
  distance = jnp.linalg.norm(_centroid(new) - _centroid(region), axis=-1)
  diagonal = jnp.sqrt(jnp.float32(region.shape[1] ** 2 + region.shape[2] ** 2))
  drawn = (jnp.sum(new, axis=(1, 2)) > 0) & (targets["check_removal"] != check_lib.KIND_REMOVAL)
  return jnp.where(drawn, 1.0 - distance / diagonal, 0.0)


def check_scores(edited: jnp.ndarray, source: jnp.ndarray,
                 targets: Mapping[str, jnp.ndarray]) -> Dict[str, jnp.ndarray]:
  """The shapes check of a batch of edits, in jax.

  Args:
    edited, source: (B, H, W, 3) float in [0, 1].
    targets: ``check_targets`` arrays stacked over the batch (leading B).
  Returns:
    dict of (B,) float32: ``object_iou`` (0 for removal), ``before_iou`` (0 unless it
    applies), ``removed_fraction`` (0 unless removal), ``outside_change`` (grey levels,
    0..255 scale), and 0/1 ``edit_ok``, ``preserved_ok``, ``success``; as ``check_edit``
    except that not-applicable values are 0 rather than nan.
  """
  image, source_255 = _to_255(edited), _to_255(source)
  wanted = _requested_colour(image, targets)
  region = targets["check_region"].astype(jnp.float32)
  before = targets["check_before"].astype(jnp.float32)
  outside = targets["check_outside"].astype(jnp.float32)
  removal = targets["check_removal"] == check_lib.KIND_REMOVAL
  has_before = targets["check_has_before"] > 0

  search = jnp.maximum(region, 1.0 - outside)
  requested = wanted * search
  object_iou = _masked_iou(requested, region)
  before_iou = jnp.where(has_before, _masked_iou(requested, before), 0.0)
  removed_fraction = (jnp.sum(wanted * region, axis=(1, 2))
                      / jnp.maximum(jnp.sum(region, axis=(1, 2)), 1.0))
  object_ok = (object_iou >= check_lib.IOU_THRESHOLD) & (
      ~has_before | (object_iou >= before_iou))
  edit_ok = jnp.where(removal, removed_fraction <= check_lib.REMOVED_THRESHOLD, object_ok)
  difference = jnp.abs(image - source_255).mean(axis=-1)
  outside_count = jnp.sum(outside, axis=(1, 2))
  outside_change = jnp.where(outside_count > 0,
                             jnp.sum(difference * outside, axis=(1, 2))
                             / jnp.maximum(outside_count, 1.0), 0.0)
  preserved_ok = outside_change <= check_lib.OUTSIDE_THRESHOLD
  f32 = lambda x: x.astype(jnp.float32)
  return {
      "object_iou": jnp.where(removal, 0.0, object_iou),
      "before_iou": before_iou,
      "removed_fraction": jnp.where(removal, removed_fraction, 0.0),
      "outside_change": outside_change,
      "edit_ok": f32(edit_ok), "preserved_ok": f32(preserved_ok),
      "success": f32(edit_ok & preserved_ok),
  }


def check_reward(scores: Mapping[str, jnp.ndarray], removal: jnp.ndarray) -> jnp.ndarray:
  """edit_score + success from :func:`check_scores` (module docstring), (B,) float32."""
  object_score = scores["object_iou"] - jnp.maximum(
      scores["before_iou"] - scores["object_iou"], 0.0)
  edit_score = jnp.where(removal == check_lib.KIND_REMOVAL,
                         1.0 - scores["removed_fraction"], object_score)
  return edit_score + scores["success"]


@register_reward("shapes_check")
def shapes_check_reward(inputs: RewardInputs, context: RewardContext) -> jnp.ndarray:
  """The verifiable shapes reward (module docstring), (B,) float32 in [-1, 2]."""
  del context  # reads no options
  inputs.require("edited_images", "source_images", "shapes_check", reward="shapes_check")
  scores = check_scores(inputs.edited_images, inputs.source_images, inputs.shapes_check)
  return check_reward(scores, inputs.shapes_check["check_removal"])


@register_reward("shapes_location")
def shapes_location_reward(inputs: RewardInputs, context: RewardContext) -> jnp.ndarray:
  """Where the requested colour appeared, graded by distance (module docstring), (B,) in [0, 1]."""
  del context  # reads no options
  inputs.require("edited_images", "source_images", "shapes_check", reward="shapes_location")
  return location_scores(inputs.edited_images, inputs.source_images, inputs.shapes_check)
