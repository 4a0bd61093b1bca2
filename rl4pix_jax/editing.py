"""User-level editing: images + instructions -> edited images (and target-token attention).

Image size rule: an image of H x W pixels is resized (Lanczos) to H' x W' where each side is
rounded *down* to a multiple of ``EditorModels.vae_downscale * 2**num_downsamplers`` (64 for
Stable Diffusion: 8 pixels per latent cell, and the UNet halves the latent grid 3 times),
unless ``size=(H, W)`` is given, which is used for every image. Images of equal size are
edited as one batch. Outputs keep the working size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, List, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from rl4pix_jax import pipeline
from rl4pix_jax.diffusion import sampling
from rl4pix_jax.tokenizer import find_token_positions, tokenize

ImageLike = Union[Image.Image, np.ndarray]


def size_multiple(models: pipeline.EditorModels) -> int:
  """Pixel multiple every image side must have for this editor."""
  return models.vae_downscale * 2**models.unet.config.num_downsamplers


def working_size(height: int, width: int, multiple: int) -> Tuple[int, int]:
  """(H', W'): each side rounded down to a multiple; errors if an image is too small."""
  new = (height - height % multiple, width - width % multiple)
  if min(new) == 0:
    raise ValueError(f"An image of {height}x{width} pixels is smaller than the editor's "
                     f"size multiple {multiple}; upscale it or pass size=(H, W).")
  return new


def to_uint8_rgb(image: ImageLike) -> np.ndarray:
  """(H, W, 3) uint8 from a PIL image or an array (grey, RGB or RGBA; uint8 or [0,1] float)."""
  if isinstance(image, Image.Image):
    return np.asarray(image.convert("RGB"))
  array = np.asarray(image)
  if array.dtype != np.uint8:
    if array.min() < 0 or array.max() > 1:
      raise ValueError(f"Float images must be in [0, 1]; got range [{array.min()}, "
                       f"{array.max()}].")
    array = np.round(array * 255).astype(np.uint8)
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=-1)
  if array.ndim != 3 or array.shape[-1] not in (3, 4):
    raise ValueError(f"Image array has shape {array.shape}; expected (H, W), (H, W, 3) or "
                     "(H, W, 4).")
  return array[..., :3]


def prepare_image(image: ImageLike, size: Tuple[int, int]) -> np.ndarray:
  """(H, W, 3) float32 in [-1, 1] at ``size`` = (H, W)."""
  pixels = to_uint8_rgb(image)
  if pixels.shape[:2] != tuple(size):
    pixels = np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), Image.LANCZOS))
  return pixels.astype(np.float32) / 127.5 - 1.0


@dataclasses.dataclass
class EditResult:
  """Edited images (H', W', 3) uint8, and per image the (r, r) float32 target-token map
  averaged over steps (None unless object phrases were given)."""
  images: List[np.ndarray]
  attention_maps: List[Optional[np.ndarray]]


@functools.partial(jax.jit, static_argnums=(0, 1))
def edit_batch(models: pipeline.EditorModels, config: sampling.SamplerConfig,
               params: pipeline.EditorParams, input_ids: jax.Array, uncond_ids: jax.Array,
               images: jax.Array, token_index: Optional[jax.Array],
               token_mask: Optional[jax.Array], key: jax.Array, guidance: sampling.Guidance,
               initial_latents: jax.Array) -> Tuple[jax.Array, Optional[jax.Array]]:
  """Encodes, samples and decodes one batch; returns images (B,H,W,3) in [0,1] and maps."""
  cond = sampling.EditConditioning(
      text_embeds=pipeline.encode_text(models, params, input_ids),
      uncond_text_embeds=pipeline.encode_text(models, params, uncond_ids),
      image_latents=pipeline.encode_images(models, params, images),
      token_index=token_index, token_mask=token_mask)
  trajectory = sampling.sample_trajectory(models.unet, params.unet, models.schedule, cond, key,
                                          guidance, config, initial_latents)
  edited = pipeline.decode_latents(models, params, trajectory.final_latents)
  return edited, trajectory.attention_map_mean


class Editor:
  """Edits images with an InstructPix2Pix editor (a loaded pipeline or a trained checkpoint).

  Holds the models, parameters and tokenizer; compiled functions are reused across calls of
  the same batch shape and options.
  """

  def __init__(self, models: pipeline.EditorModels, params: pipeline.EditorParams,
               tokenizer: Any, max_object_tokens: int = 8,
               capture_size: Optional[int] = None):
    self.models = models
    self.params = params
    self.tokenizer = tokenizer
    self.max_object_tokens = max_object_tokens
    self.capture_size = capture_size

  def edit(self, images: Sequence[ImageLike], instructions: Sequence[str], *, seed: int = 0,
           num_steps: int = 20, guidance_scale: float = 7.5,
           image_guidance_scale: float = 1.5, eta: float = 0.0,
           object_phrases: Optional[Sequence[str]] = None,
           size: Optional[Tuple[int, int]] = None, batch_size: int = 8) -> EditResult:
    """Edits each image by its instruction.

    Args:
      images: PIL images or arrays (see ``to_uint8_rgb``).
      instructions: one instruction per image.
      seed: PRNG seed; image i's initial noise is drawn from fold_in(seed key, i), so a
        result does not depend on how images are batched when eta = 0.
      num_steps, guidance_scale, image_guidance_scale, eta: sampler options.
      object_phrases: per image, the words of its instruction whose cross-attention map to
        return (e.g. "red circle"); None returns no maps.
      size: (H, W) for every image; default: the module's rounding rule.
      batch_size: images per compiled call.
    Returns:
      ``EditResult`` in input order.
    """
    if len(images) != len(instructions):
      raise ValueError(f"Got {len(images)} images but {len(instructions)} instructions.")
    if object_phrases is not None and len(object_phrases) != len(images):
      raise ValueError(f"Got {len(object_phrases)} object phrases for {len(images)} images.")
    multiple = size_multiple(self.models)
    sizes = []
    for image in images:
      if size is not None:
        sizes.append(working_size(size[0], size[1], multiple))
        if tuple(size) != sizes[-1]:
          raise ValueError(f"size={tuple(size)} is not a multiple of {multiple}.")
      else:
        height, width = to_uint8_rgb(image).shape[:2]
        sizes.append(working_size(height, width, multiple))
    record = object_phrases is not None
    base_key = jax.random.PRNGKey(seed)
    guidance = sampling.Guidance(jnp.float32(guidance_scale), jnp.float32(image_guidance_scale))
    out_images: List[Optional[np.ndarray]] = [None] * len(images)
    out_maps: List[Optional[np.ndarray]] = [None] * len(images)
    for group_size in sorted(set(sizes)):
      indices = [i for i, s in enumerate(sizes) if s == group_size]
      latent_side = group_size[0] // self.models.vae_downscale
      config = sampling.SamplerConfig(
          num_steps=num_steps, eta=eta, record_attention=record,
          capture_size=self.capture_size if self.capture_size else None)
      if record and config.attention_side(latent_side) not in sampling.cross_attention_sides(
          self.models.unet.config, latent_side):
        config = dataclasses.replace(config, capture_size=sampling.cross_attention_sides(
            self.models.unet.config, latent_side)[-1])
      for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        edited, maps = self._edit_chunk(chunk, images, instructions, object_phrases,
                                        group_size, config, base_key, guidance)
        for j, i in enumerate(chunk):
          out_images[i] = np.round(np.asarray(edited[j]) * 255).astype(np.uint8)
          out_maps[i] = None if maps is None else np.asarray(maps[j])
    return EditResult(images=out_images, attention_maps=out_maps)

  def _edit_chunk(self, chunk, images, instructions, object_phrases, size, config, base_key,
                  guidance):
    pixels = np.stack([prepare_image(images[i], size) for i in chunk])
    texts = [instructions[i] for i in chunk]
    input_ids = tokenize(self.tokenizer, texts)
    uncond_ids = tokenize(self.tokenizer, [""] * len(chunk))
    token_index = token_mask = None
    if object_phrases is not None:
      found = [find_token_positions(self.tokenizer, instructions[i], object_phrases[i],
                                    self.max_object_tokens) for i in chunk]
      token_index = jnp.asarray(np.stack([f[0] for f in found]))
      token_mask = jnp.asarray(np.stack([f[1] for f in found]))
    latent_shape = (size[0] // self.models.vae_downscale, size[1] // self.models.vae_downscale,
                    self.models.unet.config.out_channels)
    initial = jnp.stack([jax.random.normal(jax.random.fold_in(base_key, i), latent_shape)
                         for i in chunk])
    step_key = jax.random.fold_in(base_key, -1 % 2**31)
    return edit_batch(self.models, config, self.params, jnp.asarray(input_ids),
                      jnp.asarray(uncond_ids), jnp.asarray(pixels), token_index, token_mask,
                      step_key, guidance, initial)
