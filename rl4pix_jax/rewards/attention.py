"""Attention-map reward: how well the target-token cross-attention covers the edit region.

Both the (step-averaged) attention map and the target region are turned into probability
distributions over the r x r cells, then compared with a distance; the reward is
``-distance`` (0 is best for every distance, reached when the two distributions are equal).

Our choices (the paper names an "Attention Map Loss" without giving its formula):
  * steps: the maps of the selected steps (all, or the last k) are averaged *before* the
    comparison, so with k = 0 the compared map is ``Trajectory.attention_map_mean``;
  * normalisation (``to_distribution``): negative values are clipped to 0, then each map is
    divided by its sum; a map whose sum is <= ``EPSILON`` (e.g. an all-zero mask: an edit
    with no region) becomes the uniform distribution 1 / r^2. The reward is then defined
    and finite, but prefers spread-out attention: drop or flag such examples upstream;
  * distances, with p = attention distribution and q = region distribution:
      l1:       sum |p - q|                                   (in [0, 2])
      l2:       sqrt(sum (p - q)^2)                           (Euclidean norm)
      kl:       KL(q || p) = sum q (log(q + eps) - log(p + eps)), eps = ``EPSILON``;
                it penalises attention missing where the region is, not attention outside
      soft_iou: 1 - sum min(a, b) / sum max(a, b) with a = p / max(p), b = q / max(q): the
                fuzzy (Ruzicka) IoU of the two peak-normalised maps, so a binary mask region
                is compared as the mask itself (on the sum-1 distributions the same ratio
                would be a function of l1 only).
"""

from __future__ import annotations

from typing import Callable, Dict

import jax.numpy as jnp

EPSILON = 1e-8
DISTANCES = ("l1", "l2", "kl", "soft_iou")


def resize_region_to_maps(mask: jnp.ndarray, side: int) -> jnp.ndarray:
  """Area-averages a pixel mask down to the attention-map grid.

  Args:
    mask: (B, H, W) float in [0, 1]; H and W must be multiples of ``side``.
    side: r, the side of the attention maps.
  Returns:
    (B, r, r) float32, each cell the mean of its (H / r) x (W / r) block.
  Raises:
    ValueError: wrong rank, or H or W not a multiple of ``side``.
  """
  if mask.ndim != 3:
    raise ValueError(f"resize_region_to_maps: mask has shape {mask.shape}, expected (B, H, W).")
  batch, height, width = mask.shape
  side = int(side)
  if side < 1 or height % side or width % side:
    raise ValueError(f"resize_region_to_maps: mask size {height}x{width} is not a multiple of "
                     f"the attention-map side {side}; resize the data (c.resolution) or pick "
                     "a capture_size that divides it.")
  blocks = mask.astype(jnp.float32).reshape(batch, side, height // side, side, width // side)
  return blocks.mean(axis=(2, 4))


def to_distribution(maps: jnp.ndarray) -> jnp.ndarray:
  """Normalises (..., r, r) non-negative maps to sum 1 over the last two axes.

  Negative values are clipped to 0; a map with sum <= ``EPSILON`` becomes uniform (1 / r^2).

  Returns:
    (..., r, r) float32 distributions.
  """
  maps = jnp.maximum(maps.astype(jnp.float32), 0.0)
  total = maps.sum(axis=(-2, -1), keepdims=True)
  uniform = jnp.full_like(maps, 1.0 / (maps.shape[-1] * maps.shape[-2]))
  return jnp.where(total > EPSILON, maps / jnp.maximum(total, EPSILON), uniform)


def _flat(x: jnp.ndarray) -> jnp.ndarray:
  return x.reshape(x.shape[:-2] + (-1,))


def l1_distance(p: jnp.ndarray, q: jnp.ndarray) -> jnp.ndarray:
  """sum |p - q| over the r x r cells of two (B, r, r) distributions -> (B,)."""
  return jnp.abs(_flat(p) - _flat(q)).sum(-1)


def l2_distance(p: jnp.ndarray, q: jnp.ndarray) -> jnp.ndarray:
  """Euclidean norm of p - q over the cells of two (B, r, r) distributions -> (B,)."""
  return jnp.sqrt(jnp.square(_flat(p) - _flat(q)).sum(-1))


def kl_distance(p: jnp.ndarray, q: jnp.ndarray) -> jnp.ndarray:
  """KL(q || p) = sum q (log(q + eps) - log(p + eps)) -> (B,); p = map, q = region."""
  p, q = _flat(p), _flat(q)
  return (q * (jnp.log(q + EPSILON) - jnp.log(p + EPSILON))).sum(-1)


def soft_iou_distance(p: jnp.ndarray, q: jnp.ndarray) -> jnp.ndarray:
  """1 - sum min(a, b) / sum max(a, b), a and b = p and q divided by their maxima -> (B,)."""
  a, b = _flat(p), _flat(q)
  a = a / jnp.maximum(a.max(-1, keepdims=True), EPSILON)
  b = b / jnp.maximum(b.max(-1, keepdims=True), EPSILON)
  iou = jnp.minimum(a, b).sum(-1) / jnp.maximum(jnp.maximum(a, b).sum(-1), EPSILON)
  return 1.0 - iou


DISTANCE_FNS: Dict[str, Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]] = {
    "l1": l1_distance, "l2": l2_distance, "kl": kl_distance, "soft_iou": soft_iou_distance}


