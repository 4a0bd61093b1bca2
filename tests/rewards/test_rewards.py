"""Rewards: attention distances against numpy/scipy, the reference region on a tiny UNet, CLIP
rewards against PyTorch transformers on tiny random weights, the combination and the registry.

CLIP comparisons use images already at the tower's image size (16 px), so
``preprocess_clip_images`` only normalises (no resampling enters the comparison).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import torch
import transformers

from configs import shapes as shapes_config
from rl4pix_jax import rewards
from rl4pix_jax.diffusion import ddim
from rl4pix_jax.diffusion import sampling
from rl4pix_jax.models import clip
from rl4pix_jax.weights import transformers_clip
from tests.helpers import tiny_models
from tests.helpers.torch_parity import randomise as _randomise

B, T, R = 3, 4, 8
IMAGE = 16  # pixels; also the tiny CLIP's image_size
SEQ = 77


# ---- numpy references (float64) ---------------------------------------------------------

def np_distribution(x):
  x = np.maximum(np.asarray(x, np.float64), 0.0)
  total = x.sum(axis=(-2, -1), keepdims=True)
  return np.where(total > 1e-8, x / np.maximum(total, 1e-8), 1.0 / (x.shape[-1] * x.shape[-2]))


def np_distance(maps, region, name):
  p = np_distribution(maps).reshape(len(maps), -1)
  q = np_distribution(region).reshape(len(region), -1)
  if name == "l1":
    return np.abs(p - q).sum(-1)
  if name == "l2":
    return np.linalg.norm(p - q, axis=-1)
  if name == "kl":  # scipy's relative entropy sum q log(q / p), 0 log 0 = 0
    return np.array([scipy.stats.entropy(qi, pi) for pi, qi in zip(p, q)])
  a = p / p.max(-1, keepdims=True)
  b = q / q.max(-1, keepdims=True)
  return 1.0 - np.minimum(a, b).sum(-1) / np.maximum(a, b).sum(-1)


def random_maps(seed, shape=(B, T, R, R)):
  return np.random.default_rng(seed).uniform(0.01, 1.0, shape).astype(np.float32)


def random_mask(seed, side=IMAGE, batch=B):
  """Rectangles (as the shapes data) of random size and place."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((batch, side, side), np.float32)
  for b in range(batch):
    top, left = rng.integers(0, side // 2, 2)
    height, width = rng.integers(2, side // 2, 2)
    mask[b, top:top + height, left:left + width] = 1.0
  return mask


# ---- attention-map reward --------------------------------------------------------------

def test_resize_region_to_maps_is_area_average():
  mask = np.random.default_rng(0).uniform(size=(2, 12, 8)).astype(np.float32)
  out = rewards.resize_region_to_maps(jnp.asarray(mask), 4)
  want = np.stack([[[mask[b, 3 * i:3 * i + 3, 2 * j:2 * j + 2].mean() for j in range(4)]
                    for i in range(4)] for b in range(2)])
  np.testing.assert_allclose(out, want, rtol=1e-6)
  assert out.shape == (2, 4, 4) and out.dtype == jnp.float32
  with pytest.raises(ValueError, match="not a multiple of the attention-map side 5"):
    rewards.resize_region_to_maps(jnp.zeros((1, 16, 16)), 5)
  with pytest.raises(ValueError, match=r"expected \(B, H, W\)"):
    rewards.resize_region_to_maps(jnp.zeros((16, 16)), 4)


def test_to_distribution_sums_to_one_and_empty_is_uniform():
  maps = random_maps(1, (2, R, R))
  maps[1] = 0.0  # an all-zero region
  maps[0, 0, 0] = -3.0  # negatives are clipped
  out = np.asarray(rewards.to_distribution(jnp.asarray(maps)))
  np.testing.assert_allclose(out.sum((-2, -1)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(out[1], np.full((R, R), 1.0 / R**2), rtol=1e-6)
  assert out[0, 0, 0] == 0.0
  np.testing.assert_allclose(out, np_distribution(maps), rtol=1e-5)


@pytest.mark.parametrize("name", rewards.DISTANCES)
def test_each_distance_against_numpy(name):
  maps = random_maps(2, (B, R, R))
  region = resized = np.asarray(rewards.resize_region_to_maps(jnp.asarray(random_mask(3)), R))
  assert (resized == 0).any()  # zeros in the region exercise 0 log 0 in KL
  got = rewards.attention_distance(jnp.asarray(maps), jnp.asarray(region), name)
  want = np_distance(maps, region, name)
  print(name, np.asarray(got), want)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert (want > 0).all()


def test_soft_iou_of_binary_masks_is_intersection_over_union():
  a = np.zeros((1, R, R), np.float32)
  b = np.zeros((1, R, R), np.float32)
  a[0, :4, :4] = 1.0  # 16 cells
  b[0, 2:6, 2:6] = 1.0  # 16 cells, 4 shared -> IoU 4 / 28
  got = rewards.soft_iou_distance(rewards.to_distribution(jnp.asarray(a)),
                                  rewards.to_distribution(jnp.asarray(b)))
  np.testing.assert_allclose(got, [1.0 - 4.0 / 28.0], rtol=1e-6)


@pytest.mark.parametrize("name", rewards.DISTANCES)
def test_reward_is_maximal_when_map_equals_region(name):
  region = np.asarray(rewards.resize_region_to_maps(jnp.asarray(random_mask(4)), R))
  reward = jax.jit(rewards.attention_map_reward, static_argnums=(2, 3))
  equal = np.repeat(region[:, None], T, axis=1)
  best = np.asarray(reward(jnp.asarray(equal), jnp.asarray(region), name, 0))
  np.testing.assert_allclose(best, 0.0, atol=1e-6)
  # Proportional maps (attention has its own scale) are as good.
  np.testing.assert_allclose(reward(jnp.asarray(5.0 * equal), jnp.asarray(region), name, 0),
                             best, atol=1e-6)
  rng = np.random.default_rng(5)
  for trial in range(5):
    other = np.abs(equal + rng.normal(0, 0.3, equal.shape)).astype(np.float32)
    worse = np.asarray(reward(jnp.asarray(other), jnp.asarray(region), name, 0))
    assert (worse < best - 1e-4).all(), (trial, worse, best)


def test_last_steps_selects_the_least_noisy_steps():
  maps = random_maps(6)
  region = np.asarray(rewards.resize_region_to_maps(jnp.asarray(random_mask(7)), R))
  for k in (0, 1, 3):
    got = rewards.attention_map_reward(jnp.asarray(maps), jnp.asarray(region), "l1", k)
    counted = maps[:, T - k:] if k else maps
    np.testing.assert_allclose(got, -np_distance(counted.mean(1), region, "l1"), rtol=1e-5)
  with pytest.raises(ValueError, match="attention_last_steps=5 must be between 0"):
    rewards.attention_map_reward(jnp.asarray(maps), jnp.asarray(region), "l1", 5)
  with pytest.raises(ValueError, match="attention_distance='cosine' is unknown"):
    rewards.attention_map_reward(jnp.asarray(maps), jnp.asarray(region), "cosine", 0)
  with pytest.raises(ValueError, match="resize_region_to_maps"):
    rewards.attention_map_reward(jnp.asarray(maps), jnp.zeros((B, 4, 4)), "l1", 0)


# ---- reference region from a frozen UNet -------------------------------------------------

REF_STEPS, LATENT = 3, 16
REF_CONFIG = sampling.SamplerConfig(num_steps=REF_STEPS, eta=1.0, capture_size=8)
SCALING = 0.5


def _fast_random_unet_params(unet, seed=0):
  """Random params from the init's shapes (no eager init: ~1 s instead of ~60 s on 2 cores).

  Kernels ~ N(0, 1 / fan_in), norm scales 1 + N(0, 0.05^2), biases N(0, 0.05^2).
  """
  shapes = jax.eval_shape(unet.init, jax.random.PRNGKey(0), jnp.zeros((1, LATENT, LATENT, 8)),
                          jnp.zeros((1,), jnp.int32),
                          jnp.zeros((1, tiny_models.TEXT_LEN, 32)))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if name == "kernel":
      return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])))
    return jnp.asarray((1.0 if name == "scale" else 0.0) + 0.05 * noise)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def reference_setup():
  unet = tiny_models.tiny_unet()
  params = _fast_random_unet_params(unet)
  schedule = ddim.DDIMSchedule.from_config(ddim.default_scheduler_config())
  rng = np.random.default_rng(8)
  cond = sampling.EditConditioning(
      text_embeds=jnp.asarray(rng.standard_normal((2, tiny_models.TEXT_LEN, 32)), jnp.float32),
      uncond_text_embeds=jnp.asarray(rng.standard_normal((2, tiny_models.TEXT_LEN, 32)),
                                     jnp.float32),
      image_latents=jnp.asarray(rng.standard_normal((2, LATENT, LATENT, 4)), jnp.float32),
      token_index=jnp.array([[2, 3], [4, 0]], jnp.int32),
      token_mask=jnp.array([[True, True], [True, False]]))
  reference = jax.jit(lambda p, c, k, g: rewards.reference_attention_maps(
      unet, p, schedule, c, k, REF_CONFIG, g, scaling_factor=SCALING))
  one_step = jax.jit(lambda p, x, t, c, g: sampling.guided_noise_prediction(
      unet, p, x, t, c, g, 8)[1])
  return unet, params, schedule, cond, reference, one_step


