"""Parity of rl4pix_jax.models.clip + weights.transformers_clip with PyTorch transformers CLIP.

Tiny seeded transformers models with every weight randomised (LayerNorms included) are saved
with ``save_pretrained`` and loaded by our loaders; outputs must agree in float32 within
``1e-4 * (1 + max |reference|)``.
"""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from rl4pix_jax.models import clip
from rl4pix_jax.weights import transformers_clip as tc
from rl4pix_jax.weights.folders import WeightsError
from tests.helpers.torch_parity import assert_close as _assert_close
from tests.helpers.torch_parity import randomise as _randomise

TEXT_KW = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=16)
VISION_KW = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 image_size=16, patch_size=4)
PROJECTION_DIM = 12
BATCH = 3
EOS = 500  # eos id of the text model with the modern pooling rule; ids above it occur.


def _input_ids(vocab_size, eos_token_id, lengths, seed):
  """(B, L) ids: start token 0 ... random tokens, then eos, then eos padding."""
  rng = np.random.default_rng(seed)
  ids = np.full((len(lengths), TEXT_KW["max_position_embeddings"]), eos_token_id, np.int64)
  for row, n in enumerate(lengths):
    tokens = rng.integers(3, vocab_size, n)
    ids[row, :n] = np.where(tokens == eos_token_id, eos_token_id + 1, tokens)
    if n < ids.shape[1]:
      ids[row, n] = eos_token_id
  return ids


@pytest.fixture(scope="module")
def text_folders(tmp_path_factory):
  """A CLIPTextModel (eos 500, larger ids occur; quick_gelu) saved three ways: the
  transformers 5 layout, the legacy ``text_model.`` prefixed layout (as SD's text_encoder),
  and sharded."""
  config = transformers.CLIPTextConfig(vocab_size=1000, eos_token_id=EOS, bos_token_id=EOS - 1,
                                       pad_token_id=EOS, hidden_act="quick_gelu", **TEXT_KW)
  model = _randomise(transformers.CLIPTextModel(config), seed=1)
  root = tmp_path_factory.mktemp("clip_text")
  plain, legacy, sharded = (str(root / n) for n in ("plain", "legacy", "sharded"))
  model.save_pretrained(plain)
  model.save_pretrained(sharded, max_shard_size="20KB")
  os.makedirs(legacy)
  state = load_file(os.path.join(plain, "model.safetensors"))
  legacy_state = {"text_model." + k: v for k, v in state.items()}
  legacy_state["text_model.embeddings.position_ids"] = np.arange(16)[None].astype(np.int64)
  save_file(legacy_state, os.path.join(legacy, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(plain, "config.json")) as f:
    config_json = json.load(f)
  with open(os.path.join(legacy, "config.json"), "w") as f:
    json.dump(config_json, f)
  return dict(model=model, plain=plain, legacy=legacy, sharded=sharded, state=state)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
  """A CLIPModel: text tower with the legacy eos_token_id=2 and exact gelu; ViT 16px/4."""
  text = transformers.CLIPTextConfig(vocab_size=1000, eos_token_id=2, bos_token_id=1,
                                     pad_token_id=1, hidden_act="gelu", **TEXT_KW)
  vision = transformers.CLIPVisionConfig(hidden_act="quick_gelu", **VISION_KW)
  config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                   projection_dim=PROJECTION_DIM)
  model = _randomise(transformers.CLIPModel(config), seed=2)
  folder = str(tmp_path_factory.mktemp("clip_model"))
  model.save_pretrained(folder)
  return dict(model=model, folder=folder)


@pytest.fixture(scope="module")
def apply_fns():
  """jit-compiled ``model.apply`` shared across tests, one per model definition."""
  cache = {}

  def get(model):
    if model not in cache:
      cache[model] = jax.jit(lambda params, *args: model.apply({"params": params}, *args))
    return cache[model]
  return get


