"""Scenes of the synthetic "shapes edit" dataset: objects, palette, placement and captions.

A scene is a background plus 0 to 4 non-overlapping objects. Geometry is in fractions of the
image side (resolution independent): an object's ``center`` is ``(x, y)`` with ``x`` to the right
and ``y`` downwards, both in [0, 1]; its ``radius`` is the radius of its bounding circle. Two
objects never overlap because their bounding circles keep a gap of ``MIN_GAP``.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

# Named colours (RGB, 0..255). Chosen to be far apart and far from the backgrounds.
PALETTE: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 190),
    "orange": (245, 130, 20),
}
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "light gray": (205, 205, 205),
}
MIN_RADIUS = 0.10
MAX_RADIUS = 0.16
MIN_GAP = 0.03
BORDER = 0.02
MAX_OBJECTS = 4


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  """One object of a scene.

  Attributes:
    shape: one of ``SHAPES``.
    color: a key of ``PALETTE``.
    center: ``(x, y)`` in fractions of the image side, y downwards.
    radius: bounding-circle radius in fractions of the image side.
  """
  shape: str
  color: str
  center: Tuple[float, float]
  radius: float

  @property
  def phrase(self) -> str:
    """The object's name in instructions and captions, e.g. ``"red circle"``."""
    return f"{self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
  """A background and its objects, drawn in order.

  Attributes:
    background: a key of ``BACKGROUNDS``.
    texture_seed: seed of the faint background noise (the same in source and target).
    objects: the objects, at most ``MAX_OBJECTS``.
  """
  background: str
  texture_seed: int
  objects: Tuple[ShapeObject, ...]


def with_article(phrase: str) -> str:
  """Returns ``phrase`` with "a" or "an" in front (``"an orange star"``)."""
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def scene_caption(scene: Scene) -> str:
  """A caption of the whole scene, e.g. "a red circle and a blue square on a white background"."""
  names = [with_article(o.phrase) for o in scene.objects]
  background = f"a {scene.background} background"
  if not names:
    return f"an empty {scene.background} background"
  if len(names) == 1:
    listed = names[0]
  else:
    listed = ", ".join(names[:-1]) + " and " + names[-1]
  return f"{listed} on {background}"


def fits(candidate: ShapeObject, others: Sequence[ShapeObject]) -> bool:
  """Whether ``candidate`` lies inside the image and keeps ``MIN_GAP`` from every other object."""
  x, y = candidate.center
  r = candidate.radius
  lo, hi = r + BORDER, 1.0 - r - BORDER
  if not (lo <= x <= hi and lo <= y <= hi):
    return False
  for other in others:
    distance = float(np.hypot(x - other.center[0], y - other.center[1]))
    if distance < r + other.radius + MIN_GAP:
      return False
  return True


def place_object(rng: np.random.Generator, shape: str, color: str,
                 others: Sequence[ShapeObject],
                 region: Tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0),
                 radius: Optional[float] = None, tries: int = 40) -> Optional[ShapeObject]:
  """Samples a free position (and a radius unless given) for a new object.

  Args:
    rng: numpy generator (consumed deterministically).
    shape: the object's shape.
    color: the object's colour.
    others: objects already in the scene.
    region: ``(x0, y0, x1, y1)`` fractions; the center is drawn inside it.
    radius: fixed radius, or None to draw one in [MIN_RADIUS, MAX_RADIUS].
    tries: rejection-sampling attempts.

  Returns:
    The placed object, or None when no free spot was found.
  """
  x0, y0, x1, y1 = region
  for _ in range(tries):
    r = float(rng.uniform(MIN_RADIUS, MAX_RADIUS)) if radius is None else radius
    center = (float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1)))
    candidate = ShapeObject(shape, color, (round(center[0], 4), round(center[1], 4)),
                            round(r, 4))
    if fits(candidate, others):
      return candidate
  return None


def sample_scene(rng: np.random.Generator, num_objects: int) -> Optional[Scene]:
  """Samples a scene with ``num_objects`` objects of distinct phrases (colour + shape).

  Returns:
    The scene, or None when the objects did not fit (the caller draws again).
  """
  background = str(rng.choice(list(BACKGROUNDS)))
  objects = []
  used = set()
  for _ in range(num_objects):
    while True:
      shape, color = str(rng.choice(SHAPES)), str(rng.choice(list(PALETTE)))
      if (color, shape) not in used:
        break
    placed = place_object(rng, shape, color, objects)
    if placed is None:
      return None
    used.add((color, shape))
    objects.append(placed)
  return Scene(background, int(rng.integers(0, 2**31 - 1)), tuple(objects))


def scene_to_dict(scene: Scene) -> dict:
  """A JSON-ready dict of ``scene``."""
  return dataclasses.asdict(scene)


def scene_from_dict(data: dict) -> Scene:
  """Inverse of ``scene_to_dict``; raises ValueError naming a missing or unknown field."""
  try:
    objects = tuple(object_from_dict(o) for o in data["objects"])
    return Scene(str(data["background"]), int(data["texture_seed"]), objects)
  except KeyError as e:
    raise ValueError(f"Scene description lacks field {e}; got keys {sorted(data)}.") from e


def object_from_dict(data: Optional[dict]) -> Optional[ShapeObject]:
  """Rebuilds a ``ShapeObject`` from ``dataclasses.asdict`` output (None stays None)."""
  if data is None:
    return None
  obj = ShapeObject(str(data["shape"]), str(data["color"]),
                    (float(data["center"][0]), float(data["center"][1])), float(data["radius"]))
  if obj.shape not in SHAPES or obj.color not in PALETTE:
    raise ValueError(f"Unknown shape/colour {obj.shape!r}/{obj.color!r}: expected one of "
                     f"{SHAPES} and {tuple(PALETTE)}.")
  return obj


def to_json(data: dict) -> str:
  """Compact, key-sorted JSON (stable across machines)."""
  return json.dumps(data, sort_keys=True, separators=(",", ":"))
