"""diffusers folders <-> Flax params: names, layouts, shards, export round trip, errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet
from safetensors.numpy import load_file, save_file

from rl4pix_jax.models.unet import UNet2DConditionModel, UNetConfig
from rl4pix_jax.models.vae import AutoencoderKL, VAEConfig
from rl4pix_jax.weights import diffusers_models as dm
from rl4pix_jax.weights.folders import WeightsError
from tests.models.test_unet import (build_torch_unet, randomize_, tolerance, torch_forward,
                                    unet_inputs)
from tests.models.test_vae import TINY_VAE, latents, nchw

WEIGHTS = "diffusion_pytorch_model.safetensors"

# The published config.json files of timbrooks/instruct-pix2pix (unet, vae) and SD 2.1 (unet).
IP2P_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 8,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"]}
SD21_UNET = dict(IP2P_UNET, in_channels=4, attention_head_dim=[5, 10, 20, 20],
                 cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True,
                 sample_size=96)
SD_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4}


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
  torch_model = build_torch_unet()
  folder = str(tmp_path_factory.mktemp("unet"))
  torch_model.save_pretrained(folder)
  return torch_model, folder


@pytest.fixture(scope="module")
def loaded(unet_folder):
  _, folder = unet_folder
  config, params = dm.load_unet(folder)
  return config, params


def _copy_folder(src, dst, edit_config=None, edit_state=None):
  """Copies a single-file diffusers folder, optionally editing its config/state dict."""
  os.makedirs(dst, exist_ok=True)
  with open(os.path.join(src, "config.json")) as f:
    config = json.load(f)
  state = load_file(os.path.join(src, WEIGHTS))
  if edit_config:
    edit_config(config)
  if edit_state:
    edit_state(state)
  with open(os.path.join(dst, "config.json"), "w") as f:
    json.dump(config, f)
  save_file(state, os.path.join(dst, WEIGHTS))
  return dst


def test_torch_name_mapping():
  assert dm.torch_name(("down_blocks_0", "attentions_1", "transformer_blocks_0", "attn2",
                        "to_out_0", "kernel")) == (
                            "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0.weight")
  assert dm.torch_name(("time_embedding", "linear_1", "bias")) == "time_embedding.linear_1.bias"
  assert dm.torch_name(("mid_block", "resnets_1", "norm1", "scale")) == (
      "mid_block.resnets.1.norm1.weight")
  assert dm.torch_name(("ff", "net_0", "proj", "kernel")) == "ff.net.0.proj.weight"
  with pytest.raises(WeightsError, match="unknown leaf name"):
    dm.torch_name(("conv_in", "embedding"))


@pytest.mark.parametrize("torch_cls,config,parse,template", [
    (TorchUNet, IP2P_UNET, UNetConfig.from_diffusers, dm.unet_template),
    (TorchUNet, SD21_UNET, UNetConfig.from_diffusers, dm.unet_template),
    (TorchVAE, SD_VAE, VAEConfig.from_diffusers, dm.vae_template)],
                         ids=["ip2p_unet", "sd21_unet", "sd_vae"])
def test_full_size_names_and_shapes_match_diffusers(torch_cls, config, parse, template):
  with torch.device("meta"):  # no memory, no weights: names and shapes only
    reference = torch_cls(**{k: v for k, v in config.items() if not k.startswith("_")})
  expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  flat = jax.tree_util.tree_flatten_with_path(template(parse(config))["params"])[0]
  ours = {dm.torch_name(tuple(k.key for k in path)): dm.torch_shape(tuple(leaf.shape))
          for path, leaf in flat}
  assert ours == expected


def test_every_tensor_maps_with_torch_layout(unet_folder, loaded):
  torch_model, _ = unet_folder
  config, params = loaded
  state = dm.unet_state_dict_from_params(params, config)
  ref = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  assert set(state) == set(ref)
  for name, array in state.items():
    np.testing.assert_array_equal(array, ref[name], err_msg=name)


def test_load_dtype(unet_folder):
  _, folder = unet_folder
  _, params = dm.load_unet(folder, dtype=jnp.bfloat16)
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_export_round_trip_through_diffusers(loaded, tmp_path):
  config, params = loaded
  rng = np.random.RandomState(0)
  params = jax.tree_util.tree_map(  # move away from the imported values
      lambda p: p + 0.01 * rng.randn(*p.shape).astype(np.float32), params)
  path = dm.export_unet(params, config, str(tmp_path / "export"))
  assert os.path.basename(path) == WEIGHTS
  reloaded = TorchUNet.from_pretrained(str(tmp_path / "export")).eval()
  sample, timesteps, context = unet_inputs()
  ref = torch_forward(reloaded, sample, timesteps, context)
  out = np.asarray(jax.jit(UNet2DConditionModel(config).apply)(params, sample, timesteps,
                                                               context))
  diff = np.abs(out - ref).max()
  print(f"UNet export round trip: max abs diff {diff:.3g}, max |ref| {np.abs(ref).max():.3g}")
  assert diff <= tolerance(ref)
  config_back, params_back = dm.load_unet(str(tmp_path / "export"))
  assert config_back == config
  for a, b in zip(jax.tree_util.tree_leaves(params_back), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_vae_export_round_trip_through_diffusers(tmp_path):
  torch_model = randomize_(TorchVAE(**TINY_VAE), seed=11)
  torch_model.save_pretrained(str(tmp_path / "src"))
  config, params = dm.load_vae(str(tmp_path / "src"))
  params = jax.tree_util.tree_map(lambda p: p * 1.01, params)
  dm.export_vae(params, config, str(tmp_path / "export"))
  reloaded = TorchVAE.from_pretrained(str(tmp_path / "export")).eval()
  z = latents()
  with torch.no_grad():
    ref = reloaded.decode(nchw(z)).sample.numpy().transpose(0, 2, 3, 1)
  model = AutoencoderKL(config)
  out = np.asarray(jax.jit(lambda p, z: model.apply(p, z, method=AutoencoderKL.decode))(
      params, z))
  diff = np.abs(out - ref).max()
  print(f"VAE export round trip (decode): max abs diff {diff:.3g}, max |ref| "
        f"{np.abs(ref).max():.3g}")
  assert diff <= tolerance(ref)


def test_sharded_weights_load(unet_folder, loaded, tmp_path):
  torch_model, _ = unet_folder
  torch_model.save_pretrained(str(tmp_path), max_shard_size="100KB")
  files = os.listdir(tmp_path)
  assert f"{WEIGHTS.replace('.safetensors', '')}.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 1, files
  _, sharded = dm.load_unet(str(tmp_path))
  for a, b in zip(jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(loaded[1])):
    np.testing.assert_array_equal(a, b)


def test_missing_weights_file_is_named(unet_folder, tmp_path):
  _, folder = unet_folder
  with open(os.path.join(folder, "config.json")) as f:
    (tmp_path / "config.json").write_text(f.read())
  with pytest.raises(WeightsError, match=r"No safetensors weights in .*diffusion_pytorch_model"):
    dm.load_unet(str(tmp_path))


def test_missing_config_is_named(tmp_path):
  with pytest.raises(WeightsError, match=r"Missing file .*config\.json"):
    dm.load_vae(str(tmp_path))


def test_unsupported_config_field_is_named(unet_folder, tmp_path):
  _, folder = unet_folder
  dst = _copy_folder(folder, str(tmp_path),
                     edit_config=lambda c: c.update(addition_embed_type="text_time"))
  with pytest.raises(WeightsError,
                     match=r"config\.json.*'addition_embed_type'='text_time' is not supported"):
    dm.load_unet(dst)


def test_shape_mismatch_is_named(unet_folder, tmp_path):
  _, folder = unet_folder
  name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"

  def shrink(state):
    state[name] = state[name][:, :16].copy()
  dst = _copy_folder(folder, str(tmp_path), edit_state=shrink)
  with pytest.raises(WeightsError) as info:
    dm.load_unet(dst)
  message = str(info.value)
  assert name in message and dst in message
  assert "(32, 16)" in message and "expected (32, 32)" in message


def test_missing_and_unexpected_tensors_are_named(unet_folder, tmp_path):
  _, folder = unet_folder

  def edit(state):
    state["mid_block.extra.weight"] = np.zeros((3,), np.float32)
    del state["conv_out.bias"]
  dst = _copy_folder(folder, str(tmp_path), edit_state=edit)
  with pytest.raises(WeightsError) as info:
    dm.load_unet(dst)
  message = str(info.value)
  assert "missing tensors" in message and "conv_out.bias (4,)" in message
  assert "unexpected tensors" in message and "mid_block.extra.weight (3,)" in message
  assert dst in message


def test_params_tree_mismatch_on_export_is_named(loaded):
  config, params = loaded
  broken = jax.tree_util.tree_map(lambda p: p, params)
  broken["params"]["conv_in"]["kernel"] = jnp.zeros((3, 3, 8, 16))
  with pytest.raises(WeightsError, match="conv_in/kernel.*expected"):
    dm.unet_state_dict_from_params(broken, config)
  del broken["params"]["conv_out"]
  with pytest.raises(WeightsError, match="missing.*conv_out"):
    dm.unet_state_dict_from_params(broken, config)
