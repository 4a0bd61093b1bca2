"""Per-example metrics of the synthetic shapes evaluation (default-run issue, item 5).

For each test example (same examples and seeds for every model):

* ``success`` / ``edit_ok`` / ``preserved_ok``: the programmatic edit check
  ``rl4pix_jax.data.shapes_check.check_edit`` (0/1).
* ``l1_outside``: mean |edited - source| over the pixels outside the edit mask (mask <= 0) and
  the 3 channels, in [0, 1] pixel units (preservation; lower is better).
* ``l1_inside``: mean |edited - target| over the pixels inside the mask (mask > 0), [0, 1] units
  (did the edit produce the ground truth where it should; lower is better).
* ``attention_mass_inside``: the fraction of the target-token attention mass that falls inside
  the mask, sum(A * M') / sum(A), where A is the (h, w) attention map (e.g. the sampler's
  ``attention_map_mean``) and M' the mask area-resized to (h, w) (each map cell gets the
  fraction of its area covered by the mask).
* ``attention_soft_iou``: soft IoU of the normalised map and the normalised mask,
  sum(min(p, q)) / sum(max(p, q)) with p = A / max(A) and q = M' / max(M') (both peak at 1;
  the weighted Jaccard index: 1 iff p = q, 0 iff disjoint). This is 1 minus the "soft_iou"
  distance of the attention reward (``rewards/attention.py``), so the metric and that reward
  agree.
* ``clip_t``: cosine of the (tiny) CLIP image embedding of the edited image and the text
  embedding of the target caption (``image_metrics.clip_text_similarity``).

A metric that is undefined for an example (an empty region, an all-zero map) is NaN there;
``intervals.summarise`` leaves NaNs out and reports the count it used.
"""

from __future__ import annotations

from typing import Dict, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rl4pix_jax.data import shapes_check
from rl4pix_jax.metrics import image_metrics

SHAPES_METRICS = ("success", "edit_ok", "preserved_ok", "l1_outside", "l1_inside",
                  "attention_mass_inside", "attention_soft_iou", "clip_t")


def area_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float64 matrix of area (box) resampling along one axis.

  Row i averages the input cells that overlap output cell [i * s, (i + 1) * s), s = in / out,
  each weighted by its overlap (rows sum to 1). An integer factor gives block means.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"area_resize_matrix: sizes must be >= 1, got {in_size} -> {out_size}.")
  scale = in_size / out_size
  matrix = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    start, end = i * scale, (i + 1) * scale
    for j in range(int(np.floor(start)), min(int(np.ceil(end)), in_size)):
      matrix[i, j] = max(0.0, min(end, j + 1) - max(start, j)) / scale
  return matrix


def area_resize_masks(masks: jax.Array, height: int, width: int) -> jax.Array:
  """Area-averages (B, H, W) masks to (B, height, width) float32 (values stay in [0, 1])."""
  if masks.ndim != 3:
    raise ValueError(f"area_resize_masks: masks have shape {masks.shape}, expected (B, H, W).")
  rows = jnp.asarray(area_resize_matrix(masks.shape[1], height), jnp.float32)
  cols = jnp.asarray(area_resize_matrix(masks.shape[2], width), jnp.float32)
  return jnp.einsum("ij,bjk,lk->bil", rows, masks.astype(jnp.float32), cols)


def masked_mean_abs_difference(a: jax.Array, b: jax.Array, region: jax.Array) -> jax.Array:
  """Mean |a - b| over the pixels of ``region`` and all channels; NaN for an empty region.

  Args:
    a, b: (B, H, W, C) float.
    region: (B, H, W) bool.
  Returns:
    (B,) float32.
  """
  weights = region.astype(jnp.float32)[..., None]
  total = jnp.sum(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)) * weights,
                  axis=(1, 2, 3))
  count = jnp.sum(weights, axis=(1, 2, 3)) * a.shape[-1]
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.nan)


def _map_and_region(attention_maps: jax.Array, masks: jax.Array):
  if attention_maps.ndim != 3 or masks.ndim != 3 or attention_maps.shape[0] != masks.shape[0]:
    raise ValueError(f"attention maps {attention_maps.shape} and masks {masks.shape} must be "
                     "(B, h, w) and (B, H, W) with the same B.")
  maps = attention_maps.astype(jnp.float32)
  return maps, area_resize_masks(masks, maps.shape[1], maps.shape[2])


def attention_mass_inside(attention_maps: jax.Array, masks: jax.Array) -> jax.Array:
  """Fraction of each attention map's mass inside its (area-resized) mask.

  Args:
    attention_maps: (B, h, w) non-negative target-token attention.
    masks: (B, H, W) float in [0, 1], 1 = edit region (any H, W; area-resized to h, w).
  Returns:
    (B,) float32 in [0, 1]; NaN for an all-zero map.
  """
  maps, region = _map_and_region(attention_maps, masks)
  mass = jnp.sum(maps, axis=(1, 2))
  return jnp.where(mass > 0, jnp.sum(maps * region, axis=(1, 2)) / jnp.where(mass > 0, mass, 1.0),
                   jnp.nan)


