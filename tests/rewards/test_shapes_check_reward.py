"""The jax shapes check and its rewards against the numpy check (``check_edit``) and by hand."""

import jax.numpy as jnp
import numpy as np
import pytest

from rl4pix_jax.data import loader, shapes, shapes_check
from rl4pix_jax.pretrain import editor_check
from rl4pix_jax.rewards import RewardContext, RewardInputs, get_reward
from rl4pix_jax.rewards import preservation
from rl4pix_jax.rewards import shapes_check as check_reward_lib

RESOLUTION = 32


@pytest.fixture(scope="module")
def examples():
  return editor_check.generated_examples(11, "validation", 24, RESOLUTION)


def _candidates(example, rng):
  """Edited images (uint8) that pass and fail the check in different ways."""
  target, source = example.target, example.source
  noisy = np.clip(target.astype(np.int32) + rng.integers(-40, 41, target.shape), 0,
                  255).astype(np.uint8)
  half = ((target.astype(np.float32) + source) / 2).round().astype(np.uint8)
  shifted = np.roll(target, 3, axis=1)
  return [target, source, noisy, half, shifted]


def _targets(examples):
  per = [shapes_check.check_targets(e.edit, e.source_scene.background, e.mask, e.resolution)
         for e in examples]
  return {k: jnp.asarray(np.stack([p[k] for p in per])) for k in per[0]}


def test_jax_check_equals_check_edit(examples):
  """Every value and verdict equals ``check_edit`` on the same uint8 images (nan = not
  applicable there, 0 here); the cases cover passes and each kind of failure."""
  rng = np.random.default_rng(0)
  rows, edited = [], []
  for example in examples:
    for image in _candidates(example, rng):
      rows.append(example)
      edited.append(image)
  scores = check_reward_lib.check_scores(
      jnp.asarray(np.stack(edited), jnp.float32) / 255.0,
      jnp.asarray(np.stack([e.source for e in rows]), jnp.float32) / 255.0, _targets(rows))
  reference = [shapes_check.check_edit(image, e) for image, e in zip(edited, rows)]
  for key in ("object_iou", "before_iou", "removed_fraction", "outside_change"):
    want = np.nan_to_num(np.asarray([r[key] for r in reference], np.float64), nan=0.0)
    # sums of <= 32*32 exact 0/1 or integer terms in float32: exact up to the final divide
    np.testing.assert_allclose(np.asarray(scores[key]), want, rtol=1e-6, atol=1e-6, err_msg=key)
  for key in ("edit_ok", "preserved_ok", "success"):
    np.testing.assert_array_equal(np.asarray(scores[key]), [r[key] for r in reference], key)
  outcomes = {r["success"] for r in reference}
  assert outcomes == {0.0, 1.0}  # both verdicts occur
  assert {e.task for e in rows} >= {"removal", "replacement", "insertion"}


def test_reward_value_by_hand(examples):
  """The target image of an insertion scores 1 + 1 (IoU 1, success); the source image of a
  removal scores 1 - 1 + 0 (the object is all still there, not a success)."""
  insertion = next(e for e in examples if e.task == "insertion")
  removal = next(e for e in examples if e.task == "removal")
  rows = [insertion, removal]
  edited = np.stack([insertion.target, removal.source]).astype(np.float32) / 255.0
  inputs = RewardInputs(edited_images=jnp.asarray(edited),
                        source_images=jnp.asarray(np.stack([e.source for e in rows]),
                                                  jnp.float32) / 255.0,
                        shapes_check=_targets(rows))
  value = np.asarray(get_reward("shapes_check")(inputs, RewardContext(config={})))
  reference = [shapes_check.check_edit(insertion.target, insertion),
               shapes_check.check_edit(removal.source, removal)]
  want = [reference[0]["object_iou"] + reference[0]["success"],
          1.0 - reference[1]["removed_fraction"] + reference[1]["success"]]
  np.testing.assert_allclose(value, want, rtol=1e-6)
  assert value[0] > 1.5 and value[1] < 0.5


