"""An InstructPix2Pix editor as modules + parameters: from a diffusers folder or from configs.

``EditorModels`` holds the (static, hashable) Flax modules and the DDIM schedule;
``EditorParams`` the parameter trees (the inner ``params`` collections). Helper functions
run the frozen parts: the text encoder, the VAE encoder (posterior mode) and decoder.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp

from rl4pix_jax.diffusion import ddim
from rl4pix_jax.models.attention_ops import AttentionConfig
from rl4pix_jax.models.clip import CLIPTextConfig, CLIPTextModel
from rl4pix_jax.models.unet import UNet2DConditionModel, UNetConfig
from rl4pix_jax.models.vae import AutoencoderKL, VAEConfig, latent_mode
from rl4pix_jax.weights import diffusers_models, folders, transformers_clip

Params = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str) -> Any:
  """Maps a config string ('float32', 'bfloat16') to a jnp dtype, naming the choices."""
  if name not in DTYPES:
    raise ValueError(f"model.dtype={name!r} is not supported; choose one of {sorted(DTYPES)}.")
  return DTYPES[name]


def attention_config(config: Any) -> AttentionConfig:
  """The models' ``AttentionConfig`` from a run config's ``model.attention`` keys.

  Reads ``config.model.attention`` (auto | xla | cudnn | pallas_tpu | chunked) and its
  numbers ``attention_flash_min_tokens``, ``attention_chunk_queries`` and
  ``attention_flash_block`` (defaults in configs/shapes.py; see
  ``attention_ops.AttentionConfig``). The platform 'auto' decides for is the default backend.
  """
  return AttentionConfig(kind=config.model.attention,
                         flash_min_tokens=config.model.attention_flash_min_tokens,
                         chunk_queries=config.model.attention_chunk_queries,
                         flash_block=config.model.attention_flash_block)


@dataclasses.dataclass(frozen=True, eq=False)
class EditorModels:
  """The modules of an InstructPix2Pix editor (static: safe to close over in jit).

  Hashed by identity, so it can be a static jit argument: each instance compiles once.

  Attributes:
    unet: 8-channel conditional UNet (noisy latents + source latents).
    vae: the autoencoder; latents are ``vae_scaling_factor`` x its posterior samples.
    text_encoder: CLIP text tower whose last hidden state conditions the UNet.
    schedule: the DDIM noise schedule.
  """
  unet: UNet2DConditionModel
  vae: AutoencoderKL
  text_encoder: CLIPTextModel
  schedule: ddim.DDIMSchedule

  @property
  def vae_scaling_factor(self) -> float:
    return float(self.vae.config.scaling_factor)

  @property
  def vae_downscale(self) -> int:
    """Pixels per latent cell along each side (8 for Stable Diffusion)."""
    return int(self.vae.config.downscale_factor)


@flax.struct.dataclass
class EditorParams:
  """Parameter trees (each the inner ``params`` collection of its module)."""
  unet: Params
  vae: Params
  text_encoder: Params


def _inner(params: Mapping) -> Params:
  return params["params"] if "params" in params and len(params) == 1 else params


def build_models(unet_config: UNetConfig, vae_config: VAEConfig, text_config: CLIPTextConfig,
                 scheduler_config: Mapping, dtype: Any = jnp.float32,
                 remat: bool = False,
                 attention: AttentionConfig = AttentionConfig()) -> EditorModels:
  """Assembles ``EditorModels`` and checks that the parts fit together.

  ``attention``: the attention kernels of the UNet and of the VAE's mid-block attention
  (default XLA's; run configs: ``attention_config(config)``).
  """
  if unet_config.in_channels != 2 * vae_config.latent_channels:
    raise ValueError(f"The UNet takes {unet_config.in_channels} input channels but an "
                     f"InstructPix2Pix UNet needs 2 x latent_channels = "
                     f"{2 * vae_config.latent_channels} (noisy latents + source latents).")
  if unet_config.cross_attention_dim[0] != text_config.hidden_size:
    raise ValueError(f"UNet cross_attention_dim={unet_config.cross_attention_dim[0]} differs "
                     f"from the text encoder hidden_size={text_config.hidden_size}.")
  return EditorModels(
      unet=UNet2DConditionModel(unet_config, dtype=dtype, remat=remat, attention=attention),
      vae=AutoencoderKL(vae_config, dtype=dtype, attention=attention),
      text_encoder=CLIPTextModel(text_config, dtype=dtype),
      schedule=ddim.DDIMSchedule.from_config(scheduler_config))


def load_diffusers_editor(path_or_hub_id: str, dtype: Any = jnp.float32,
                          remat: bool = False,
                          attention: AttentionConfig = AttentionConfig()
                          ) -> Tuple[EditorModels, EditorParams, Any]:
  """Loads a diffusers InstructPix2Pix pipeline folder (or hub id) without torch.

  Args:
    path_or_hub_id: a folder with ``model_index.json``, ``unet/``, ``vae/``,
      ``text_encoder/``, ``tokenizer/`` and ``scheduler/``, or a hub id such as
      ``timbrooks/instruct-pix2pix`` (downloaded with huggingface_hub; needs network).
    dtype: compute dtype of the modules (params are always float32).
    remat: gradient checkpointing in the UNet blocks.
    attention: the attention kernels (see ``build_models``).
  Returns:
    ``(models, params, tokenizer)``.
  """
  from rl4pix_jax.tokenizer import load_clip_tokenizer  # pylint: disable=import-outside-toplevel
  folder = folders.resolve_pretrained(path_or_hub_id)
  index = folders.read_json(os.path.join(folder, "model_index.json"))
  for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
    if part not in index:
      raise folders.WeightsError(f"{folder!r}/model_index.json lists no {part!r}; an "
                                 "InstructPix2Pix pipeline needs unet, vae, text_encoder, "
                                 "tokenizer and scheduler.")
  unet_config, unet_params = diffusers_models.load_unet(os.path.join(folder, "unet"))
  vae_config, vae_params = diffusers_models.load_vae(os.path.join(folder, "vae"))
  text_config, text_params = transformers_clip.load_clip_text(
      os.path.join(folder, "text_encoder"))
  scheduler_config = folders.read_json(
      os.path.join(folder, "scheduler", "scheduler_config.json"))
  models = build_models(unet_config, vae_config, text_config, scheduler_config, dtype, remat,
                        attention)
  params = EditorParams(unet=_inner(unet_params), vae=_inner(vae_params),
                        text_encoder=_inner(text_params))
  tokenizer = load_clip_tokenizer(os.path.join(folder, "tokenizer"))
  return models, params, tokenizer


def encode_text(models: EditorModels, params: EditorParams, input_ids: jax.Array) -> jax.Array:
  """Text-encoder last hidden states (B, L, D) float32 for (B, L) int ids (no attention mask,
  as Stable Diffusion conditions)."""
  out = models.text_encoder.apply({"params": params.text_encoder}, input_ids)
  return out.last_hidden_state.astype(jnp.float32)


def encode_images(models: EditorModels, params: EditorParams, images: jax.Array) -> jax.Array:
  """Source latents: VAE posterior mode (B, h, w, c) float32 of images (B, H, W, 3) in [-1, 1].

  Not multiplied by the scaling factor: InstructPix2Pix conditions on unscaled latents.
  """
  mean, logvar = models.vae.apply({"params": params.vae}, images, method=AutoencoderKL.encode)
  return latent_mode(mean, logvar).astype(jnp.float32)


def decode_latents(models: EditorModels, params: EditorParams, latents: jax.Array) -> jax.Array:
  """Images (B, H, W, 3) float32 in [0, 1] from scaled latents (B, h, w, c)."""
  images = models.vae.apply({"params": params.vae}, latents / models.vae_scaling_factor,
                            method=AutoencoderKL.decode)
  return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def init_params(models: EditorModels, key: jax.Array, image_side: int,
                text_length: int = 77) -> EditorParams:
  """Random parameters for all three modules (for training from scratch and tests)."""
  k_unet, k_vae, k_text = jax.random.split(key, 3)
  latent_side = image_side // models.vae_downscale
  unet_cfg = models.unet.config
  unet = models.unet.init(
      k_unet, jnp.zeros((1, latent_side, latent_side, unet_cfg.in_channels)),
      jnp.zeros((1,), jnp.int32),
      jnp.zeros((1, text_length, unet_cfg.cross_attention_dim[0])))["params"]
  vae = models.vae.init(k_vae, jnp.zeros((1, image_side, image_side,
                                          models.vae.config.in_channels)))["params"]
  text = models.text_encoder.init(k_text, jnp.zeros((1, text_length), jnp.int32))["params"]
  return EditorParams(unet=unet, vae=vae, text_encoder=text)