def attention_soft_iou(attention_maps: jax.Array, masks: jax.Array) -> jax.Array:
  """Soft IoU sum(min(p, q)) / sum(max(p, q)) of the map and mask, each divided by its max.

  Args:
    attention_maps: (B, h, w) non-negative target-token attention.
    masks: (B, H, W) float in [0, 1] (area-resized to h, w).
  Returns:
    (B,) float32 in [0, 1]; NaN when the map or the resized mask is all zero.
  """
  maps, region = _map_and_region(attention_maps, masks)
  map_peak = jnp.max(maps, axis=(1, 2), keepdims=True)
  region_peak = jnp.max(region, axis=(1, 2), keepdims=True)
  p = maps / jnp.where(map_peak > 0, map_peak, 1.0)
  q = region / jnp.where(region_peak > 0, region_peak, 1.0)
  union = jnp.sum(jnp.maximum(p, q), axis=(1, 2))
  iou = jnp.sum(jnp.minimum(p, q), axis=(1, 2)) / jnp.where(union > 0, union, 1.0)
  valid = (map_peak[:, 0, 0] > 0) & (region_peak[:, 0, 0] > 0)
  return jnp.where(valid, iou, jnp.nan)


def shapes_pixel_metrics(edited: jax.Array, source: jax.Array, target: jax.Array,
                         masks: jax.Array, attention_maps: jax.Array) -> Dict[str, jax.Array]:
  """The model-free shapes metrics of a batch (jit-able).

  Args:
    edited, source, target: (B, R, R, 3) float in [-1, 1] (decoder output / ``EditBatch``).
    masks: (B, R, R) float in [0, 1] (``EditBatch.arrays["mask"]``).
    attention_maps: (B, h, w) target-token attention (``Trajectory.attention_map_mean``).
  Returns:
    {"l1_outside", "l1_inside", "attention_mass_inside", "attention_soft_iou"} -> (B,) float32;
    the L1s are in [0, 1] pixel units, images clipped to [-1, 1] first (as a saved PNG is).
  """
  if edited.shape != source.shape or edited.shape != target.shape or edited.ndim != 4:
    raise ValueError(f"shapes_pixel_metrics: edited {edited.shape}, source {source.shape} and "
                     f"target {target.shape} must all be the same (B, R, R, 3).")
  if masks.shape != edited.shape[:3]:
    raise ValueError(f"shapes_pixel_metrics: masks {masks.shape} must be {edited.shape[:3]}.")
  unit = lambda x: (jnp.clip(x.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0  # -> [0, 1]
  inside = masks > 0
  return {
      "l1_outside": masked_mean_abs_difference(unit(edited), unit(source), ~inside),
      "l1_inside": masked_mean_abs_difference(unit(edited), unit(target), inside),
      "attention_mass_inside": attention_mass_inside(attention_maps, masks),
      "attention_soft_iou": attention_soft_iou(attention_maps, masks),
  }


def edit_accuracy(edited: np.ndarray, examples: Sequence) -> Dict[str, np.ndarray]:
  """``check_edit`` of each example (host-side numpy).

  Args:
    edited: (B, R, R, 3) float in [-1, 1] or uint8.
    examples: B ``shapes.ShapesEditExample`` (``shapes.example_from_record``), in batch order.
  Returns:
    {"success", "edit_ok", "preserved_ok"} -> (B,) float32 of 0/1.
  """
  edited = np.asarray(edited)
  if len(examples) != edited.shape[0]:
    raise ValueError(f"edit_accuracy: {edited.shape[0]} edited images but {len(examples)} "
                     "examples.")
  checks = [shapes_check.check_edit(image, example) for image, example in zip(edited, examples)]
  return {key: np.asarray([c[key] for c in checks], np.float32)
          for key in ("success", "edit_ok", "preserved_ok")}


_jit_pixel_metrics = jax.jit(shapes_pixel_metrics)
_jit_clip_text_similarity = jax.jit(image_metrics.clip_text_similarity, static_argnums=(0, 2))


def shapes_example_metrics(edited: np.ndarray, arrays: Mapping[str, np.ndarray],
                           attention_maps: np.ndarray, examples: Sequence,
                           clip_text, clip_text_params, clip_vision, clip_vision_params
                           ) -> Dict[str, np.ndarray]:
  """Every shapes metric of one evaluated batch (see the module docstring).

  Args:
    edited: (B, R, R, 3) float in [-1, 1], the edited images.
    arrays: the ``EditBatch.arrays`` of the batch ("source", "target", "mask", "caption_ids").
    attention_maps: (B, h, w) target-token attention of the edit.
    examples: the B ``ShapesEditExample`` of the batch, in order.
    clip_text, clip_text_params, clip_vision, clip_vision_params: the tiny CLIP towers (with
      projections) and their params.
  Returns:
    {name: (B,) float32 numpy} for every name in ``SHAPES_METRICS``.
  """
  edited = jnp.asarray(edited, jnp.float32)
  pixel = _jit_pixel_metrics(edited, jnp.asarray(arrays["source"]), jnp.asarray(arrays["target"]),
                             jnp.asarray(arrays["mask"]), jnp.asarray(attention_maps))
  clip_t = _jit_clip_text_similarity(clip_text, clip_text_params, clip_vision,
                                     clip_vision_params, (jnp.clip(edited, -1.0, 1.0) + 1.0) / 2.0,
                                     jnp.asarray(arrays["caption_ids"]))
  metrics = dict(edit_accuracy(np.asarray(edited), examples))
  metrics.update({k: np.asarray(v, np.float32) for k, v in pixel.items()})
  metrics["clip_t"] = np.asarray(clip_t, np.float32)
  return {k: metrics[k] for k in SHAPES_METRICS}
