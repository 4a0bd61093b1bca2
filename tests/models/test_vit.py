"""Parity of rl4pix_jax.models.vit + weights.transformers_vit with PyTorch transformers ViTModel.

A tiny seeded transformers ViTModel with every weight randomised (LayerNorms included) is saved
with ``save_pretrained`` and loaded by ``load_vit``; outputs must agree in float32 within
``1e-4 * (1 + max |reference|)``.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.numpy import load_file, save_file

from rl4pix_jax.models import vit
from rl4pix_jax.weights import transformers_vit as tv
from rl4pix_jax.weights.folders import WeightsError
from tests.helpers.torch_parity import assert_close as _assert_close
from tests.helpers.torch_parity import randomise as _randomise

VIT_KW = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, hidden_act="gelu", layer_norm_eps=1e-6)


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
  """A randomised ViTModel (with pooler) saved by transformers, and our loaded copy."""
  model = _randomise(transformers.ViTModel(transformers.ViTConfig(**VIT_KW)), seed=3)
  folder = str(tmp_path_factory.mktemp("vit"))
  model.save_pretrained(folder)
  config, params = tv.load_vit(folder)
  vit_model = vit.ViTModel(config)
  apply = jax.jit(lambda p, x: vit_model.apply({"params": p}, x, True))
  return dict(model=model, folder=folder, config=config, params=params, apply=apply)


def _torch_forward(model, nhwc, interpolate=False):
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(np.array(nhwc).transpose(0, 3, 1, 2)),
                interpolate_pos_encoding=interpolate)
  return out.last_hidden_state.numpy()


def test_config_from_transformers(vit_folder):
  config = vit_folder["config"]
  assert config == vit.ViTConfig(**VIT_KW, num_channels=3, qkv_bias=True)
  assert config.grid_size == 4
  with pytest.raises(ValueError, match="model_type='clip'"):
    vit.ViTConfig.from_transformers({"model_type": "clip"})
  with pytest.raises(ValueError, match="not a multiple of patch_size"):
    vit.ViTConfig.from_transformers({"image_size": 30, "patch_size": 8})
  with pytest.raises(ValueError, match="hidden_act='swish'"):
    vit.ViTConfig.from_transformers({"hidden_act": "swish"})
  with pytest.raises(ValueError, match="qkv_bias"):
    vit.ViTConfig.from_transformers({"qkv_bias": "yes"})


def test_vit_model_parity(vit_folder):
  pixels = np.random.default_rng(4).normal(size=(3, 32, 32, 3)).astype(np.float32)
  ours = vit_folder["apply"](vit_folder["params"], jnp.asarray(pixels))
  reference = _torch_forward(vit_folder["model"], pixels)
  _assert_close(ours.last_hidden_state, reference, "ViT last_hidden_state")
  _assert_close(ours.cls_embedding, reference[:, 0], "ViT CLS embedding")


def test_interpolated_position_embeddings_parity(vit_folder):
  pixels = np.random.default_rng(5).normal(size=(2, 48, 40, 3)).astype(np.float32)  # 6x5 grid
  ours = vit_folder["apply"](vit_folder["params"], jnp.asarray(pixels))
  reference = _torch_forward(vit_folder["model"], pixels, interpolate=True)
  _assert_close(ours.last_hidden_state, reference, "ViT interpolated 48x40")
  with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):
    vit.ViTModel(vit_folder["config"]).apply({"params": vit_folder["params"]},
                                             jnp.asarray(pixels))


def test_torch_bicubic_matrix_matches_interpolate():
  grid = np.random.default_rng(6).normal(size=(1, 2, 5, 5)).astype(np.float32)
  for size in ((7, 3), (5, 9), (2, 5)):
    with torch.no_grad():
      reference = torch.nn.functional.interpolate(torch.from_numpy(grid), size=size,
                                                  mode="bicubic", align_corners=False).numpy()
    rows, cols = vit.torch_bicubic_matrix(5, size[0]), vit.torch_bicubic_matrix(5, size[1])
    ours = np.einsum("ij,bcjk,lk->bcil", rows, grid, cols)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_dino_embeddings_and_state_dict_round_trip(vit_folder, tmp_path):
  images = np.random.default_rng(7).uniform(size=(2, 40, 40, 3)).astype(np.float32)
  # resize 36 then crop 32 (the model's image_size), as 256 -> 224 for DINO ViT-S/16.
  ours = vit.dino_image_embeddings(vit.ViTModel(vit_folder["config"]), vit_folder["params"],
                                   jnp.asarray(images), resize=36)
  pixels = vit.preprocess_dino_images(jnp.asarray(images), 36, 32)
  reference = _torch_forward(vit_folder["model"], pixels)[:, 0]
  reference = reference / np.linalg.norm(reference, axis=-1, keepdims=True)
  _assert_close(ours, reference, "normalised DINO embedding")

  state = tv.vit_state_dict_from_params(vit_folder["params"])
  original = load_file(os.path.join(vit_folder["folder"], "model.safetensors"))
  assert set(state) == {k for k in original if not k.startswith("pooler.")}
  for name, value in state.items():
    np.testing.assert_array_equal(value, original[name], err_msg=name)


def test_preprocess_matches_pil_pipeline():
  """Reference: torchvision's Resize(256, bicubic) + CenterCrop(224) rules done with PIL."""
  rng = np.random.default_rng(8)
  yy, xx = np.meshgrid(np.linspace(0, 1, 61), np.linspace(0, 1, 83), indexing="ij")
  smooth = np.stack([yy, xx, 0.5 + 0.5 * np.sin(6 * yy + 4 * xx)], -1)
  image = np.clip(255 * (0.85 * smooth + 0.15 * rng.uniform(size=smooth.shape)), 0, 255)
  image = image.round().astype(np.uint8)  # (61, 83, 3): wide, odd sizes
  resize, crop = 40, 33
  new_w = int(resize * 83 / 61)  # torchvision: short side -> resize, long side truncated
  resized = np.asarray(Image.fromarray(image).resize((new_w, resize), Image.BICUBIC))
  top, left = int(round((resize - crop) / 2)), int(round((new_w - crop) / 2))
  cropped = resized[top:top + crop, left:left + crop] / 255.0
  reference = (cropped - np.asarray(vit.IMAGENET_MEAN)) / np.asarray(vit.IMAGENET_STD)
  ours = jax.jit(vit.preprocess_dino_images, static_argnums=(1, 2))(
      jnp.asarray(image[None] / 255.0, jnp.float32), resize, crop)[0]
  assert ours.shape == (crop, crop, 3)
  diff = np.abs(np.asarray(ours) - reference)
  print(f"DINO preprocess 61x83 -> {crop}: max abs diff {diff.max():.4f}, mean {diff.mean():.5f}")
  assert diff.mean() < 0.01 and diff.max() < 0.06  # resampling only; 1/255/std ~= 0.017
  # Identity resize: crop + normalisation only, exact.
  same = vit.preprocess_dino_images(jnp.asarray(image[None] / 255.0, jnp.float32), 61, 33)[0]
  top, left = 14, 25
  exact = (image[top:top + 33, left:left + 33] / 255.0 - np.asarray(vit.IMAGENET_MEAN)) / \
      np.asarray(vit.IMAGENET_STD)
  np.testing.assert_allclose(np.asarray(same), exact, atol=1e-5)
  with pytest.raises(ValueError, match="larger than resize"):
    vit.preprocess_dino_images(jnp.zeros((1, 8, 8, 3)), 8, 9)
  with pytest.raises(ValueError, match=r"expected \(B, H, W, 3\)"):
    vit.preprocess_dino_images(jnp.zeros((8, 8, 3)))