def test_reference_maps_average_the_noised_source_steps(reference_setup):
  unet, params, schedule, cond, reference, one_step = reference_setup
  key = jax.random.PRNGKey(11)
  got = np.asarray(reference(params, cond, key, sampling.Guidance()))
  assert got.shape == (2, 8, 8) and np.isfinite(got).all() and (got >= 0).all()
  # By hand: documented noise draw, forward process in numpy, one guided call per step.
  timesteps = schedule.timesteps(REF_STEPS)
  noise = np.asarray(jax.random.normal(key, (REF_STEPS, 2, LATENT, LATENT, 4)))
  alphas = np.asarray(schedule.alphas_cumprod, np.float64)
  clean = np.asarray(cond.image_latents, np.float64) * SCALING
  per_step = []
  for t, n in zip(timesteps, noise):
    noisy = np.sqrt(alphas[t]) * clean + np.sqrt(1 - alphas[t]) * n
    per_step.append(np.asarray(one_step(params, jnp.asarray(noisy, jnp.float32), t, cond,
                                        sampling.Guidance())))
  np.testing.assert_allclose(got, np.mean(per_step, axis=0), rtol=1e-4, atol=1e-6)
  assert not np.allclose(per_step[0], per_step[-1])  # the steps differ: the mean is real


def test_reference_maps_deterministic_per_key_and_guidance_free(reference_setup):
  _, params, _, cond, reference, _ = reference_setup
  first = reference(params, cond, jax.random.PRNGKey(11), sampling.Guidance())
  again = reference(params, cond, jax.random.PRNGKey(11), sampling.Guidance(2.0, 1.0))
  np.testing.assert_array_equal(first, again)
  other = reference(params, cond, jax.random.PRNGKey(12), sampling.Guidance())
  assert not np.allclose(first, other)