def _torch_text(model, ids, attention_mask=None):
  with torch.no_grad():
    mask = None if attention_mask is None else torch.from_numpy(attention_mask)
    out = model(input_ids=torch.from_numpy(ids), attention_mask=mask)
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def test_text_model_parity_eos_first_position(text_folders, apply_fns):
  ids = _input_ids(1000, EOS, [5, 15, 1], seed=3)
  ids[:, 0] = 999  # a start token with an id above eos
  assert (ids.argmax(-1) != (ids == EOS).argmax(-1)).all()  # the two pooling rules differ
  ref_hidden, ref_pooled = _torch_text(text_folders["model"], ids)
  for key in ("plain", "legacy", "sharded"):
    config, params = tc.load_clip_text(text_folders[key])
    assert config.projection_dim is None and config.eos_token_id == EOS
    out = apply_fns(clip.CLIPTextModel(config))(params, jnp.asarray(ids, jnp.int32))
    assert out.text_embeds is None
    _assert_close(out.last_hidden_state, ref_hidden, f"text[{key}] last_hidden_state")
    _assert_close(out.pooled_output, ref_pooled, f"text[{key}] pooled_output")


def test_text_model_padding_attention_mask(text_folders, apply_fns):
  ids = _input_ids(1000, EOS, [4, 9, 15], seed=4)
  attention_mask = (np.arange(16)[None] < np.array([[5], [10], [16]])).astype(np.int64)
  ref_hidden, ref_pooled = _torch_text(text_folders["model"], ids, attention_mask)
  config, params = tc.load_clip_text(text_folders["plain"])
  out = apply_fns(clip.CLIPTextModel(config))(
      params, jnp.asarray(ids, jnp.int32), jnp.asarray(attention_mask))
  _assert_close(out.last_hidden_state, ref_hidden, "text masked last_hidden_state")
  _assert_close(out.pooled_output, ref_pooled, "text masked pooled_output")


def test_state_dict_round_trip(text_folders):
  _, params = tc.load_clip_text(text_folders["plain"])
  exported = tc.clip_text_state_dict_from_params(params, prefix="")
  assert set(exported) == set(text_folders["state"])
  for name, value in exported.items():
    np.testing.assert_array_equal(value, text_folders["state"][name], err_msg=name)
  prefixed = tc.clip_text_state_dict_from_params(params)
  assert all(k.startswith("text_model.") for k in prefixed)
  config, _ = tc.load_clip_text(text_folders["plain"])
  shapes = tc.text_param_shapes(config)
  assert shapes[("embeddings", "token_embedding", "embedding")] == (1000, 32)
  assert shapes[("encoder", "layers_1", "mlp", "fc1", "kernel")] == (32, 48)
  vision_shapes = tc.vision_param_shapes(clip.CLIPVisionConfig(**{**VISION_KW, "num_channels": 3}))
  assert vision_shapes[("embeddings", "patch_embedding", "kernel")] == (4, 4, 3, 32)
  assert vision_shapes[("embeddings", "position_embedding", "embedding")] == (17, 32)


