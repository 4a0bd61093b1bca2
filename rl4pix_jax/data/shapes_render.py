"""Anti-aliased rendering of shapes scenes with PIL (drawn at 4x, box-filtered down).

Box filtering means a pixel depends only on the 4x4 supersamples inside it, so two scenes that
differ in one object give identical pixels wherever neither version of that object reaches: the
edit masks of ``shapes.py`` are exact.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageDraw

from rl4pix_jax.data import shapes_scene

SUPERSAMPLE = 4
TEXTURE_AMPLITUDE = 6.0  # +- grey levels of the background noise


def _polygon(obj: shapes_scene.ShapeObject, size: int) -> List[Tuple[float, float]]:
  """Vertices (in supersampled pixels) of a polygon shape."""
  cx, cy = obj.center[0] * size, obj.center[1] * size
  r = obj.radius * size
  if obj.shape == "triangle":
    angles = [-90.0, 30.0, 150.0]
    radii = [r] * 3
  elif obj.shape == "diamond":
    angles = [-90.0, 0.0, 90.0, 180.0]
    radii = [r, 0.7 * r, r, 0.7 * r]
  elif obj.shape == "star":
    angles = [-90.0 + 36.0 * k for k in range(10)]
    radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
  else:
    raise ValueError(f"Shape {obj.shape!r} is not a polygon.")
  return [(cx + rr * math.cos(math.radians(a)), cy + rr * math.sin(math.radians(a)))
          for a, rr in zip(angles, radii)]


def _draw(draw: ImageDraw.ImageDraw, obj: shapes_scene.ShapeObject, size: int, fill) -> None:
  cx, cy = obj.center[0] * size, obj.center[1] * size
  r = obj.radius * size
  if obj.shape == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif obj.shape == "square":
    half = 0.75 * r
    draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=fill)
  elif obj.shape in ("triangle", "diamond", "star"):
    draw.polygon(_polygon(obj, size), fill=fill)
  else:
    raise ValueError(f"Unknown shape {obj.shape!r}: expected one of {shapes_scene.SHAPES}.")


def background_image(scene: shapes_scene.Scene, resolution: int) -> np.ndarray:
  """The scene's background with its faint noise texture.

  Returns:
    (resolution * SUPERSAMPLE, same, 3) uint8, the supersampled background.
  """
  rng = np.random.default_rng(scene.texture_seed)
  noise = rng.uniform(-TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE, (resolution, resolution, 1))
  base = np.asarray(shapes_scene.BACKGROUNDS[scene.background], np.float32) + noise
  base = np.repeat(np.repeat(base, SUPERSAMPLE, axis=0), SUPERSAMPLE, axis=1)
  return np.clip(np.round(base), 0, 255).astype(np.uint8)


def render_scene(scene: shapes_scene.Scene, resolution: int) -> np.ndarray:
  """Renders a scene.

  Args:
    scene: the scene.
    resolution: output side in pixels (>= 8).

  Returns:
    (resolution, resolution, 3) uint8 RGB image.
  """
  if resolution < 8:
    raise ValueError(f"resolution must be >= 8 pixels, got {resolution}.")
  size = resolution * SUPERSAMPLE
  canvas = Image.fromarray(background_image(scene, resolution), "RGB")
  draw = ImageDraw.Draw(canvas)
  for obj in scene.objects:
    _draw(draw, obj, size, shapes_scene.PALETTE[obj.color])
  return np.asarray(canvas.reduce(SUPERSAMPLE))


def object_coverage(obj: shapes_scene.ShapeObject, resolution: int) -> np.ndarray:
  """Fraction of each pixel that the object covers.

  Returns:
    (resolution, resolution) float32 in [0, 1]; 1 = fully inside, 0 = untouched.
  """
  size = resolution * SUPERSAMPLE
  canvas = Image.new("L", (size, size), 0)
  _draw(ImageDraw.Draw(canvas), obj, size, 255)
  return np.asarray(canvas.reduce(SUPERSAMPLE), np.float32) / 255.0
