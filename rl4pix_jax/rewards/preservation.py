"""``preservation`` and ``change_inside``: extra registered rewards (and templates for yours).

``preservation`` rewards leaving the image alone where the edit should not act:
  -sum_{pixels} (1 - m) * mean_c |edited - source| / sum_{pixels} (1 - m),
with m the edit mask at the image resolution. Units: mean absolute pixel difference on the
[0, 1] scale, so the value is in [-1, 0] (0: the outside of the mask is untouched). A mask
covering the whole image leaves nothing to preserve and gives 0. Enable it with
``c.reward.extra = {"preservation": weight}``. ``change_inside`` is the share of the pixel
change that lies inside the mask (``change_inside_mask``), in [0, 1].
"""

from __future__ import annotations

import jax.numpy as jnp

from rl4pix_jax.rewards import attention
from rl4pix_jax.rewards.inputs import RewardContext, RewardInputs
from rl4pix_jax.rewards.registry import register_reward


def mask_at_image_size(mask: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  """(B, H', W') mask -> (B, height, width): unchanged, or area-averaged when H' = n height."""
  if mask.shape[1:] == (height, width):
    return mask.astype(jnp.float32)
  if mask.shape[1] != mask.shape[2] or height != width:
    raise ValueError(f"mask {mask.shape} and images of {height}x{width} pixels: give the mask "
                     "at the image resolution.")
  return attention.resize_region_to_maps(mask, height)


def outside_mask_difference(edited: jnp.ndarray, source: jnp.ndarray,
                            mask: jnp.ndarray) -> jnp.ndarray:
  """Mean |edited - source| over the pixels outside the mask (weighted by 1 - mask), (B,).

  Args:
    edited, source: (B, H, W, 3) float in [0, 1].
    mask: (B, H, W) (or an integer multiple of that size) float in [0, 1].
  """
  if edited.shape != source.shape or edited.ndim != 4:
    raise ValueError(f"edited {edited.shape} and source {source.shape} images must both be "
                     "(B, H, W, 3).")
  outside = 1.0 - mask_at_image_size(mask, edited.shape[1], edited.shape[2])
  difference = jnp.abs(edited.astype(jnp.float32) - source.astype(jnp.float32)).mean(-1)
  total = (outside * difference).sum(axis=(1, 2))
  return total / jnp.maximum(outside.sum(axis=(1, 2)), attention.EPSILON)


@register_reward("preservation")
def preservation_reward(inputs: RewardInputs, context: RewardContext) -> jnp.ndarray:
  """-mean |edited - source| outside the edit mask, (B,) float32 in [-1, 0]."""
  del context  # reads no options
  inputs.require("edited_images", "source_images", "mask", reward="preservation")
  return -outside_mask_difference(inputs.edited_images, inputs.source_images, inputs.mask)


def change_inside_mask(edited: jnp.ndarray, source: jnp.ndarray,
                       mask: jnp.ndarray) -> jnp.ndarray:
  """Fraction of the edit's total pixel change that lies inside the mask, (B,) in [0, 1].

  sum m * d / sum d with d = mean_c |edited - source| per pixel and m the edit mask at the
  image resolution; an edit that changes nothing gives 0.
  """
  if edited.shape != source.shape or edited.ndim != 4:
    raise ValueError(f"edited {edited.shape} and source {source.shape} images must both be "
                     "(B, H, W, 3).")
  inside = mask_at_image_size(mask, edited.shape[1], edited.shape[2])
  difference = jnp.abs(edited.astype(jnp.float32) - source.astype(jnp.float32)).mean(-1)
  total = difference.sum(axis=(1, 2))
  return (inside * difference).sum(axis=(1, 2)) / jnp.maximum(total, attention.EPSILON)


@register_reward("change_inside")
def change_inside_reward(inputs: RewardInputs, context: RewardContext) -> jnp.ndarray:
  """Where the pixels changed: the share of the change inside the edit mask, (B,) in [0, 1].

  A shaping term beside the attention reward: the attention term can be met by moving the
  target token's maps onto whatever changed; this one asks that what changed is the region
  to edit. Enable with ``c.reward.extra = {"change_inside": weight}``.
  """
  del context
  inputs.require("edited_images", "source_images", "mask", reward="change_inside")
  return change_inside_mask(inputs.edited_images, inputs.source_images, inputs.mask)
