"""A PNG grid of example shapes edits (source | target | mask, with the instruction below)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rl4pix_jax.data import shapes

LABEL_HEIGHT = 40
GAP = 8


def _mask_overlay(example: shapes.ShapesEditExample) -> np.ndarray:
  """The target dimmed outside the mask: shows which pixels the edit may change."""
  weight = 0.25 + 0.75 * example.mask[..., None]
  return (example.target.astype(np.float32) * weight).astype(np.uint8)


def preview_grid(examples: Sequence[shapes.ShapesEditExample], columns: int = 2,
                 cell: int = 128) -> Image.Image:
  """Draws examples as tiles of three panels (source, target, target dimmed outside the mask).

  Args:
    examples: the examples (any resolution; panels are resized to ``cell`` pixels, nearest).
    columns: tiles per row.
    cell: panel side in pixels.
  Returns:
    An RGB PIL image.
  """
  if not examples:
    raise ValueError("preview_grid needs at least one example.")
  tile_width, tile_height = 3 * cell + 2 * 2, cell + LABEL_HEIGHT
  rows = -(-len(examples) // columns)
  width = columns * tile_width + (columns + 1) * GAP
  height = rows * tile_height + (rows + 1) * GAP + 24
  canvas = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  font = ImageFont.load_default(size=13)
  draw.text((GAP, 4), "source | target | edit mask (target dimmed outside the mask)",
            fill=(0, 0, 0), font=font)
  for n, example in enumerate(examples):
    left = GAP + (n % columns) * (tile_width + GAP)
    top = 24 + GAP + (n // columns) * (tile_height + GAP)
    for k, panel in enumerate((example.source, example.target, _mask_overlay(example))):
      image = Image.fromarray(panel).resize((cell, cell), Image.NEAREST)
      canvas.paste(image, (left + k * (cell + 2), top))
    label = f"[{example.task}] {example.instruction}"
    draw.text((left, top + cell + 3), label, fill=(0, 0, 0), font=font)
    draw.text((left, top + cell + 20), f"phrase: \"{example.object_phrase}\"",
              fill=(90, 90, 90), font=font)
  return canvas


def shapes_preview(seed: int = 0, per_task: int = 2, resolution: int = 64) -> Image.Image:
  """A grid of ``per_task`` examples of each task type.

  Task t scans indices ``100 * t, 100 * t + 1, ...`` and prefers examples whose edit sub-type
  (``Edit.detail``: colour, bigger, region, ...) is not shown yet, so the grid shows variety.
  """
  examples = []
  for t, task in enumerate(shapes.TASKS):
    candidates = [shapes.make_example(seed, 100 * t + i, resolution, task=task)
                  for i in range(4 * per_task)]
    chosen, details = [], set()
    for example in candidates:
      if len(chosen) < per_task and example.edit.detail not in details:
        chosen.append(example)
        details.add(example.edit.detail)
    chosen += [e for e in candidates if e not in chosen][:per_task - len(chosen)]
    examples += chosen
  return preview_grid(examples)