def test_clip_model_text_and_image_embeds(clip_folder, apply_fns):
  torch_model = clip_folder["model"]
  loaded = tc.load_clip(clip_folder["folder"])
  assert loaded.text_config.eos_token_id == 2 and loaded.text_config.hidden_act == "gelu"
  assert loaded.text_config.projection_dim == loaded.vision_config.projection_dim == PROJECTION_DIM
  # Legacy pooling: argmax of ids, here a row whose largest id is not at the end.
  ids = _input_ids(1000, 2, [6, 3, 15], seed=5)
  ids[:, 0] = 1  # start token
  assert (ids.argmax(-1) != (ids == 2).argmax(-1)).all()  # the two pooling rules differ
  text = apply_fns(clip.CLIPTextModel(loaded.text_config))(
      loaded.text_params, jnp.asarray(ids, jnp.int32))
  ref_hidden, ref_pooled = _torch_text(torch_model.text_model, ids)
  with torch.no_grad():
    ref_text = torch_model.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output
  _assert_close(text.last_hidden_state, ref_hidden, "CLIPModel text last_hidden_state")
  _assert_close(text.pooled_output, ref_pooled, "CLIPModel text pooled_output (eos id 2)")
  _assert_close(text.text_embeds, ref_text.numpy(), "CLIPModel text_embeds")

  pixels = np.random.default_rng(6).normal(size=(BATCH, 3, 16, 16)).astype(np.float32)
  vision = apply_fns(clip.CLIPVisionModel(loaded.vision_config))(
      loaded.vision_params, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  with torch.no_grad():
    ref_vision = torch_model.vision_model(pixel_values=torch.from_numpy(pixels))
    ref_image = torch_model.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
  _assert_close(vision.last_hidden_state, ref_vision.last_hidden_state.numpy(),
                "CLIPModel vision last_hidden_state")
  _assert_close(vision.pooled_output, ref_vision.pooler_output.numpy(),
                "CLIPModel vision pooled_output")
  _assert_close(vision.image_embeds, ref_image.numpy(), "CLIPModel image_embeds")

  # Single-tower loaders on the CLIPModel folder give the same trees.
  text_config, text_params = tc.load_clip_text(clip_folder["folder"])
  vision_config, vision_params = tc.load_clip_vision(clip_folder["folder"])
  assert text_config == loaded.text_config and vision_config == loaded.vision_config
  jax.tree.map(np.testing.assert_array_equal, text_params, loaded.text_params)
  jax.tree.map(np.testing.assert_array_equal, vision_params, loaded.vision_params)


def test_normalised_embeddings(clip_folder):
  torch_model = clip_folder["model"]
  loaded = tc.load_clip(clip_folder["folder"])
  ids = _input_ids(1000, 2, [4, 7], seed=7)
  text = clip.clip_text_embeddings(clip.CLIPTextModel(loaded.text_config), loaded.text_params,
                                   jnp.asarray(ids, jnp.int32))
  images = np.random.default_rng(8).uniform(size=(2, 16, 16, 3)).astype(np.float32)
  image = clip.clip_image_embeddings(clip.CLIPVisionModel(loaded.vision_config),
                                     loaded.vision_params, jnp.asarray(images))
  mean = np.asarray(clip.OPENAI_CLIP_MEAN, np.float32)
  std = np.asarray(clip.OPENAI_CLIP_STD, np.float32)
  pixels = ((images - mean) / std).transpose(0, 3, 1, 2)  # 16px input: no resize
  with torch.no_grad():
    out = torch_model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels))
  _assert_close(text, out.text_embeds.numpy(), "normalised text_embeds")
  _assert_close(image, out.image_embeds.numpy(), "normalised image_embeds")
  np.testing.assert_allclose(np.linalg.norm(np.asarray(image), axis=-1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="text_projection"):
    bare = clip.CLIPTextModel(dataclasses.replace(loaded.text_config, projection_dim=None))
    clip.clip_text_embeddings(bare, loaded.text_params, jnp.asarray(ids, jnp.int32))


def test_vision_model_with_projection(tmp_path, apply_fns):
  config = transformers.CLIPVisionConfig(hidden_act="quick_gelu", projection_dim=PROJECTION_DIM,
                                         **VISION_KW)
  model = _randomise(transformers.CLIPVisionModelWithProjection(config), seed=9)
  model.save_pretrained(str(tmp_path))
  our_config, params = tc.load_clip_vision(str(tmp_path))
  pixels = np.random.default_rng(10).normal(size=(2, 3, 16, 16)).astype(np.float32)
  nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  out = apply_fns(clip.CLIPVisionModel(our_config))(params, nhwc)
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(pixels))
  _assert_close(out.last_hidden_state, ref.last_hidden_state.numpy(), "vision+proj last_hidden")
  _assert_close(out.image_embeds, ref.image_embeds.numpy(), "vision+proj image_embeds")
  with pytest.raises(ValueError, match=r"expected \(B, 16, 16, 3\)"):
    clip.CLIPVisionModel(our_config).apply({"params": params}, jnp.zeros((1, 3, 16, 16)))


def test_eos_positions_rules():
  ids = jnp.asarray([[49406, 320, 49407, 49407], [49406, 49407, 5, 7]])
  np.testing.assert_array_equal(clip.eos_positions(ids, 49407), [2, 1])
  np.testing.assert_array_equal(clip.eos_positions(ids, 2), [2, 1])  # argmax = highest id
  np.testing.assert_array_equal(clip.eos_positions(jnp.asarray([[5, 9, 3]]), 2), [1])
  np.testing.assert_array_equal(clip.eos_positions(jnp.asarray([[5, 9, 3]]), 7), [0])