def select_steps(maps: jnp.ndarray, last_steps: int = 0) -> jnp.ndarray:
  """Averages per-step maps over the counted steps.

  Args:
    maps: (B, T, r, r) float per-step maps, noisiest step first.
    last_steps: k; 0 averages all T steps, k in 1..T the last k (the least noisy).
  Returns:
    (B, r, r) float32.
  Raises:
    ValueError: wrong rank or k outside 0..T.
  """
  if maps.ndim != 4:
    raise ValueError(f"attention maps have shape {maps.shape}, expected (B, T, r, r) "
                     "(Trajectory.attention_maps).")
  steps = maps.shape[1]
  last_steps = int(last_steps)
  if not 0 <= last_steps <= steps:
    raise ValueError(f"attention_last_steps={last_steps} must be between 0 (all steps) and "
                     f"the number of sampler steps T={steps}.")
  if last_steps:
    maps = maps[:, steps - last_steps:]
  return maps.astype(jnp.float32).mean(axis=1)


def attention_distance(maps: jnp.ndarray, region: jnp.ndarray, distance: str) -> jnp.ndarray:
  """Distance (B,) between (B, r, r) maps and regions after ``to_distribution`` of both.

  Raises:
    ValueError: unknown distance name, or shapes that differ.
  """
  if distance not in DISTANCE_FNS:
    raise ValueError(f"attention_distance={distance!r} is unknown; expected one of "
                     f"{DISTANCES}.")
  if maps.shape != region.shape or maps.ndim != 3:
    raise ValueError(f"attention maps {maps.shape} and region {region.shape} must both be "
                     "(B, r, r) with the same r; resize the region with "
                     "resize_region_to_maps(mask, r).")
  return DISTANCE_FNS[distance](to_distribution(maps), to_distribution(region))


def attention_map_reward(maps: jnp.ndarray, region: jnp.ndarray, distance: str = "kl",
                         last_steps: int = 0) -> jnp.ndarray:
  """Attention-map reward -distance(mean of counted step maps, region), (B,) float32.

  Args:
    maps: (B, T, r, r) per-step target-token maps (``Trajectory.attention_maps``).
    region: (B, r, r) target region (a resized mask or a reference attention map).
    distance: "l1", "l2", "kl" or "soft_iou" (see the module docstring).
    last_steps: 0 counts all steps, k the last k.
  Returns:
    (B,) float32, <= 0, equal to 0 when the map is proportional to the region.
  """
  return -attention_distance(select_steps(maps, last_steps), region, distance)
