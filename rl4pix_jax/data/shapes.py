"""The synthetic "shapes edit" dataset: deterministic (seed, index) -> edit example.

Every example is a scene of simple coloured shapes (``shapes_scene``), one edit of one of the
paper's four task types, and the rendered before/after images (``shapes_render``):

  replacement     "turn the red circle into a blue square"  (phrase: "red circle")
  removal         "remove the green triangle"               (phrase: "green triangle")
  insertion       "add a yellow star in the top left"        (phrase: "yellow star")
  transformation  "make the blue square bigger", "make the red circle purple"
                                                             (phrase: "blue square"/"red circle")

The object phrase always occurs literally in the instruction; ``phrase_span`` is its character
span. The edit mask marks every pixel that either version of the edited object touches (union of
before/after coverage > 0), so the target equals the source exactly outside the mask.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Tuple

import numpy as np

from rl4pix_jax.data import records
from rl4pix_jax.data import shapes_render
from rl4pix_jax.data import shapes_scene as sc

TASKS: Tuple[str, ...] = records.TASKS
REGIONS = {
    "top left": (0.0, 0.0, 0.5, 0.5),
    "top right": (0.5, 0.0, 1.0, 0.5),
    "bottom left": (0.0, 0.5, 0.5, 1.0),
    "bottom right": (0.5, 0.5, 1.0, 1.0),
    "center": (0.35, 0.35, 0.65, 0.65),
}
REPLACE_TEMPLATES = ("turn the {old} into {new}", "replace the {old} with {new}",
                     "change the {old} to {new}", "make the {old} {new}")
REMOVE_TEMPLATES = ("remove the {old}", "delete the {old}", "take away the {old}",
                    "get rid of the {old}")
INSERT_TEMPLATES = ("add {new} in the {region}", "put {new} in the {region}",
                    "place {new} in the {region}", "insert {new} in the {region}")
RECOLOR_TEMPLATES = ("make the {old} {color}", "paint the {old} {color}",
                     "color the {old} {color}", "turn the {old} {color}")
BIGGER_TEMPLATES = ("make the {old} bigger", "enlarge the {old}", "make the {old} larger")
SMALLER_TEMPLATES = ("make the {old} smaller", "shrink the {old}",
                     "reduce the size of the {old}")
BIGGER_FACTOR = 1.5
SMALLER_FACTOR = 0.6


@dataclasses.dataclass(frozen=True)
class Edit:
  """What changes between source and target scenes.

  Attributes:
    task: one of ``TASKS``.
    before: the edited object in the source (None for insertion).
    after: the object in the target (None for removal).
    detail: sub-type: "shape+color", "remove", region name, "color", "bigger" or "smaller".
  """
  task: str
  before: Optional[sc.ShapeObject]
  after: Optional[sc.ShapeObject]
  detail: str


@dataclasses.dataclass(frozen=True)
class ShapesEditExample:
  """One example; images are (R, R, 3) uint8 RGB, the mask is (R, R) float32 in {0, 1}."""
  example_id: str
  task: str
  instruction: str
  object_phrase: str
  phrase_span: Tuple[int, int]
  source_caption: str
  target_caption: str
  source_scene: sc.Scene
  target_scene: sc.Scene
  edit: Edit
  source: np.ndarray
  target: np.ndarray
  mask: np.ndarray

  @property
  def resolution(self) -> int:
    return int(self.source.shape[0])


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def _replace(scene: sc.Scene, index: int, new: Optional[sc.ShapeObject]) -> sc.Scene:
  objects = list(scene.objects)
  if new is None:
    del objects[index]
  else:
    objects[index] = new
  return dataclasses.replace(scene, objects=tuple(objects))


def _unused_pair(rng, scene: sc.Scene, keep_shape=None, keep_color=None, avoid_shape=None):
  """A (shape, colour) whose phrase no object of ``scene`` has (shape != avoid_shape)."""
  used = {(o.shape, o.color) for o in scene.objects}
  choices = [(s, c) for s in sc.SHAPES for c in sc.PALETTE
             if (s, c) not in used and s != avoid_shape
             and (keep_shape is None or s == keep_shape)
             and (keep_color is None or c == keep_color)]
  return _pick(rng, choices) if choices else None


def _edit_replacement(rng, scene):
  i = int(rng.integers(len(scene.objects)))
  old = scene.objects[i]
  # Replacement always changes the shape (recolouring alone is a transformation).
  mode = _pick(rng, ("shape+color", "shape"))
  pair = _unused_pair(rng, scene, keep_color=old.color if mode == "shape" else None,
                      avoid_shape=old.shape)
  new = dataclasses.replace(old, shape=pair[0], color=pair[1])
  template = _pick(rng, REPLACE_TEMPLATES)
  instruction = template.format(old=old.phrase, new=sc.with_article(new.phrase))
  return Edit("replacement", old, new, mode), _replace(scene, i, new), instruction, old


def _edit_removal(rng, scene):
  i = int(rng.integers(len(scene.objects)))
  old = scene.objects[i]
  instruction = _pick(rng, REMOVE_TEMPLATES).format(old=old.phrase)
  return Edit("removal", old, None, "remove"), _replace(scene, i, None), instruction, old


def _edit_insertion(rng, scene):
  if len(scene.objects) >= sc.MAX_OBJECTS:
    return None
  pair = _unused_pair(rng, scene)
  region = _pick(rng, tuple(REGIONS))
  new = sc.place_object(rng, pair[0], pair[1], scene.objects, REGIONS[region])
  if new is None:
    return None
  target = dataclasses.replace(scene, objects=scene.objects + (new,))
  instruction = _pick(rng, INSERT_TEMPLATES).format(new=sc.with_article(new.phrase),
                                                     region=region)
  return Edit("insertion", None, new, region), target, instruction, new


def _edit_transformation(rng, scene):
  i = int(rng.integers(len(scene.objects)))
  old = scene.objects[i]
  others = scene.objects[:i] + scene.objects[i + 1:]
  mode = _pick(rng, ("color", "bigger", "smaller"))
  if mode == "color":
    pair = _unused_pair(rng, scene, keep_shape=old.shape)
    if pair is None:
      return None
    new = dataclasses.replace(old, color=pair[1])
    instruction = _pick(rng, RECOLOR_TEMPLATES).format(old=old.phrase, color=new.color)
  else:
    factor = BIGGER_FACTOR if mode == "bigger" else SMALLER_FACTOR
    new = dataclasses.replace(old, radius=round(old.radius * factor, 4))
    if not sc.fits(new, others):
      return None
    templates = BIGGER_TEMPLATES if mode == "bigger" else SMALLER_TEMPLATES
    instruction = _pick(rng, templates).format(old=old.phrase)
  return Edit("transformation", old, new, mode), _replace(scene, i, new), instruction, old


_EDITORS = {"replacement": _edit_replacement, "removal": _edit_removal,
            "insertion": _edit_insertion, "transformation": _edit_transformation}


def edit_mask(edit: Edit, resolution: int) -> np.ndarray:
  """Pixels the edit should change: union of before/after coverage > 0.

  Returns:
    (resolution, resolution) float32 in {0, 1}.
  """
  mask = np.zeros((resolution, resolution), np.float32)
  for obj in (edit.before, edit.after):
    if obj is not None:
      mask = np.maximum(mask, (shapes_render.object_coverage(obj, resolution) > 0))
  return mask.astype(np.float32)


def make_example(seed: int, index: int, resolution: int = 64,
                 task: Optional[str] = None) -> ShapesEditExample:
  """Generates example ``index`` of the dataset with ``seed`` (same on every machine).

  Args:
    seed: dataset seed (non-negative int); splits use different seeds.
    index: example index (non-negative int).
    resolution: image side in pixels (>= 8; 32, 64, 128, 256 are the usual sizes).
    task: force a task type (one of ``TASKS``); None draws one uniformly.

  Returns:
    The example; its id is ``"shapes-{seed}-{index}"``.
  """
  if task is not None and task not in TASKS:
    raise ValueError(f"task must be one of {TASKS} or None, got {task!r}.")
  if seed < 0 or index < 0:
    raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}.")
  rng = np.random.default_rng([seed, index])
  chosen = task or _pick(rng, TASKS)
  for _ in range(200):
    low = 0 if chosen == "insertion" else 1
    high = sc.MAX_OBJECTS - 1 if chosen == "insertion" else sc.MAX_OBJECTS
    scene = sc.sample_scene(rng, int(rng.integers(low, high + 1)))
    if scene is None:
      continue
    result = _EDITORS[chosen](rng, scene)
    if result is not None:
      break
  else:  # pragma: no cover - the samplers succeed within a few tries
    raise RuntimeError(f"Could not generate a {chosen} example for seed={seed}, index={index}.")
  edit, target_scene, instruction, phrase_object = result
  phrase = phrase_object.phrase
  start = instruction.index(phrase)
  return ShapesEditExample(
      example_id=f"shapes-{seed}-{index}", task=chosen, instruction=instruction,
      object_phrase=phrase, phrase_span=(start, start + len(phrase)),
      source_caption=sc.scene_caption(scene), target_caption=sc.scene_caption(target_scene),
      source_scene=scene, target_scene=target_scene, edit=edit,
      source=shapes_render.render_scene(scene, resolution),
      target=shapes_render.render_scene(target_scene, resolution),
      mask=edit_mask(edit, resolution))


def example_description(example: ShapesEditExample) -> str:
  """JSON of the scenes and the edit (stored with each record, read by ``description_edit``)."""
  return sc.to_json({
      "source_scene": sc.scene_to_dict(example.source_scene),
      "target_scene": sc.scene_to_dict(example.target_scene),
      "edit": dataclasses.asdict(example.edit),
      "resolution": example.resolution,
  })


def description_edit(description: str) -> Tuple[Edit, sc.Scene, sc.Scene]:
  """Parses ``example_description`` output into (edit, source scene, target scene).

  Raises:
    ValueError: naming the problem when the JSON is malformed or lacks a field.
  """
  try:
    data = json.loads(description)
    edit = data["edit"]
    parsed = Edit(str(edit["task"]), sc.object_from_dict(edit["before"]),
                  sc.object_from_dict(edit["after"]), str(edit["detail"]))
    return (parsed, sc.scene_from_dict(data["source_scene"]),
            sc.scene_from_dict(data["target_scene"]))
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"Malformed shapes scene description ({e!r}): expected the JSON written "
                     "by example_description.") from e


def example_to_record(example: ShapesEditExample) -> dict:
  """The stored record (``records.RECORD_FIELDS``) of an example; images as PNG bytes."""
  return {
      "example_id": example.example_id,
      "source_image": records.encode_png(example.source),
      "target_image": records.encode_png(example.target),
      "mask_image": records.encode_png((example.mask * 255).astype(np.uint8)),
      "instruction": example.instruction,
      "object_phrase": example.object_phrase,
      "source_caption": example.source_caption,
      "target_caption": example.target_caption,
      "task": TASKS.index(example.task),
      "description": example_description(example),
  }


def example_from_record(record, index: Optional[int] = None) -> ShapesEditExample:
  """Rebuilds an example from its stored record at its stored resolution (for evaluation).

  Raises:
    records.RecordError: a bad field (named), including a missing or malformed description.
  """
  name = records.record_name(record, index)
  description = records.as_text(records.get_field(record, "description", name))
  try:
    edit, source_scene, target_scene = description_edit(description)
    resolution = int(json.loads(description)["resolution"])
  except (ValueError, KeyError) as e:
    raise records.RecordError(name, "description", str(e)) from e
  decoded = records.decode_record(record, resolution, index)
  start, end = records.check_phrase(decoded["instruction"], decoded["object_phrase"], name)
  return ShapesEditExample(
      example_id=decoded["example_id"], task=TASKS[decoded["task"]],
      instruction=decoded["instruction"], object_phrase=decoded["object_phrase"],
      phrase_span=(start, end), source_caption=decoded["source_caption"],
      target_caption=decoded["target_caption"], source_scene=source_scene,
      target_scene=target_scene, edit=edit, source=decoded["source"],
      target=decoded["target"], mask=(decoded["mask"] >= 0.5).astype(np.float32))