def test_reference_maps_errors(reference_setup):
  unet, params, schedule, cond, _, _ = reference_setup
  call = lambda c, config, **kw: rewards.reference_attention_maps(
      unet, params, schedule, c, jax.random.PRNGKey(0), config, sampling.Guidance(),
      scaling_factor=1.0, **kw)
  with pytest.raises(ValueError, match="token_index"):
    call(cond.replace(token_index=None), REF_CONFIG)
  with pytest.raises(ValueError, match="capture_size=5"):
    call(cond, sampling.SamplerConfig(num_steps=2, capture_size=5))
  with pytest.raises(ValueError, match="last_steps=4"):
    call(cond, REF_CONFIG, last_steps=4)


# ---- CLIP rewards against PyTorch transformers --------------------------------------------


def _ids(seed, batch=B, eos=999):
  rng = np.random.default_rng(seed)
  ids = np.full((batch, SEQ), eos, np.int64)
  for row in range(batch):
    n = int(rng.integers(3, 12))
    ids[row, 0] = 998
    ids[row, 1:n] = rng.integers(3, 990, n - 1)
  return ids


@pytest.fixture(scope="module")
def clip_models(tmp_path_factory):
  common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                hidden_act="quick_gelu")
  text = transformers.CLIPTextConfig(vocab_size=1000, max_position_embeddings=SEQ,
                                     eos_token_id=999, bos_token_id=998, pad_token_id=999,
                                     **common)
  vision = transformers.CLIPVisionConfig(image_size=IMAGE, patch_size=4, **common)
  config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                   projection_dim=16)
  torch_model = _randomise(transformers.CLIPModel(config), seed=3)
  folder = str(tmp_path_factory.mktemp("reward_clip"))
  torch_model.save_pretrained(folder)
  loaded = transformers_clip.load_clip(folder)
  text_model = clip.CLIPTextModel(loaded.text_config)
  vision_model = clip.CLIPVisionModel(loaded.vision_config)
  params = {"text": loaded.text_params, "vision": loaded.vision_params}
  return torch_model, text_model, vision_model, params