def test_config_from_transformers_and_errors():
  text = transformers.CLIPTextConfig(**TEXT_KW).to_dict()
  vision = transformers.CLIPVisionConfig(**VISION_KW).to_dict()
  full = transformers.CLIPConfig(text_config=text, vision_config=vision,
                                 projection_dim=7).to_dict()
  assert clip.CLIPTextConfig.from_transformers(text).projection_dim is None
  assert clip.CLIPTextConfig.from_transformers(text, 5).projection_dim == 5
  assert clip.CLIPTextConfig.from_transformers(full).projection_dim == 7
  parsed = clip.CLIPVisionConfig.from_transformers(full)
  assert (parsed.image_size, parsed.patch_size, parsed.projection_dim) == (16, 4, 7)
  with pytest.raises(clip.CLIPConfigError, match="hidden_act='relu'"):
    clip.CLIPTextConfig.from_transformers({**text, "hidden_act": "relu"})
  with pytest.raises(clip.CLIPConfigError, match="not divisible"):
    clip.CLIPTextConfig.from_transformers({**text, "num_attention_heads": 5})
  with pytest.raises(clip.CLIPConfigError, match="model_type='siglip_vision_model'"):
    clip.CLIPVisionConfig.from_transformers({**vision, "model_type": "siglip_vision_model"})
  with pytest.raises(clip.CLIPConfigError, match="not a multiple of patch_size"):
    clip.CLIPVisionConfig.from_transformers({**vision, "image_size": 18})
  with pytest.raises(clip.CLIPConfigError, match="'eos_token_id'=\\[2, 3\\] is not supported"):
    clip.CLIPTextConfig.from_transformers({**text, "eos_token_id": [2, 3]})
  with pytest.raises(clip.CLIPConfigError, match="'image_size'=\\[16, 16\\]"):
    clip.CLIPVisionConfig.from_transformers({**vision, "image_size": [16, 16]})
  # Absent keys take transformers' defaults (e.g. eos_token_id 49407, hidden_size 512).
  defaults = clip.CLIPTextConfig.from_transformers({"model_type": "clip_text_model"})
  assert defaults == clip.CLIPTextConfig()
  reference = transformers.CLIPTextConfig()
  assert (defaults.eos_token_id, defaults.hidden_size, defaults.vocab_size) == (
      reference.eos_token_id, reference.hidden_size, reference.vocab_size)


def _copy_folder(src, dst, state=None, config_update=None):
  os.makedirs(dst)
  if state is None:
    state = load_file(os.path.join(src, "model.safetensors"))
  save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  config.update(config_update or {})
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)
  return dst


def test_loader_errors(text_folders, clip_folder, tmp_path):
  state = dict(text_folders["state"])
  src = text_folders["plain"]
  missing = dict(state)
  del missing["encoder.layers.1.mlp.fc2.bias"]
  folder = _copy_folder(src, str(tmp_path / "missing"), missing)
  with pytest.raises(WeightsError, match=r"lacks 1 tensor.*encoder\.layers\.1\.mlp\.fc2\.bias"):
    tc.load_clip_text(folder)
  folder = _copy_folder(src, str(tmp_path / "extra"), {**state, "extra.weight": np.zeros(2)})
  with pytest.raises(WeightsError, match="unexpected tensor.*extra.weight"):
    tc.load_clip_text(folder)
  folder = _copy_folder(src, str(tmp_path / "shape"), config_update={"intermediate_size": 40})
  with pytest.raises(WeightsError, match=r"'encoder\.layers\.0\.mlp\.fc1\.bias'.*has shape "
                                         r"\(48,\), expected \(40,\)"):
    tc.load_clip_text(folder)
  folder = _copy_folder(src, str(tmp_path / "act"), config_update={"hidden_act": "relu"})
  with pytest.raises(WeightsError, match="config.json.*hidden_act='relu'"):
    tc.load_clip_text(folder)
  with pytest.raises(WeightsError, match="load_clip expects a CLIPModel folder"):
    tc.load_clip(src)
  (tmp_path / "empty").mkdir()
  with pytest.raises(WeightsError, match="config.json"):
    tc.load_clip_text(str(tmp_path / "empty"))
  # A diffusers pipeline root resolves to its text_encoder/ folder.
  _copy_folder(src, str(tmp_path / "pipeline" / "text_encoder"))
  config, _ = tc.load_clip_text(str(tmp_path / "pipeline"))
  assert config.vocab_size == 1000


