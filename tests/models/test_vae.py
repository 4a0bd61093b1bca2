"""Flax AutoencoderKL vs PyTorch diffusers: encode (mean, logvar), decode, sampling, config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from safetensors.torch import save_file

from rl4pix_jax.models.vae import AutoencoderKL, VAEConfig, latent_mode, latent_sample
from rl4pix_jax.weights.diffusers_models import load_vae
from tests.models.test_unet import randomize_, tolerance

TINY_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(16, 32),
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=0.18215)
BATCH, SIDE = 2, 16


def images(seed=0):
  """(B, 16, 16, 3) float32 in [-1, 1], NHWC."""
  return np.random.RandomState(seed).uniform(-1, 1, (BATCH, SIDE, SIDE, 3)).astype(np.float32)


def latents(seed=1):
  """(B, 8, 8, 4) float32 unscaled latents."""
  return np.random.RandomState(seed).randn(BATCH, SIDE // 2, SIDE // 2, 4).astype(np.float32)


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(torch VAE, our config, our params, jitted encode, jitted decode)."""
  torch_model = randomize_(TorchVAE(**TINY_VAE), seed=11)
  folder = str(tmp_path_factory.mktemp("vae"))
  torch_model.save_pretrained(folder)
  config, params = load_vae(folder)
  model = AutoencoderKL(config)
  encode = jax.jit(lambda p, x: model.apply(p, x, method=AutoencoderKL.encode))
  decode = jax.jit(lambda p, z: model.apply(p, z, method=AutoencoderKL.decode))
  return torch_model, config, params, encode, decode


def test_config_reads_diffusers_fields(tiny):
  torch_model, config, _, _, _ = tiny
  assert config.block_out_channels == (16, 32) and config.downscale_factor == 2
  assert config.scaling_factor == pytest.approx(0.18215)
  assert VAEConfig.from_diffusers(dict(torch_model.config)) == config
  assert VAEConfig.from_diffusers(config.to_diffusers()) == config


@pytest.mark.parametrize("field,value", [("shift_factor", 0.1159),
                                         ("latents_mean", [0.0, 0.0, 0.0, 0.0])])
def test_unsupported_config_field_is_named(field, value):
  with pytest.raises(ValueError, match=f"{field}.*not supported"):
    VAEConfig.from_diffusers(dict(TINY_VAE, **{field: value}))


def test_unsupported_block_type_is_named():
  with pytest.raises(ValueError, match="down_block_types.*DownEncoderBlock2D"):
    VAEConfig.from_diffusers(dict(TINY_VAE, down_block_types=["AttnDownEncoderBlock2D"] * 2))


def test_encode_parity(tiny):
  torch_model, _, params, encode, _ = tiny
  x = images()
  with torch.no_grad():
    dist = torch_model.encode(nchw(x)).latent_dist
  ref_mean = dist.mean.numpy().transpose(0, 2, 3, 1)
  ref_logvar = dist.logvar.numpy().transpose(0, 2, 3, 1)
  mean, logvar = encode(params, x)
  assert mean.shape == (BATCH, SIDE // 2, SIDE // 2, 4) and mean.dtype == jnp.float32
  d_mean = np.abs(np.asarray(mean) - ref_mean).max()
  d_logvar = np.abs(np.asarray(logvar) - ref_logvar).max()
  print(f"VAE encode parity: mean max abs diff {d_mean:.3g} (max |ref| "
        f"{np.abs(ref_mean).max():.3g}); logvar {d_logvar:.3g} "
        f"(max |ref| {np.abs(ref_logvar).max():.3g})")
  assert d_mean <= tolerance(ref_mean) and d_logvar <= tolerance(ref_logvar)
  np.testing.assert_array_equal(latent_mode(mean, logvar), mean)
  np.testing.assert_allclose(latent_mode(mean, logvar), dist.mode().numpy().transpose(0, 2, 3, 1),
                             atol=tolerance(ref_mean))


def test_decode_parity(tiny):
  torch_model, _, params, _, decode = tiny
  z = latents()
  with torch.no_grad():
    ref = torch_model.decode(nchw(z)).sample.numpy().transpose(0, 2, 3, 1)
  out = np.asarray(decode(params, z))
  diff = np.abs(out - ref).max()
  print(f"VAE decode parity: max abs diff {diff:.3g}, max |ref| {np.abs(ref).max():.3g}")
  assert out.shape == (BATCH, SIDE, SIDE, 3) and diff <= tolerance(ref)


def test_logvar_is_clipped_like_diffusers(tiny):
  _, config, params, _, _ = tiny
  tree = jax.tree_util.tree_map(lambda a: a, params)
  bias = tree["params"]["quant_conv"]["bias"]
  tree["params"]["quant_conv"]["bias"] = bias.at[4:].set(jnp.array([100.0, -100.0, 0.0, 0.0]))
  _, logvar = AutoencoderKL(config).apply(tree, images(), method=AutoencoderKL.encode)
  assert float(logvar[..., 0].min()) == 20.0 and float(logvar[..., 1].max()) == -30.0


def test_latent_sample_is_mean_plus_std_noise():
  key = jax.random.PRNGKey(4)
  mean = jnp.asarray(latents(2))
  logvar = jnp.full_like(mean, np.log(0.25))
  z = latent_sample(key, mean, logvar)
  noise = jax.random.normal(key, mean.shape)
  np.testing.assert_allclose(z, mean + 0.5 * noise, atol=1e-6)
  many = latent_sample(key, jnp.zeros((4096,)), jnp.full((4096,), np.log(4.0)))
  assert abs(float(many.std()) - 2.0) < 0.1 and abs(float(many.mean())) < 0.1


def test_old_attention_names_load(tiny, tmp_path):
  torch_model, config, params, _, _ = tiny
  state = {}
  for name, tensor in torch_model.state_dict().items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      if ".attentions.0." in name and f".{new}." in name:
        name = name.replace(f".{new}.", f".{old}.")
    state[name] = tensor.contiguous()
  assert any(".query." in n for n in state)
  save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  (tmp_path / "config.json").write_text(
      (__import__("json")).dumps(dict(torch_model.config)))
  _, old_params = load_vae(str(tmp_path))
  for a, b in zip(jax.tree_util.tree_leaves(old_params), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_bad_input_shapes_are_named(tiny):
  _, config, params, _, _ = tiny
  model = AutoencoderKL(config)
  with pytest.raises(ValueError, match=r"expected \(B, H, W, 3\) NHWC"):
    model.apply(params, jnp.zeros((1, 3, 16, 16)), method=AutoencoderKL.encode)
  with pytest.raises(ValueError, match=r"expected \(B, h, w, 4\) NHWC"):
    model.apply(params, jnp.zeros((1, 4, 8, 8)), method=AutoencoderKL.decode)


def test_bfloat16_decode_close_to_float32(tiny):
  _, config, params, _, decode = tiny
  z = latents()
  ref = np.asarray(decode(params, z))
  model = AutoencoderKL(config, dtype=jnp.bfloat16)
  out = jax.jit(lambda p, z: model.apply(p, z, method=AutoencoderKL.decode))(params, z)
  diff = np.abs(np.asarray(out) - ref).max()
  print(f"VAE decode bfloat16 vs float32: max abs diff {diff:.3g}, max |ref| "
        f"{np.abs(ref).max():.3g}")
  assert out.dtype == jnp.float32 and diff <= tolerance(ref, rel=3e-2)