def _torch_embeds(torch_model, ids, images):
  """Normalised (text, image) embeddings from PyTorch; images (B, 16, 16, 3) in [0, 1]."""
  mean = np.asarray(clip.OPENAI_CLIP_MEAN, np.float32)
  std = np.asarray(clip.OPENAI_CLIP_STD, np.float32)
  pixels = ((images - mean) / std).transpose(0, 3, 1, 2)
  with torch.no_grad():
    out = torch_model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels))
  return out.text_embeds, out.image_embeds


def test_clip_similarity_matches_transformers(clip_models):
  torch_model, text_model, vision_model, params = clip_models
  images = np.random.default_rng(9).uniform(size=(B, IMAGE, IMAGE, 3)).astype(np.float32)
  ids = _ids(10)
  score = jax.jit(lambda p, x, i: rewards.clip_similarity(
      text_model, vision_model, p["text"], p["vision"], x, i))
  got = score(params, jnp.asarray(images), jnp.asarray(ids, jnp.int32))
  text, image = _torch_embeds(torch_model, ids, images)
  want = torch.nn.functional.cosine_similarity(image, text, dim=-1).numpy()
  print("clip", np.asarray(got), want)
  np.testing.assert_allclose(got, want, atol=2e-5)
  assert np.ptp(want) > 1e-3  # the examples differ: the comparison is not of constants


def test_clip_directional_similarity_matches_transformers(clip_models):
  torch_model, text_model, vision_model, params = clip_models
  rng = np.random.default_rng(11)
  edited = rng.uniform(size=(B, IMAGE, IMAGE, 3)).astype(np.float32)
  source = rng.uniform(size=(B, IMAGE, IMAGE, 3)).astype(np.float32)
  target_ids, source_ids = _ids(12), _ids(13)
  score = jax.jit(lambda p, e, s, t, u: rewards.clip_directional_similarity(
      text_model, vision_model, p["text"], p["vision"], e, s, t, u))
  got = score(params, jnp.asarray(edited), jnp.asarray(source),
              jnp.asarray(target_ids, jnp.int32), jnp.asarray(source_ids, jnp.int32))
  text_target, image_edit = _torch_embeds(torch_model, target_ids, edited)
  text_source, image_source = _torch_embeds(torch_model, source_ids, source)
  want = torch.nn.functional.cosine_similarity(image_edit - image_source,
                                               text_target - text_source, dim=-1).numpy()
  print("directional", np.asarray(got), want)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # An unchanged image has no direction: 0, not NaN.
  same = score(params, jnp.asarray(source), jnp.asarray(source),
               jnp.asarray(target_ids, jnp.int32), jnp.asarray(source_ids, jnp.int32))
  np.testing.assert_allclose(same, 0.0, atol=1e-6)


