"""Tiny model configs and deterministic random parameters shared by the tests."""

import jax
import jax.numpy as jnp

from rl4pix_jax.models import unet as unet_lib

# Two cross-attention sides (16 and the 8x8 mid block for 16x16 latents), 8 input channels.
TINY_UNET = dict(
    in_channels=8, out_channels=4, sample_size=16,
    block_out_channels=[32, 64], layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
TEXT_LEN = 8


def tiny_unet(dtype=jnp.float32):
  return unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.from_diffusers(TINY_UNET), dtype=dtype)


def tiny_unet_params(seed: int = 0, batch: int = 1, side: int = 16):
  """Random params (flax default init, perturbed so that no output layer is zero)."""
  model = tiny_unet()
  variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((batch, side, side, 8)),
                         jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, TEXT_LEN, 32)))
  leaves, treedef = jax.tree_util.tree_flatten(variables["params"])
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, leaves)


def save_tiny_diffusers_pipeline(folder: str, seed: int = 0) -> None:
  """Writes a tiny random StableDiffusionInstructPix2PixPipeline (PyTorch) to ``folder``.

  32x32 images, a 2-level VAE (16x16 latents), the TINY_UNET architecture, a 2-layer CLIP
  text encoder over the real CLIP vocabulary, the packaged tokenizer and the SD DDIM config.
  Every weight is perturbed with seeded noise so that no zero/one init hides a bug.
  """
  from rl4pix_jax.diffusion import ddim  # pylint: disable=import-outside-toplevel
  _save_random_pipeline(folder, seed, TINY_UNET, vae_widths=(32, 64), vae_layers=1,
                        image_side=32, scheduler=dict(ddim.default_scheduler_config(),
                                                      _class_name="DDIMScheduler"))


# The SD1.5 / InstructPix2Pix UNet's block structure with its widths shrunk from
# (320, 640, 1280, 1280): four levels (CrossAttnDown x3 + Down, the mirror going up), two
# resnets per level, 8 attention heads, 8 input channels. 64 px images -> 8x8 latents.
TINY_SD15_UNET = dict(
    in_channels=8, out_channels=4, sample_size=8,
    block_out_channels=[16, 32, 32, 32], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
# SD1.x's noise levels under the Euler-ancestral class that timbrooks/instruct-pix2pix ships.
# diffusers 0.42 writes it with that class's fields only: no clip_sample or set_alpha_to_one,
# so DDIM reads it with x0 clipping off and alpha_prev = 1 at the last step (sigma_t = 0).
IP2P_SCHEDULER_CONFIG = dict(
    _class_name="EulerAncestralDiscreteScheduler", num_train_timesteps=1000,
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", trained_betas=None,
    prediction_type="epsilon", steps_offset=1)


def save_tiny_sd15_pipeline(folder: str, seed: int = 0) -> None:
  """Writes a tiny random InstructPix2Pix pipeline (PyTorch) with SD1.5's structure.

  ``TINY_SD15_UNET``; a four-level VAE (4 DownEncoderBlock2D, two resnets each, /8, widths
  16-32); a 2-layer CLIP text encoder over the real vocabulary; the packaged tokenizer;
  ``IP2P_SCHEDULER_CONFIG``. Weights perturbed with seeded noise as in
  ``save_tiny_diffusers_pipeline``.
  """
  _save_random_pipeline(folder, seed, TINY_SD15_UNET, vae_widths=(16, 16, 32, 32),
                        vae_layers=2, image_side=64, scheduler=IP2P_SCHEDULER_CONFIG)


def _save_random_pipeline(folder, seed, unet_config, vae_widths, vae_layers, image_side,
                          scheduler):
  """An InstructPix2Pix pipeline of random (seeded, perturbed) weights saved to ``folder``:
  UNet ``unet_config``, a VAE of ``len(vae_widths)`` levels, a 2-layer CLIP text encoder,
  the packaged tokenizer and the scheduler class and config ``scheduler`` names."""
  import diffusers  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  from rl4pix_jax.tokenizer import load_clip_tokenizer  # pylint: disable=import-outside-toplevel

  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(**unet_config)
  levels = len(vae_widths)
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(vae_widths),
      down_block_types=("DownEncoderBlock2D",) * levels,
      up_block_types=("UpDecoderBlock2D",) * levels,
      layers_per_block=vae_layers, norm_num_groups=8, sample_size=image_side)
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
      eos_token_id=49407, pad_token_id=49407))
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for model in (unet, vae, text_encoder):
      for param in model.parameters():
        param.add_(0.05 * torch.randn(param.shape, generator=generator))
  scheduler_class = getattr(diffusers, scheduler["_class_name"])
  pipe = diffusers.StableDiffusionInstructPix2PixPipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=load_clip_tokenizer(), unet=unet,
      scheduler=scheduler_class.from_config(
          {k: v for k, v in scheduler.items() if k != "_class_name"}),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(folder)


def save_tiny_clip_model(folder: str, seed: int = 0) -> None:
  """Writes a tiny random transformers CLIPModel (32 px images, real CLIP vocabulary)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel

  torch.manual_seed(seed)
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=37,
                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                       bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
      vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                         num_hidden_layers=1, num_attention_heads=2),
      projection_dim=16)
  transformers.CLIPModel(config).save_pretrained(folder)


def quick_random_params(init, seed: int = 0):
  """Random parameters shaped like ``init(key)``'s without running it (flax's eager ``init`` is
  a forward pass per module, over a minute on a busy core): shapes from ``jax.eval_shape``,
  kernels N(0, 1/fan_in), norm scales 1 + N(0, 0.05), the rest N(0, 0.05). For tests that
  only need some fixed random model (the demo's editors, the W&B run)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if len(leaf.shape) >= 2:
      values = rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
    else:
      values = (1.0 if name == "scale" else 0.0) + rng.normal(0.0, 0.05, leaf.shape)
    return jnp.asarray(values, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def quick_random_editor_params(models, image_side: int, seed: int = 0):
  """``quick_random_params`` of ``pipeline.init_params(models, key, image_side)``."""
  from rl4pix_jax import pipeline  # pylint: disable=import-outside-toplevel
  return quick_random_params(lambda key: pipeline.init_params(models, key, image_side), seed)