def test_location_reward_by_hand(examples):
  """A 4x4 square of the requested colour painted in the image corner farthest from the
  requested object scores 1 - |square centre - region centroid| / (32 sqrt 2); the target
  image, whose new pixels are the requested object, scores about 1; the unchanged source and
  any removal 0."""
  insertion = next(e for e in examples if e.task == "insertion"
                   and e.edit.after.color not in {o.color for o in e.source_scene.objects})
  removal = next(e for e in examples if e.task == "removal")
  targets = _targets([insertion])
  colour = np.asarray(targets["check_colours"][0, int(targets["check_colour"][0])])
  rows_, cols_ = np.nonzero(np.asarray(targets["check_region"][0]))
  top = 26 if rows_.mean() < 16 else 2  # the square's first row and column
  left = 26 if cols_.mean() < 16 else 2
  painted = insertion.source.copy()
  painted[top:top + 4, left:left + 4] = colour.astype(np.uint8)
  distance = np.hypot(top + 1.5 - rows_.mean(), left + 1.5 - cols_.mean())
  want = 1.0 - distance / (32 * np.sqrt(2))
  rows = [insertion, insertion, insertion, removal]
  edited = np.stack([painted, insertion.target, insertion.source, removal.target])
  inputs = RewardInputs(
      edited_images=jnp.asarray(edited, jnp.float32) / 255.0,
      source_images=jnp.asarray(np.stack([e.source for e in rows]), jnp.float32) / 255.0,
      shapes_check=_targets(rows))
  value = np.asarray(get_reward("shapes_location")(inputs, RewardContext(config={})))
  np.testing.assert_allclose(value[0], want, rtol=1e-5)
  assert value[1] > 0.97 and distance > 10
  np.testing.assert_array_equal(value[2:], [0.0, 0.0])


def test_shapes_check_needs_the_targets():
  inputs = RewardInputs(edited_images=jnp.zeros((1, 4, 4, 3)),
                        source_images=jnp.zeros((1, 4, 4, 3)))
  with pytest.raises(ValueError, match="shapes_check"):
    get_reward("shapes_check")(inputs, RewardContext(config={}))
  with pytest.raises(ValueError, match="shapes_location"):
    get_reward("shapes_location")(inputs, RewardContext(config={}))


def test_change_inside_by_hand():
  """Change of 0.5 on 2 pixels inside and 0.25 on 4 outside: 1.0 / 2.0 = 0.5; none: 0."""
  source = np.zeros((2, 4, 4, 3), np.float32)
  edited = source.copy()
  mask = np.zeros((2, 4, 4), np.float32)
  mask[0, 0, :2] = 1
  edited[0, 0, :2] = 0.5
  edited[0, 3, :] = 0.25
  value = np.asarray(preservation.change_inside_mask(jnp.asarray(edited), jnp.asarray(source),
                                                     jnp.asarray(mask)))
  np.testing.assert_allclose(value, [0.5, 0.0], rtol=1e-6)


def test_loader_adds_the_check_targets(examples, tmp_path):
  """A shapes batch carries ``check_targets`` of each record's scene; a record without a
  scene description (MagicBrush) carries none."""
  from rl4pix_jax import tokenizer as tokenizer_lib
  recs = [shapes.example_to_record(e) for e in examples[:4]]
  config = loader.LoaderConfig(batch_size=4, resolution=RESOLUTION, shuffle=False,
                               num_epochs=1, num_threads=1)
  tok = tokenizer_lib.load_clip_tokenizer()
  batch = next(loader.make_edit_iterator(recs, tok, config))
  want = _targets(examples[:4])
  for key in shapes_check.CHECK_TARGET_KEYS:
    np.testing.assert_array_equal(batch.arrays[key], np.asarray(want[key]), key)
  plain = [dict(r, description="") for r in recs]
  batch = next(loader.make_edit_iterator(plain, tok, config))
  assert not any(k.startswith("check_") for k in batch.arrays)