def test_preprocess_matches_clip_image_processor():
  from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

  rng = np.random.default_rng(11)
  yy, xx = np.meshgrid(np.linspace(0, 1, 61), np.linspace(0, 1, 83), indexing="ij")
  smooth = np.stack([yy, xx, 0.5 + 0.5 * np.sin(6 * yy + 4 * xx)], -1)
  image = np.clip(255 * (0.85 * smooth + 0.15 * rng.uniform(size=smooth.shape)), 0, 255)
  image = image.round().astype(np.uint8)  # (61, 83, 3): wide, odd sizes
  results = {}
  for size in (24, 48, 61):  # downsample, downsample, identity resize of the short side
    processor = CLIPImageProcessorPil(size={"shortest_edge": size},
                                      crop_size={"height": size, "width": size})
    reference = processor(images=[image], return_tensors="np")["pixel_values"][0]
    ours = jax.jit(clip.preprocess_clip_images, static_argnums=1)(
        jnp.asarray(image[None] / 255.0, jnp.float32), size)[0]
    diff = np.abs(np.asarray(ours) - reference.transpose(1, 2, 0))
    results[size] = (float(diff.max()), float(diff.mean()))
    print(f"preprocess 61x83 -> {size}: max abs diff {diff.max():.4f}, mean {diff.mean():.5f} "
          "(normalised units)")
  # Same short side: only the crop and normalisation apply, so it is exact up to float32.
  assert results[61][0] < 1e-5
  # Resampling: PIL rounds to uint8 and uses its own kernel support; 1/255/std ~= 0.015.
  for size in (24, 48):
      assert results[size][1] < 0.01 and results[size][0] < 0.05, results[size]
  with pytest.raises(ValueError, match=r"expected \(B, H, W, 3\)"):
    clip.preprocess_clip_images(jnp.zeros((2, 8, 8)), 4)


def test_bfloat16_compute_close_to_float32(text_folders, apply_fns):
  config, params = tc.load_clip_text(text_folders["plain"])
  ids = jnp.asarray(_input_ids(1000, EOS, [5, 9], seed=12), jnp.int32)
  full = apply_fns(clip.CLIPTextModel(config))(params, ids)
  half = apply_fns(clip.CLIPTextModel(config, dtype=jnp.bfloat16))(params, ids)
  assert half.last_hidden_state.dtype == jnp.float32  # final LayerNorm computes in float32
  error = np.max(np.abs(np.asarray(half.pooled_output) - np.asarray(full.pooled_output)))
  assert error < 0.1 * (1 + np.max(np.abs(np.asarray(full.pooled_output)))), error


def test_gather_params_layouts_fill_and_errors():
  """The shared state-dict -> Flax tree step of the CLIP and ViT loaders."""
  shapes = {("proj", "kernel"): (3, 2), ("proj", "bias"): (2,), ("norm", "scale"): (2,)}
  name_of = lambda path: ".".join(path[:-1] + ({"kernel": "weight", "scale": "weight"}.get(
      path[-1], path[-1]),))
  weight = np.arange(6, dtype=np.float32).reshape(2, 3)  # torch Linear (out, in)
  state = {"proj.weight": weight, "norm.weight": np.ones(2, np.float32),
           "ids.position_ids": np.arange(2)}
  fill = lambda path, shape: np.zeros(shape, np.float32) if path[-1] == "bias" else None
  ignore = lambda name: name.endswith("position_ids")
  params = tc.gather_params(state, shapes, name_of, "f", ignore, fill=fill)
  np.testing.assert_array_equal(params["proj"]["kernel"], weight.T)
  np.testing.assert_array_equal(params["proj"]["bias"], np.zeros(2))
  with pytest.raises(WeightsError, match=r"'f' lacks 1 tensor.*proj\.bias.*\(a hint\)"):
    tc.gather_params(state, shapes, name_of, "f", ignore, hint=" (a hint)")
  with pytest.raises(WeightsError, match=r"'proj\.weight' in 'f' has shape \(3, 2\), "
                                         r"expected \(2, 3\)"):
    tc.gather_params(dict(state, **{"proj.weight": weight.T}), shapes, name_of, "f", ignore,
                     fill=fill)
  # A tensor the config does not use is an error unless ignored; a filled path uses none.
  with pytest.raises(WeightsError, match=r"1 unexpected tensor\(s\) for a toy.*proj\.bias"):
    tc.gather_params(dict(state, **{"proj.bias": np.ones(5, np.float32)}), shapes,
                     lambda path: "none" if path[-1] == "bias" else name_of(path), "f", ignore,
                     fill=fill, model="a toy")
  with pytest.raises(WeightsError, match="unexpected tensor.*ids.position_ids"):
    tc.gather_params(state, shapes, name_of, "f", lambda name: False, fill=fill)