def test_cosine_similarity_against_numpy():
  rng = np.random.default_rng(14)
  a, b = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
  want = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  np.testing.assert_allclose(rewards.cosine_similarity(jnp.asarray(a), jnp.asarray(b)), want,
                             rtol=1e-5)


# ---- preservation (the shipped extra reward) -----------------------------------------------

def test_preservation_against_numpy():
  rng = np.random.default_rng(15)
  source = rng.uniform(size=(B, IMAGE, IMAGE, 3)).astype(np.float32)
  edited = rng.uniform(size=(B, IMAGE, IMAGE, 3)).astype(np.float32)
  mask = random_mask(16)
  inputs = rewards.RewardInputs(edited_images=jnp.asarray(edited),
                                source_images=jnp.asarray(source), mask=jnp.asarray(mask))
  got = rewards.preservation_reward(inputs, None)
  for b in range(B):
    outside = mask[b] == 0
    want = -np.abs(edited[b] - source[b])[outside].mean()
    np.testing.assert_allclose(got[b], want, rtol=1e-5)
  # A mask at twice the image resolution is area-averaged to it.
  big = np.kron(mask, np.ones((2, 2), np.float32))
  np.testing.assert_allclose(
      rewards.preservation_reward(inputs.replace(mask=jnp.asarray(big)), None), got, rtol=1e-6)
  # Untouched outside: 0; whole-image mask: nothing to preserve, 0.
  untouched = np.where(mask[..., None] > 0, edited, source)
  np.testing.assert_allclose(rewards.preservation_reward(
      inputs.replace(edited_images=jnp.asarray(untouched)), None), 0.0, atol=1e-7)
  full = inputs.replace(mask=jnp.ones((B, IMAGE, IMAGE)))
  np.testing.assert_allclose(rewards.preservation_reward(full, None), 0.0, atol=1e-7)
  with pytest.raises(ValueError, match="RewardInputs.mask"):
    rewards.preservation_reward(inputs.replace(mask=None), None)


# ---- registry and the combined reward ------------------------------------------------------

@rewards.register_reward("test_red_inside_mask")
def red_inside_mask(inputs, context):
  """A colour check as a user would write it: red minus the other channels inside the mask."""
  del context
  redness = inputs.edited_images[..., 0] - inputs.edited_images[..., 1:].mean(-1)
  return (redness * inputs.mask).sum((1, 2)) / jnp.maximum(inputs.mask.sum((1, 2)), 1e-8)


def test_registry_lookup_and_errors():
  assert rewards.get_reward("test_red_inside_mask") is red_inside_mask
  assert {"attention", "change_inside", "clip", "preservation", "shapes_check"} <= set(
      rewards.registered_rewards())
  with pytest.raises(KeyError, match="registered rewards: attention, change_inside, clip, preservation, shapes_check"):
    rewards.get_reward("colour")
  with pytest.raises(ValueError, match="already registered"):
    rewards.register_reward("preservation")(red_inside_mask)
  with pytest.raises(ValueError, match="non-empty string"):
    rewards.register_reward("")
  with pytest.raises(ImportError, match="'no_such_reward_module'"):
    rewards.import_reward_modules("rl4pix_jax.rewards.preservation, no_such_reward_module")