def _copy_folder(src, dst, state=None, config_update=None):
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "config.json"), dst)
  if config_update:
    with open(os.path.join(dst, "config.json")) as f:
      config = json.load(f)
    config.update(config_update)
    with open(os.path.join(dst, "config.json"), "w") as f:
      json.dump(config, f)
  if state is None:
    shutil.copy(os.path.join(src, "model.safetensors"), dst)
  else:
    save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  return str(dst)


def test_loader_namings_prefix_and_qkv_bias(vit_folder, tmp_path):
  state = load_file(os.path.join(vit_folder["folder"], "model.safetensors"))
  params = vit_folder["params"]
  # transformers 5.x module names.
  module_state = {}
  for path in tv.vit_param_shapes(vit_folder["config"]):
    module_state[tv.torch_name(path, "module")] = state[tv.torch_name(path, "stored")]
  module_folder = _copy_folder(vit_folder["folder"], tmp_path / "module", module_state)
  _, module_params = tv.load_vit(module_folder)
  jax.tree.map(np.testing.assert_array_equal, module_params, params)
  # A task-head checkpoint: "vit." prefix, head tensors ignored; eps override.
  head_state = {"vit." + k: v for k, v in state.items()}
  head_state["classifier.weight"] = np.zeros((2, 32), np.float32)
  head_folder = _copy_folder(vit_folder["folder"], tmp_path / "head", head_state)
  config, head_params = tv.load_vit(head_folder, layer_norm_eps=1e-5)
  assert config.layer_norm_eps == 1e-5
  jax.tree.map(np.testing.assert_array_equal, head_params, params)
  # qkv_bias=false: no q/k/v biases in the file; zeros in the tree; parity holds.
  no_bias = transformers.ViTConfig(**VIT_KW, qkv_bias=False)
  model = _randomise(transformers.ViTModel(no_bias), seed=9)
  model.save_pretrained(str(tmp_path / "no_bias"))
  config, no_bias_params = tv.load_vit(str(tmp_path / "no_bias"))
  assert not config.qkv_bias
  bias = no_bias_params["encoder"]["layers_0"]["self_attn"]["q_proj"]["bias"]
  np.testing.assert_array_equal(bias, np.zeros(32, np.float32))
  pixels = np.random.default_rng(10).normal(size=(1, 32, 32, 3)).astype(np.float32)
  ours = vit_folder["apply"](no_bias_params, jnp.asarray(pixels))
  _assert_close(ours.last_hidden_state, _torch_forward(model, pixels), "ViT qkv_bias=False")


