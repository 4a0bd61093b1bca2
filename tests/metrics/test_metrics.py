"""rl4pix_jax.metrics: MagicBrush metrics vs numpy and PyTorch transformers (tiny random CLIP
and ViT), shapes metrics vs numpy, confidence intervals and report formatting."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rl4pix_jax.data import shapes
from rl4pix_jax.data import shapes_check
from rl4pix_jax.metrics import image_metrics as im
from rl4pix_jax.metrics import intervals
from rl4pix_jax.metrics import shapes_metrics as sm
from rl4pix_jax.models import clip
from rl4pix_jax.models import vit
from rl4pix_jax.weights import transformers_clip as tc
from rl4pix_jax.weights import transformers_vit as tv
from tests.helpers.torch_parity import assert_close as _assert_close
from tests.helpers.torch_parity import randomise as _randomise

TOWER_KW = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
CLIP_IMAGE = 16
VIT_IMAGE = 32
EOS = 999


def _cosine(a, b):
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """Tiny random transformers CLIPModel (16px) and ViTModel (32px), saved and loaded."""
  text = transformers.CLIPTextConfig(vocab_size=1000, eos_token_id=EOS, bos_token_id=EOS - 1,
                                     pad_token_id=EOS, max_position_embeddings=16, **TOWER_KW)
  vision = transformers.CLIPVisionConfig(image_size=CLIP_IMAGE, patch_size=4, **TOWER_KW)
  config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                   projection_dim=12)
  torch_clip = _randomise(transformers.CLIPModel(config), seed=21)
  torch_vit = _randomise(transformers.ViTModel(transformers.ViTConfig(
      image_size=VIT_IMAGE, patch_size=8, layer_norm_eps=1e-6, **TOWER_KW)), seed=22)
  clip_dir, vit_dir = (str(tmp_path_factory.mktemp(n)) for n in ("clip", "vit"))
  torch_clip.save_pretrained(clip_dir)
  torch_vit.save_pretrained(vit_dir)
  loaded = tc.load_clip(clip_dir)
  vit_config, vit_params = tv.load_vit(vit_dir)
  evaluation = im.EvaluationModels(
      clip_text_params=loaded.text_params, clip_vision_params=loaded.vision_params,
      dino_params=vit_params, clip_text=clip.CLIPTextModel(loaded.text_config),
      clip_vision=clip.CLIPVisionModel(loaded.vision_config), dino=vit.ViTModel(vit_config),
      dino_resize=VIT_IMAGE + 4)
  return dict(torch_clip=torch_clip, torch_vit=torch_vit, evaluation=evaluation)


def _caption_ids(batch, seed):
  rng = np.random.default_rng(seed)
  ids = np.full((batch, 16), EOS, np.int32)
  for row in range(batch):
    n = int(rng.integers(2, 12))
    ids[row, :n] = rng.integers(3, EOS, n)
  return ids


def _torch_image_features(torch_clip, images):
  """CLIP pixels of 16px images (no resize): crop nothing, normalise, NCHW."""
  mean = np.asarray(clip.OPENAI_CLIP_MEAN, np.float32)
  std = np.asarray(clip.OPENAI_CLIP_STD, np.float32)
  pixels = ((images - mean) / std).transpose(0, 3, 1, 2).astype(np.float32)
  with torch.no_grad():
    features = torch_clip.get_image_features(pixel_values=torch.from_numpy(pixels))
  return features.pooler_output.numpy()


def _torch_dino(torch_vit, images, resize_equals_input=True):
  """DINO embedding of (B, 36, 36, 3) images: resize 36 is the identity; crop 32 at offset 2."""
  assert resize_equals_input
  cropped = images[:, 2:34, 2:34]
  pixels = (cropped - np.asarray(vit.IMAGENET_MEAN)) / np.asarray(vit.IMAGENET_STD)
  with torch.no_grad():
    out = torch_vit(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).astype(np.float32)))
  return out.last_hidden_state[:, 0].numpy()


def test_l1_l2_match_numpy():
  rng = np.random.default_rng(0)
  edited, target = rng.uniform(size=(2, 3, 5, 7, 3)).astype(np.float32)
  # Both sides are float32 means of n = 105 positive terms, summed in XLA's order and in
  # numpy's (whose SIMD loops are chosen for the host CPU): up to n roundings of 6e-8,
  # rtol 6.3e-6. Measured 3.7e-7 relative (AMD EPYC), 0.4 of the old rtol=1e-6, which was
  # under n u. A real bug (l1 for l2, a wrong axis or scale) is >= 1e-2 relative.
  bound = edited[0].size * 2**-24
  np.testing.assert_allclose(im.l1_distance(jnp.asarray(edited), jnp.asarray(target)),
                             np.abs(edited - target).mean(axis=(1, 2, 3)), rtol=bound)
  np.testing.assert_allclose(im.l2_distance(jnp.asarray(edited), jnp.asarray(target)),
                             ((edited - target) ** 2).mean(axis=(1, 2, 3)), rtol=bound)
  with pytest.raises(ValueError, match="resize the edited images"):
    im.l1_distance(jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match=r"expected \(B, H, W, 3\)"):
    im.l2_distance(jnp.zeros((4, 4, 3)), jnp.zeros((4, 4, 3)))


def test_png_levels_and_resize():
  values = jnp.asarray([-0.2, 0.0, 0.5, 0.99, 1.3])
  np.testing.assert_allclose(im.to_png_levels(values), [0, 0, 128 / 255, 252 / 255, 1.0])
  images = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 6, 6, 3)), jnp.float32)
  np.testing.assert_allclose(im.resize_to(images, 6, 6), images, atol=1e-6)
  assert im.resize_to(images, 9, 4).shape == (2, 9, 4, 3)
  with pytest.raises(ValueError, match="expected"):
    im.resize_to(images[0], 3, 3)


def test_clip_and_dino_metrics_match_transformers(models):
  evaluation = models["evaluation"]
  rng = np.random.default_rng(2)
  edited, target = rng.uniform(size=(2, 3, CLIP_IMAGE, CLIP_IMAGE, 3)).astype(np.float32)
  ids = _caption_ids(3, seed=3)
  gen_features = _torch_image_features(models["torch_clip"], edited)
  gt_features = _torch_image_features(models["torch_clip"], target)
  with torch.no_grad():
    text_features = models["torch_clip"].get_text_features(
        input_ids=torch.from_numpy(ids.astype(np.int64))).pooler_output.numpy()

  clip_i = im.clip_image_similarity(evaluation.clip_vision, evaluation.clip_vision_params,
                                    jnp.asarray(edited), jnp.asarray(target))
  _assert_close(clip_i, _cosine(gen_features, gt_features), "CLIP-I")
  clip_t = im.clip_text_similarity(evaluation.clip_text, evaluation.clip_text_params,
                                   evaluation.clip_vision, evaluation.clip_vision_params,
                                   jnp.asarray(edited), jnp.asarray(ids))
  _assert_close(clip_t, _cosine(gen_features, text_features), "CLIP-T")
  with pytest.raises(ValueError, match="same B"):
    im.clip_text_similarity(evaluation.clip_text, evaluation.clip_text_params,
                            evaluation.clip_vision, evaluation.clip_vision_params,
                            jnp.asarray(edited), jnp.asarray(ids[:2]))

  dino_edited, dino_target = rng.uniform(size=(2, 3, 36, 36, 3)).astype(np.float32)
  dino = im.dino_similarity(evaluation.dino, evaluation.dino_params, jnp.asarray(dino_edited),
                            jnp.asarray(dino_target), resize=36)
  reference = _cosine(_torch_dino(models["torch_vit"], dino_edited),
                      _torch_dino(models["torch_vit"], dino_target))
  _assert_close(dino, reference, "DINO")


def test_magicbrush_metrics_jit_matches_parts(models):
  evaluation = models["evaluation"]
  rng = np.random.default_rng(4)
  edited, target = rng.uniform(size=(2, 2, 36, 36, 3)).astype(np.float32)
  ids = _caption_ids(2, seed=5)
  metrics = jax.jit(im.magicbrush_metrics)(evaluation, jnp.asarray(edited), jnp.asarray(target),
                                           jnp.asarray(ids))
  assert sorted(metrics) == sorted(im.MAGICBRUSH_METRICS + ("clip_t_oracle",))
  # CLIP at 36px: resized to 16 by preprocess_clip_images; reference features of those pixels.
  clip_pixels = lambda x: np.asarray(clip.preprocess_clip_images(jnp.asarray(x), CLIP_IMAGE))
  mean = np.asarray(clip.OPENAI_CLIP_MEAN, np.float32)
  std = np.asarray(clip.OPENAI_CLIP_STD, np.float32)
  gen = _torch_image_features(models["torch_clip"], clip_pixels(edited) * std + mean)
  gt = _torch_image_features(models["torch_clip"], clip_pixels(target) * std + mean)
  with torch.no_grad():
    text = models["torch_clip"].get_text_features(
        input_ids=torch.from_numpy(ids.astype(np.int64))).pooler_output.numpy()
  _assert_close(metrics["l1"], np.abs(edited - target).mean(axis=(1, 2, 3)), "l1")
  _assert_close(metrics["l2"], ((edited - target) ** 2).mean(axis=(1, 2, 3)), "l2")
  _assert_close(metrics["clip_i"], _cosine(gen, gt), "clip_i (jit)")
  _assert_close(metrics["clip_t"], _cosine(gen, text), "clip_t (jit)")
  _assert_close(metrics["clip_t_oracle"], _cosine(gt, text), "clip_t_oracle (jit)")
  _assert_close(metrics["dino"], _cosine(_torch_dino(models["torch_vit"], edited),
                                         _torch_dino(models["torch_vit"], target)), "dino (jit)")


def test_reference_numbers_and_rows():
  assert im.MAGICBRUSH_REFERENCE["InstructPix2Pix"] == dict(
      l1=0.1122, l2=0.0371, clip_i=0.8524, dino=0.7428, clip_t=0.2764)
  assert im.MAGICBRUSH_REFERENCE["InstructPix2Pix fine-tuned on MagicBrush"]["dino"] == 0.8987
  rows = im.reference_markdown_rows(("l1", "dino", "extra"))
  assert rows[0] == "| InstructPix2Pix (paper) | 0.1122 | 0.7428 | - |"
  assert rows[1].startswith("| InstructPix2Pix fine-tuned on MagicBrush (paper) | 0.0625 |")


def test_area_resize_matches_numpy():
  masks = (np.random.default_rng(6).uniform(size=(2, 12, 12)) > 0.5).astype(np.float32)
  blocks = masks.reshape(2, 3, 4, 3, 4).mean(axis=(2, 4))
  np.testing.assert_allclose(sm.area_resize_masks(jnp.asarray(masks), 3, 3), blocks, atol=1e-6)
  # Non-integer factors: area average = repeat each pixel `out` times, then block-mean by `in`.
  for in_size, out_size in ((12, 5), (5, 12), (7, 7)):
    vector = np.random.default_rng(in_size).uniform(size=in_size)
    reference = np.repeat(vector, out_size).reshape(out_size, in_size).mean(axis=1)
    np.testing.assert_allclose(sm.area_resize_matrix(in_size, out_size) @ vector, reference,
                               atol=1e-12)
  with pytest.raises(ValueError, match=">= 1"):
    sm.area_resize_matrix(0, 3)


def _numpy_localisation(maps, masks):
  factor = masks.shape[1] // maps.shape[1]
  side = maps.shape[1]
  region = masks.reshape(len(masks), side, factor, side, factor).mean(axis=(2, 4))
  mass, iou = [], []
  for a, m in zip(maps, region):
    mass.append((a * m).sum() / a.sum())
    p, q = a / a.max(), m / m.max()
    iou.append(np.minimum(p, q).sum() / np.maximum(p, q).sum())
  return np.asarray(mass), np.asarray(iou)


def test_attention_localisation_matches_numpy():
  rng = np.random.default_rng(7)
  maps = rng.uniform(size=(3, 8, 8)).astype(np.float32) ** 4
  masks = np.zeros((3, 32, 32), np.float32)
  masks[0, 4:20, 6:15] = 1.0
  masks[1, 10:30, 0:32] = 1.0
  masks[2, 1:3, 1:3] = 1.0  # smaller than one map cell: area fraction 4/16 of one cell
  mass, iou = _numpy_localisation(maps, masks)
  np.testing.assert_allclose(sm.attention_mass_inside(jnp.asarray(maps), jnp.asarray(masks)),
                             mass, rtol=1e-5)
  np.testing.assert_allclose(sm.attention_soft_iou(jnp.asarray(maps), jnp.asarray(masks)), iou,
                             rtol=1e-5)
  # A map equal to the resized mask has soft IoU 1; an empty mask gives NaN.
  region = np.asarray(sm.area_resize_masks(jnp.asarray(masks), 8, 8))
  np.testing.assert_allclose(sm.attention_soft_iou(jnp.asarray(region), jnp.asarray(masks)), 1.0,
                             rtol=1e-6)
  # All mass on cells fully inside the mask: everything is inside.
  full = jnp.asarray((region[:2] == 1.0).astype(np.float32))
  np.testing.assert_allclose(sm.attention_mass_inside(full, jnp.asarray(masks[:2])), 1.0,
                             rtol=1e-6)
  empty = sm.attention_soft_iou(jnp.asarray(maps[:1]), jnp.zeros((1, 32, 32)))
  assert np.isnan(np.asarray(empty)).all()
  with pytest.raises(ValueError, match="same B"):
    sm.attention_mass_inside(jnp.asarray(maps), jnp.asarray(masks[:2]))


def _examples(count, resolution=32):
  return [shapes.make_example(seed=5, index=i, resolution=resolution) for i in range(count)]


def test_shapes_pixel_metrics_match_numpy():
  examples = _examples(3)
  source = np.stack([e.source for e in examples]).astype(np.float32) / 127.5 - 1
  target = np.stack([e.target for e in examples]).astype(np.float32) / 127.5 - 1
  masks = np.stack([e.mask for e in examples])
  edited = np.clip(target + np.random.default_rng(8).normal(0, 0.2, target.shape), -1, 1)
  maps = np.random.default_rng(9).uniform(size=(3, 8, 8)).astype(np.float32)
  out = jax.jit(sm.shapes_pixel_metrics)(*(jnp.asarray(x, jnp.float32) for x in
                                           (edited, source, target, masks, maps)))
  unit = lambda x: (x + 1) / 2
  for b in range(3):
    inside = masks[b] > 0
    np.testing.assert_allclose(
        out["l1_outside"][b], np.abs(unit(edited[b]) - unit(source[b]))[~inside].mean(), rtol=1e-5)
    np.testing.assert_allclose(
        out["l1_inside"][b], np.abs(unit(edited[b]) - unit(target[b]))[inside].mean(), rtol=1e-5)
  mass, iou = _numpy_localisation(maps, masks)
  np.testing.assert_allclose(out["attention_mass_inside"], mass, rtol=1e-5)
  np.testing.assert_allclose(out["attention_soft_iou"], iou, rtol=1e-5)
  empty = sm.masked_mean_abs_difference(jnp.ones((1, 2, 2, 3)), jnp.zeros((1, 2, 2, 3)),
                                        jnp.zeros((1, 2, 2), bool))
  assert np.isnan(np.asarray(empty)).all()
  with pytest.raises(ValueError, match="same"):
    sm.shapes_pixel_metrics(jnp.asarray(edited), jnp.asarray(source[:2]), jnp.asarray(target),
                            jnp.asarray(masks), jnp.asarray(maps))


def test_shapes_example_metrics_end_to_end(models):
  evaluation = models["evaluation"]
  examples = _examples(4)
  arrays = {
      "source": np.stack([e.source for e in examples]).astype(np.float32) / 127.5 - 1,
      "target": np.stack([e.target for e in examples]).astype(np.float32) / 127.5 - 1,
      "mask": np.stack([e.mask for e in examples]),
      "caption_ids": _caption_ids(4, seed=10),
  }
  edited = arrays["target"].copy()
  edited[1] = arrays["source"][1]  # an unedited image fails the edit check
  maps = np.random.default_rng(11).uniform(size=(4, 8, 8)).astype(np.float32)
  metrics = sm.shapes_example_metrics(edited, arrays, maps, examples, evaluation.clip_text,
                                      evaluation.clip_text_params, evaluation.clip_vision,
                                      evaluation.clip_vision_params)
  assert tuple(metrics) == sm.SHAPES_METRICS
  for name, values in metrics.items():
    assert values.shape == (4,) and values.dtype == np.float32, name
  expected = [shapes_check.check_edit(edited[b], examples[b])["success"] for b in range(4)]
  np.testing.assert_array_equal(metrics["success"], expected)
  assert metrics["success"][0] == 1.0 and metrics["success"][1] == 0.0
  np.testing.assert_allclose(metrics["l1_inside"][[0, 2, 3]], 0.0, atol=1e-6)
  clip_t = im.clip_text_similarity(evaluation.clip_text, evaluation.clip_text_params,
                                   evaluation.clip_vision, evaluation.clip_vision_params,
                                   jnp.asarray((edited + 1) / 2),
                                   jnp.asarray(arrays["caption_ids"]))
  np.testing.assert_allclose(metrics["clip_t"], clip_t, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="3 examples"):
    sm.edit_accuracy(edited, examples[:3])


def test_summarise_interval():
  rng = np.random.default_rng(12)
  values = rng.normal(2.0, 1.0, 400)
  summary = intervals.summarise(values)
  assert summary["n"] == 400 and summary["mean"] == pytest.approx(values.mean())
  # The bootstrap interval of a mean is close to the normal one: mean +- 1.96 s / sqrt(n).
  half_width = 1.96 * values.std(ddof=1) / math.sqrt(400)
  assert summary["ci_low"] == pytest.approx(values.mean() - half_width, abs=0.15 * half_width)
  assert summary["ci_high"] == pytest.approx(values.mean() + half_width, abs=0.15 * half_width)
  assert intervals.summarise(values) == summary  # fixed seed: reproducible
  with_nan = intervals.summarise(np.concatenate([values, [np.nan, np.inf]]))
  assert with_nan == summary
  assert intervals.summarise([0.5] * 7) == {"mean": 0.5, "ci_low": 0.5, "ci_high": 0.5, "n": 7}
  empty = intervals.summarise([np.nan])
  assert empty["n"] == 0 and math.isnan(empty["mean"])
  binary = intervals.summarise([1, 0, 1, 1], num_resamples=2500)
  assert 0.0 <= binary["ci_low"] <= 0.75 <= binary["ci_high"] <= 1.0
  with pytest.raises(ValueError, match="confidence"):
    intervals.summarise(values, confidence=95)


def test_wilson_interval_hand_values():
  # 0 of n: [0, z^2 / (n + z^2)]; n of n mirrors it; 1.95996 = the 97.5% normal quantile.
  z2 = 1.959963984540054 ** 2
  low, high = intervals.wilson_interval(0, 64)
  assert low == 0.0 and high == pytest.approx(z2 / (64 + z2), rel=1e-12)
  assert intervals.wilson_interval(64, 64) == pytest.approx((1 - high, 1.0), rel=1e-12)
  # 32 of 64: centred on 0.5, half width z sqrt(1/256 + z^2/16384) / (1 + z^2/64).
  half = math.sqrt(z2) * math.sqrt(0.25 / 64 + z2 / (4 * 64 ** 2)) / (1 + z2 / 64)
  assert intervals.wilson_interval(32, 64) == pytest.approx((0.5 - half, 0.5 + half), rel=1e-12)
  assert all(math.isnan(x) for x in intervals.wilson_interval(0, 0))
  with pytest.raises(ValueError, match="confidence"):
    intervals.wilson_interval(1, 2, confidence=95)


def test_metrics_report_json_and_markdown():
  per_example = {"l1": np.asarray([0.1, 0.2, 0.3]), "clip_t": np.asarray([np.nan, np.nan]),
                 "success": np.asarray([1.0, 1.0, 1.0])}
  report, row = intervals.metrics_report(per_example, "supervised", keys=["l1", "success",
                                                                          "clip_t"])
  json.loads(json.dumps(report, allow_nan=False))  # strictly valid JSON
  assert report["l1"]["mean"] == pytest.approx(0.2) and report["l1"]["n"] == 3
  assert report["clip_t"] == {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
  assert report["confidence"] == 0.95
  summary = intervals.summarise(per_example["l1"])
  assert row == (f"| supervised | 0.2000 [{summary['ci_low']:.4f}, {summary['ci_high']:.4f}] | "
                 "1.0000 [1.0000, 1.0000] | - |")
  assert intervals.markdown_header(["l1", "success"]) == "| model | l1 | success |\n|---|---|---|"
  with pytest.raises(ValueError, match="no per-example values"):
    intervals.metrics_report(per_example, "x", keys=["dino"])