def _reward_config(**overrides):
  config = shapes_config.get_config().reward
  config.extra = {}
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def _batch(seed):
  rng = np.random.default_rng(seed)
  return rewards.RewardInputs(
      edited_images=jnp.asarray(rng.uniform(size=(B, IMAGE, IMAGE, 3)), jnp.float32),
      source_images=jnp.asarray(rng.uniform(size=(B, IMAGE, IMAGE, 3)), jnp.float32),
      mask=jnp.asarray(random_mask(seed)),
      attention_maps=jnp.asarray(random_maps(seed)),
      reference_region=jnp.asarray(random_maps(seed + 1, (B, R, R))),
      caption_ids=jnp.asarray(_ids(seed), jnp.int32),
      source_caption_ids=jnp.asarray(_ids(seed + 1), jnp.int32),
      input_ids=jnp.asarray(_ids(seed + 2), jnp.int32))


def test_combined_reward_is_the_weighted_sum_of_its_components(clip_models):
  torch_model, text_model, vision_model, params = clip_models
  config = _reward_config(attention_weight=0.7, clip_weight=0.3)
  config.extra = {"preservation": 0.5, "test_red_inside_mask": 0.25}
  fn = jax.jit(rewards.make_reward_fn(config, text_model, vision_model))
  inputs = _batch(20)
  total, parts = fn(params, inputs)
  assert set(parts) == {"attention", "clip", "preservation", "test_red_inside_mask"}
  assert all(v.shape == (B,) and v.dtype == jnp.float32 for v in parts.values())
  # Each component from an independent reference.
  mask_region = np.asarray(rewards.resize_region_to_maps(inputs.mask, R))
  want_attention = -np_distance(np.asarray(inputs.attention_maps).mean(1), mask_region, "kl")
  np.testing.assert_allclose(parts["attention"], want_attention, rtol=1e-5)
  text, image = _torch_embeds(torch_model, np.asarray(inputs.caption_ids, np.int64),
                              np.asarray(inputs.edited_images))
  want_clip = torch.nn.functional.cosine_similarity(image, text, dim=-1).numpy()
  np.testing.assert_allclose(parts["clip"], want_clip, atol=2e-5)
  # The next two compare the jitted fn (one fused program) with the eager functions (op by
  # op): the same means over n = 16 x 16 pixels summed in another order, so they may differ
  # by up to ~n roundings of 6e-8 of the terms' size. Preservation: 3n positive terms,
  # rtol 4.6e-5 (measured 5.3e-7 relative, AMD EPYC; the old rtol=1e-6 was under the
  # typical sqrt(3n) u = 1.7e-6). Redness: terms |t| <= 1 of both signs that cancel to a
  # mean of ~0.02, so the error is of the terms' scale, not the result's: atol 1.5e-5
  # (measured 1.5e-8, 0.86 of the old rtol=1e-6 there). A real bug (the mask inverted or
  # ignored, a component swapped) moves either by >= 1e-2.
  np.testing.assert_allclose(parts["preservation"],
                             rewards.preservation_reward(inputs, None),
                             rtol=3 * IMAGE**2 * 2**-24)
  np.testing.assert_allclose(parts["test_red_inside_mask"], red_inside_mask(inputs, None),
                             rtol=1e-6, atol=IMAGE**2 * 2**-24)
  want_total = (0.7 * want_attention + 0.3 * want_clip + 0.5 * parts["preservation"] +
                0.25 * parts["test_red_inside_mask"])
  np.testing.assert_allclose(total, want_total, rtol=1e-5, atol=2e-5)