def test_loader_errors(vit_folder, tmp_path):
  state = load_file(os.path.join(vit_folder["folder"], "model.safetensors"))
  missing = dict(state)
  del missing["encoder.layer.1.output.dense.weight"]
  folder = _copy_folder(vit_folder["folder"], tmp_path / "missing", missing)
  with pytest.raises(WeightsError, match=r"lacks 1 tensor.*encoder\.layer\.1\.output\.dense"):
    tv.load_vit(folder)
  bad_shape = dict(state, **{"embeddings.position_embeddings": np.zeros((1, 5, 32), np.float32)})
  folder = _copy_folder(vit_folder["folder"], tmp_path / "shape", bad_shape)
  with pytest.raises(WeightsError, match=r"'embeddings.position_embeddings'.*\(1, 5, 32\), "
                                         r"expected \(1, 17, 32\)"):
    tv.load_vit(folder)
  extra = dict(state, **{"encoder.layer.2.layernorm_before.weight": np.ones(32, np.float32)})
  folder = _copy_folder(vit_folder["folder"], tmp_path / "extra", extra)
  with pytest.raises(WeightsError, match="unexpected tensor.*encoder.layer.2"):
    tv.load_vit(folder)
  folder = _copy_folder(vit_folder["folder"], tmp_path / "config", None, {"model_type": "deit"})
  with pytest.raises(WeightsError, match="config.json.*model_type='deit'"):
    tv.load_vit(folder)
  with pytest.raises(WeightsError, match="No safetensors weights"):
    os.makedirs(tmp_path / "empty")
    shutil.copy(os.path.join(vit_folder["folder"], "config.json"), tmp_path / "empty")
    tv.load_vit(str(tmp_path / "empty"))


def test_bfloat16_compute_close_to_float32(vit_folder):
  pixels = jnp.asarray(np.random.default_rng(11).normal(size=(1, 32, 32, 3)), jnp.float32)
  full = vit_folder["apply"](vit_folder["params"], pixels).cls_embedding
  half = vit.ViTModel(vit_folder["config"], dtype=jnp.bfloat16).apply(
      {"params": vit_folder["params"]}, pixels).cls_embedding
  cosine = np.sum(np.asarray(full) * np.asarray(half)) / (
      np.linalg.norm(full) * np.linalg.norm(np.asarray(half, np.float32)))
  assert half.dtype == jnp.float32 and cosine > 0.99, cosine
