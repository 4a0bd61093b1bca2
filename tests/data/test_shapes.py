"""Tests for the synthetic shapes edit generator, renderer, checker and preview."""

import dataclasses

import numpy as np
import pytest

from rl4pix_jax.data import preview
from rl4pix_jax.data import shapes
from rl4pix_jax.data import shapes_check
from rl4pix_jax.data import shapes_render
from rl4pix_jax.data import shapes_scene as sc

NUM_PER_TASK = 12


def _examples(task, resolution=32, seed=5):
  return [shapes.make_example(seed, i, resolution, task=task) for i in range(NUM_PER_TASK)]


def test_make_example_is_deterministic_and_pinned():
  first = shapes.make_example(0, 0, 64)
  second = shapes.make_example(0, 0, 64)
  for field in dataclasses.fields(first):
    a, b = getattr(first, field.name), getattr(second, field.name)
    if isinstance(a, np.ndarray):
      np.testing.assert_array_equal(a, b)
    else:
      assert a == b
  # Pinned: numpy's PCG64 and PIL rendering give the same example on every machine.
  assert first.example_id == "shapes-0-0"
  assert first.instruction == "make the yellow circle red"
  assert first.task == "transformation"
  assert int(first.source.astype(np.int64).sum()) == 2399972
  other = shapes.make_example(0, 1, 64)
  assert other.instruction != first.instruction or not np.array_equal(other.source,
                                                                         first.source)


@pytest.mark.parametrize("task", shapes.TASKS)
def test_every_task_type(task):
  for example in _examples(task):
    assert example.task == task
    start, end = example.phrase_span
    assert example.instruction[start:end] == example.object_phrase
    before = len(example.source_scene.objects)
    after = len(example.target_scene.objects)
    expected = {"removal": before - 1, "insertion": before + 1}.get(task, before)
    assert after == expected
    assert example.target_caption == sc.scene_caption(example.target_scene)
    assert example.source_caption == sc.scene_caption(example.source_scene)
    if task == "insertion":
      assert example.object_phrase == example.edit.after.phrase
      assert example.edit.detail in shapes.REGIONS
    else:
      assert example.object_phrase == example.edit.before.phrase
    if task == "replacement":
      assert example.edit.after.shape != example.edit.before.shape
    if task == "transformation":
      assert example.edit.detail in ("color", "bigger", "smaller")


def test_task_mix_and_phrasings_vary():
  examples = [shapes.make_example(1, i, 32) for i in range(80)]
  assert {e.task for e in examples} == set(shapes.TASKS)
  assert len({e.instruction.split(" the ")[0].split(" a")[0] for e in examples}) >= 8


@pytest.mark.parametrize("resolution", [32, 64, 128, 256])
def test_mask_is_exact_and_images_antialiased(resolution):
  count = 12 if resolution <= 64 else 2
  blended = 0
  for i in range(count):
    example = shapes.make_example(2, i, resolution)
    assert example.source.shape == (resolution, resolution, 3)
    assert example.source.dtype == np.uint8 and example.target.dtype == np.uint8
    assert example.mask.shape == (resolution, resolution) and example.mask.dtype == np.float32
    assert set(np.unique(example.mask)) <= {0.0, 1.0}
    changed = np.any(example.source != example.target, axis=-1)
    assert not np.any(changed & (example.mask == 0)), "target differs outside the mask"
    assert changed[example.mask > 0].mean() > 0.3, "the mask should mostly change"
    # Anti-aliasing: edge pixels blend object and background (neither grey nor pure palette).
    pixels = example.target.reshape(-1, 3).astype(int)
    grey = (pixels[:, 0] == pixels[:, 1]) & (pixels[:, 1] == pixels[:, 2])
    pure = np.zeros(len(pixels), bool)
    for colour in sc.PALETTE.values():
      pure |= np.all(pixels == colour, axis=-1)
    blended += int(np.sum(~grey & ~pure))
  assert blended > 10 * count


def test_objects_never_overlap_and_stay_inside():
  for i in range(40):
    example = shapes.make_example(3, i, 32)
    for scene in (example.source_scene, example.target_scene):
      for k, obj in enumerate(scene.objects):
        assert sc.fits(obj, scene.objects[:k] + scene.objects[k + 1:])
      assert len({o.phrase for o in scene.objects}) == len(scene.objects)


def test_make_example_rejects_bad_arguments():
  with pytest.raises(ValueError, match="task must be one of"):
    shapes.make_example(0, 0, 32, task="recolour")
  with pytest.raises(ValueError, match="seed and index must be >= 0"):
    shapes.make_example(-1, 0, 32)
  with pytest.raises(ValueError, match="resolution must be >= 8"):
    shapes.make_example(0, 0, 4)


def test_edit_mask_is_union_of_coverages():
  example = shapes.make_example(0, 7, 64, task="transformation")
  mask = shapes.edit_mask(example.edit, 64)
  before = shapes_render.object_coverage(example.edit.before, 64) > 0
  after = shapes_render.object_coverage(example.edit.after, 64) > 0
  np.testing.assert_array_equal(mask, (before | after).astype(np.float32))


def test_description_round_trip():
  example = shapes.make_example(4, 3, 32)
  edit, source_scene, target_scene = shapes.description_edit(
      shapes.example_description(example))
  assert edit == example.edit
  assert source_scene == example.source_scene and target_scene == example.target_scene
  with pytest.raises(ValueError, match="Malformed shapes scene description"):
    shapes.description_edit('{"edit": {}}')