def test_zero_weights_switch_terms_off_and_options_apply(clip_models):
  _, text_model, vision_model, params = clip_models
  inputs = _batch(21)
  # clip off: no CLIP models or params, no images needed.
  config = _reward_config(attention_region="reference", attention_distance="l2",
                          attention_last_steps=2, clip_weight=0.0)
  fn = jax.jit(rewards.make_reward_fn(config))
  only_maps = rewards.RewardInputs(attention_maps=inputs.attention_maps,
                                   reference_region=inputs.reference_region)
  total, parts = fn(None, only_maps)
  assert set(parts) == {"attention"}
  want = -np_distance(np.asarray(inputs.attention_maps)[:, -2:].mean(1),
                      np.asarray(inputs.reference_region), "l2")
  np.testing.assert_allclose(total, want, rtol=1e-5)
  # attention off, directional CLIP on instruction-free inputs without maps.
  config = _reward_config(attention_weight=0.0, clip_weight=2.0, clip_directional=True)
  fn = jax.jit(rewards.make_reward_fn(config, text_model, vision_model))
  total, parts = fn(params, inputs.replace(attention_maps=None, mask=None))
  assert set(parts) == {"clip"}
  want = rewards.clip_directional_similarity(
      text_model, vision_model, params["text"], params["vision"], inputs.edited_images,
      inputs.source_images, inputs.caption_ids, inputs.source_caption_ids)
  # Here and below: the jitted reward fn vs the eager CLIP calls, the same tiny CLIP as one
  # fused program or op by op, so the transformers-parity bound above (2e-5 on a cosine)
  # applies. Measured up to 4.0e-7 (AMD EPYC), 0.4 of the old atol=1e-6. A real bug (the
  # wrong ids scored: the examples' cosines differ by > 1e-3, see np.ptp above; the weight
  # not applied) is far larger.
  np.testing.assert_allclose(parts["clip"], want, atol=2e-5)
  np.testing.assert_allclose(total, 2.0 * np.asarray(want), atol=2.0 * 2e-5)
  # clip_text='instruction' scores the instruction ids.
  config = _reward_config(attention_weight=0.0, clip_text="instruction")
  _, parts = jax.jit(rewards.make_reward_fn(config, text_model, vision_model))(params, inputs)
  want = rewards.clip_similarity(text_model, vision_model, params["text"], params["vision"],
                                 inputs.edited_images, inputs.input_ids)
  np.testing.assert_allclose(parts["clip"], want, atol=2e-5)


def test_reward_weights_order_and_zero_terms():
  config = _reward_config(attention_weight=0.0, clip_weight=1.5)
  config.extra = {"test_red_inside_mask": 0.25, "preservation": 0.0}
  assert rewards.reward_weights(config) == [("clip", 1.5), ("test_red_inside_mask", 0.25)]
  defaults = shapes_config.get_config().reward
  assert rewards.reward_weights(defaults) == [("attention", 1.0), ("clip", 1.0),
                                              ("change_inside", 1.0), ("preservation", 10.0)]


def test_make_reward_fn_rejects_bad_configs(clip_models):
  _, text_model, vision_model, _ = clip_models
  make = lambda models=(text_model, vision_model), **kw: rewards.make_reward_fn(
      _reward_config(**kw), *models)
  with pytest.raises(KeyError, match="registered rewards: attention, change_inside, clip, preservation, shapes_check"):
    rewards.make_reward_fn(_reward_config(extra={"colour_check": 1.0}), text_model,
                           vision_model)
  with pytest.raises(ValueError, match="set c.reward.clip_weight instead"):
    make(extra={"clip": 1.0})
  with pytest.raises(ValueError, match="needs clip_text_model"):
    make(models=())
  with pytest.raises(ValueError, match="attention_distance='cos' is unknown"):
    make(attention_distance="cos")
  with pytest.raises(ValueError, match="attention_region='box' is unknown"):
    make(attention_region="box")
  with pytest.raises(ValueError, match="weights must be finite and >= 0"):
    make(attention_weight=-1.0)
  with pytest.raises(ValueError, match="Every reward weight in c.reward is 0"):
    make(attention_weight=0.0, clip_weight=0.0)
  with pytest.raises(ValueError, match="clip_directional=True needs source and target"):
    make(clip_directional=True, clip_text="instruction")
  with pytest.raises(ImportError, match="no_such_module"):
    make(modules="no_such_module")
  # A missing input is named at trace time.
  fn = rewards.make_reward_fn(_reward_config(attention_region="reference", clip_weight=0.0))
  with pytest.raises(ValueError, match="RewardInputs.reference_region"):
    fn(None, _batch(22).replace(reference_region=None))