def test_record_round_trip_keeps_example():
  example = shapes.make_example(4, 5, 32)
  record = shapes.example_to_record(example)
  rebuilt = shapes.example_from_record(record, index=0)
  np.testing.assert_array_equal(rebuilt.source, example.source)
  np.testing.assert_array_equal(rebuilt.target, example.target)
  np.testing.assert_array_equal(rebuilt.mask, example.mask)
  assert rebuilt.edit == example.edit and rebuilt.instruction == example.instruction


def test_scene_helpers():
  assert sc.with_article("orange star") == "an orange star"
  assert sc.with_article("red circle") == "a red circle"
  empty = sc.Scene("white", 0, ())
  assert sc.scene_caption(empty) == "an empty white background"
  one = sc.ShapeObject("circle", "red", (0.3, 0.3), 0.1)
  two = sc.ShapeObject("square", "blue", (0.7, 0.7), 0.1)
  three = sc.ShapeObject("star", "orange", (0.3, 0.7), 0.1)
  caption = sc.scene_caption(sc.Scene("light gray", 0, (one, two, three)))
  assert caption == ("a red circle, a blue square and an orange star on a light gray "
                     "background")
  assert sc.fits(two, [one]) and not sc.fits(dataclasses.replace(two, center=(0.35, 0.3)),
                                             [one])
  assert not sc.fits(dataclasses.replace(one, center=(0.05, 0.5)), [])
  crowded = [sc.ShapeObject("circle", "red", (x, y), 0.16) for x in (0.2, 0.5, 0.8)
             for y in (0.2, 0.5, 0.8)]
  assert sc.place_object(np.random.default_rng(0), "star", "red", crowded) is None
  placed = sc.place_object(np.random.default_rng(0), "star", "red", [one], (0.5, 0.5, 1, 1))
  assert placed.center[0] >= 0.5 and placed.center[1] >= 0.5
  assert sc.scene_from_dict(sc.scene_to_dict(empty)) == empty
  with pytest.raises(ValueError, match="lacks field 'objects'"):
    sc.scene_from_dict({"background": "white", "texture_seed": 0})
  with pytest.raises(ValueError, match="Unknown shape/colour 'hexagon'"):
    sc.object_from_dict({"shape": "hexagon", "color": "red", "center": [0.5, 0.5],
                         "radius": 0.1})
  assert sc.to_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'


def test_render_scene_and_coverage():
  obj = sc.ShapeObject("circle", "red", (0.5, 0.5), 0.25)
  scene = sc.Scene("white", 3, (obj,))
  image = shapes_render.render_scene(scene, 32)
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(image[16, 16], sc.PALETTE["red"])
  coverage = shapes_render.object_coverage(obj, 32)
  assert coverage.min() == 0.0 and coverage.max() == 1.0
  assert 0 < np.sum((coverage > 0) & (coverage < 1)) < 100  # a thin anti-aliased rim
  # Area in pixels of a radius-8 disc (PIL draws inclusive bounds: a few % larger).
  assert abs(coverage.sum() - np.pi * 8 ** 2) < 0.04 * np.pi * 8 ** 2
  background = shapes_render.background_image(scene, 8)
  assert background.shape == (32, 32, 3)
  assert np.abs(background.astype(int) - 250).max() <= shapes_render.TEXTURE_AMPLITUDE + 1
  with pytest.raises(ValueError, match="Unknown shape"):
    shapes_render.object_coverage(dataclasses.replace(obj, shape="blob"), 32)


@pytest.mark.parametrize("resolution", [32, 64])
def test_check_edit_target_passes_source_fails(resolution):
  for task in shapes.TASKS:
    for example in _examples(task, resolution, seed=9)[:6]:
      good = shapes_check.check_edit(example.target, example)
      bad = shapes_check.check_edit(example.source, example)
      assert good["success"] == 1.0, (example.instruction, good)
      assert good["outside_change"] == 0.0
      assert bad["success"] == 0.0, (example.instruction, bad)


def test_check_edit_details():
  example = shapes.make_example(0, 1, 64, task="insertion")
  as_float = example.target.astype(np.float32) / 127.5 - 1.0
  assert shapes_check.check_edit(as_float, example)["success"] == 1.0
  # The right object but the whole image changed: edit ok, preservation fails.
  noisy = np.clip(example.target.astype(int) + 40, 0, 255).astype(np.uint8)
  result = shapes_check.check_edit(noisy, example)
  assert result["outside_change"] > shapes_check.OUTSIDE_THRESHOLD
  assert result["preserved_ok"] == 0.0 and result["success"] == 0.0
  removal = shapes.make_example(0, 2, 64, task="removal")
  result = shapes_check.check_edit(removal.target, removal)
  assert result["removed_fraction"] == 0.0 and np.isnan(result["object_iou"])
  with pytest.raises(ValueError, match=r"expected \(64, 64, 3\)"):
    shapes_check.check_edit(example.target[:32], example)
  with pytest.raises(ValueError, match="expected uint8 or float"):
    shapes_check.check_edit(example.target.astype(np.int32), example)


def test_colour_classes_names_nearest_colour():
  image = np.asarray([[sc.PALETTE["blue"], (250, 250, 250)]], np.float32)
  classes, names = shapes_check.colour_classes(image, "white")
  assert [names[c] for c in classes[0]] == ["blue", "background"]


def test_preview_grid_draws_every_example():
  grid = preview.shapes_preview(seed=0, per_task=1, resolution=32)
  assert grid.mode == "RGB" and grid.size[0] > 3 * 128 and grid.size[1] > 2 * 128
  pixels = np.asarray(grid)
  assert (pixels < 250).mean() > 0.2
  with pytest.raises(ValueError, match="at least one example"):
    preview.preview_grid([])
