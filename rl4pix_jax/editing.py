"""User-level editing: images + instructions -> edited images (and target-token attention).

Image size rule (one rule, here: ``editing_size``): each image is edited at a *working size*
and the result is resized back (Lanczos) to the image's own size, so an edit never crops. The
working size is

* ``size=(H, W)`` when given (each side a multiple of ``size_multiple``), else
* the editor's training resolution R x R when it has one (``Editor(resolution=R)``: the tiny
  shapes editors only know the size they were trained at; a run's ``config.resolution``), else
* the image's size, first scaled down (aspect kept) so its longer side is at most ``max_side``
  when one is given (``launch.edit --max_side``, default ``default_max_side``: a large photo
  would not fit in memory at its own size), then each side rounded *down* to a multiple of
  ``size_multiple`` (64 for Stable Diffusion: 8 pixels per latent cell, and the UNet halves
  the latent grid 3 times).

Whenever the working size differs from an image's size, one warning line says so and why.
Images of equal working size are edited as one batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
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


BACKGROUND_RGB = (255, 255, 255)  # what transparent pixels are composited on (white)


def _composite(rgb: np.ndarray, alpha: np.ndarray, background) -> np.ndarray:
  """(H, W, 3) uint8: ``rgb`` over ``background`` with ``alpha`` (H, W) in [0, 1]."""
  alpha = alpha[..., None]
  out = rgb.astype(np.float32) * alpha + np.asarray(background, np.float32) * (1 - alpha)
  return np.round(out).astype(np.uint8)


def _pil_to_array(image: Image.Image) -> np.ndarray:
  """A PIL image of any mode as (H, W) / (H, W, 3) / (H, W, 4) uint8 (alpha kept)."""
  mode = image.mode
  if mode.startswith("I;16") or mode in ("I", "F"):  # 16-bit PNGs open as I;16 or I
    values = np.asarray(image, np.float64)
    top = 1.0 if mode == "F" and values.max() <= 1.0 else (
        255.0 if values.max() <= 255 else 65535.0 if values.max() <= 65535 else values.max())
    return np.round(np.clip(values, 0, top) / top * 255).astype(np.uint8)
  if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
    return np.asarray(image.convert("RGBA"))
  return np.asarray(image.convert("RGB"))  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGB


def to_uint8_rgb(image: ImageLike, background=BACKGROUND_RGB) -> np.ndarray:
  """(H, W, 3) uint8 from a PIL image or an array.

  PIL images of every mode are converted by their meaning: 16-bit (I;16, I) scaled from
  0..65535, palette and CMYK through PIL, and an alpha channel (RGBA, LA, PA, palette with
  transparency) composited over ``background`` (white by default) rather than dropped.
  Arrays: (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA; uint8, uint16 (0..65535) or float
  in [0, 1].
  """
  array = _pil_to_array(image) if isinstance(image, Image.Image) else np.asarray(image)
  if array.dtype == np.uint16:
    array = np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
  elif array.dtype != np.uint8:
    if not np.issubdtype(array.dtype, np.number) or array.min() < 0 or array.max() > 1:
      raise ValueError(f"Float images must be in [0, 1]; got range [{array.min()}, "
                       f"{array.max()}].")
    array = np.round(array * 255).astype(np.uint8)
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=-1)
  if array.ndim != 3 or array.shape[-1] not in (3, 4):
    raise ValueError(f"Image array has shape {array.shape}; expected (H, W), (H, W, 3) or "
                     "(H, W, 4).")
  if array.shape[-1] == 4:
    return _composite(array[..., :3], array[..., 3].astype(np.float32) / 255.0, background)
  return array


def resize_uint8(pixels: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """(H, W, 3) uint8 ``pixels`` resized (Lanczos) to ``size`` = (H', W'); as is when equal."""
  if pixels.shape[:2] == tuple(size):
    return pixels
  return np.asarray(Image.fromarray(pixels).resize((size[1], size[0]), Image.LANCZOS))


def prepare_image(image: ImageLike, size: Tuple[int, int]) -> np.ndarray:
  """(H, W, 3) float32 in [-1, 1] at ``size`` = (H, W)."""
  return resize_uint8(to_uint8_rgb(image), size).astype(np.float32) / 127.5 - 1.0


def parse_size(text: str, name: str = "size") -> Tuple[int, int]:
  """``"HxW"`` or ``"S"`` -> (H, W) pixels; ValueError naming ``name`` otherwise."""
  parts = text.lower().split("x")
  try:
    size = tuple(int(p) for p in parts)
  except ValueError:
    size = ()
  if len(size) == 1:
    size = size * 2
  if len(size) != 2 or min(size) < 1:
    raise ValueError(f"{name}={text!r}: expected HxW in pixels, e.g. {name}=64x64.")
  return size


def max_side_size(height: int, width: int, max_side: Optional[int]) -> Tuple[int, int]:
  """(H, W) scaled so the longer side is at most ``max_side`` (aspect kept, each side >= 1);
  as is when it already fits or ``max_side`` is None/0."""
  if not max_side or max(height, width) <= max_side:
    return height, width
  scale = max_side / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def editing_size(height: int, width: int, multiple: int,
                 size: Optional[Tuple[int, int]] = None,
                 resolution: Optional[int] = None,
                 max_side: Optional[int] = None) -> Tuple[int, int]:
  """The working size of an H x W image (the module's rule).

  Raises:
    ValueError: ``size`` is not a multiple of ``multiple``, or the image is smaller than it.
  """
  if size is not None:
    size = (int(size[0]), int(size[1]))
    if size != working_size(size[0], size[1], multiple):
      raise ValueError(f"size={size} is not a multiple of {multiple}.")
    return size
  if resolution:
    return (int(resolution), int(resolution))
  return working_size(*max_side_size(height, width, max_side), multiple)


def size_reason(height: int, width: int, multiple: int, size=None, resolution=None,
                max_side=None) -> str:
  """Why ``editing_size`` (same arguments) changed an image's size, for the warning line."""
  if size is not None:
    return "as asked (size=)"
  if resolution:
    return "the editor's training resolution"
  rounded = f"sides rounded down to a multiple of {multiple}"
  if max_side and max(height, width) > max_side:
    return f"longer side scaled down to max_side={max_side}, {rounded}"
  return rounded


def default_max_side(editor: "Editor", resolution: Optional[int] = None) -> int:
  """``launch.edit``'s default ``max_side``: ``resolution`` (a run's training resolution) or
  the editor's, else the UNet's sample size in pixels (512 for Stable Diffusion)."""
  if resolution or editor.resolution:
    return int(resolution or editor.resolution)
  sample = getattr(editor.models.unet.config, "sample_size", None) or 64
  return int(sample) * editor.models.vae_downscale


# The sampler of an editor that recorded none (Stable Diffusion's usual InstructPix2Pix values).
DEFAULT_SAMPLER = {"num_steps": 20, "guidance_scale": 7.5, "image_guidance_scale": 1.5}


def resolve_sampler(recorded: Optional[Mapping[str, Any]] = None,
                    **explicit: Optional[float]) -> dict:
  """The ``num_steps``, ``guidance_scale`` and ``image_guidance_scale`` of an edit.

  Each is the ``explicit`` value (a flag) when not None, else the ``recorded`` one (an editor's
  ``sampler_defaults``: a run's ``config.sampler`` or an exported folder's
  ``rl4pix_sampler.json``), else ``DEFAULT_SAMPLER``'s. ``launch.edit`` and
  ``launch.evaluate`` both use this.
  """
  unknown = set(explicit) - set(DEFAULT_SAMPLER)
  if unknown:
    raise TypeError(f"resolve_sampler: unknown sampler fields {sorted(unknown)}.")
  recorded = recorded or {}
  out = {}
  for name, default in DEFAULT_SAMPLER.items():
    value = explicit.get(name)
    if value is None:
      value = recorded.get(name)
    out[name] = type(default)(default if value is None else value)
  return out


@dataclasses.dataclass
class EditResult:
  """Edited images (H, W, 3) uint8 at each input's own size, and per image the (r, r) float32
  target-token map averaged over steps (None unless object phrases were given)."""
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
               capture_size: Optional[int] = None, resolution: Optional[int] = None,
               sampler_defaults: Optional[Mapping[str, Any]] = None):
    """``resolution``: the side (pixels) the editor was trained at, when it only knows that
    size (the shapes editors); None edits at each image's rounded size (see the module).
    ``sampler_defaults``: the sampler the editor was trained or exported with (num_steps,
    guidance_scale, image_guidance_scale, eta), the defaults of ``resolve_sampler``."""
    self.sampler_defaults = dict(sampler_defaults or {})
    self.models = models
    self.params = params
    self.tokenizer = tokenizer
    self.max_object_tokens = max_object_tokens
    self.capture_size = capture_size
    self.resolution = resolution

  def edit(self, images: Sequence[ImageLike], instructions: Sequence[str], *, seed: int = 0,
           num_steps: int = 20, guidance_scale: float = 7.5,
           image_guidance_scale: float = 1.5, eta: float = 0.0,
           object_phrases: Optional[Sequence[str]] = None,
           size: Optional[Tuple[int, int]] = None, max_side: Optional[int] = None,
           batch_size: int = 8) -> EditResult:
    """Edits each image by its instruction.

    Args:
      images: PIL images or arrays (see ``to_uint8_rgb``).
      instructions: one instruction per image.
      seed: PRNG seed; image i's initial noise is drawn from fold_in(seed key, i), so a
        result does not depend on how images are batched when eta = 0.
      num_steps, guidance_scale, image_guidance_scale, eta: sampler options.
      object_phrases: per image, the words of its instruction whose cross-attention map to
        return (e.g. "red circle"); None returns no maps.
      size: (H, W) working size for every image; default: the module's rule.
      max_side: the rule's limit on the longer side (None/0: none; see ``default_max_side``).
      batch_size: images per compiled call.
    Returns:
      ``EditResult`` in input order.
    """
    if len(images) != len(instructions):
      raise ValueError(f"Got {len(images)} images but {len(instructions)} instructions.")
    if object_phrases is not None and len(object_phrases) != len(images):
      raise ValueError(f"Got {len(object_phrases)} object phrases for {len(images)} images.")
    multiple = size_multiple(self.models)
    input_sizes = [to_uint8_rgb(image).shape[:2] for image in images]
    rule = dict(multiple=multiple, size=size, resolution=self.resolution, max_side=max_side)
    sizes = [editing_size(h, w, **rule) for h, w in input_sizes]
    for (height, width), working in sorted(set(zip(input_sizes, sizes))):
      if (height, width) != working:
        reason = size_reason(height, width, **rule)
        logging.warning("Editing a %dx%d image at %dx%d (%s); the result is resized back to "
                        "%dx%d.", width, height, working[1], working[0], reason, width, height)
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
          out_images[i] = resize_uint8(np.round(np.asarray(edited[j]) * 255).astype(np.uint8),
                                       input_sizes[i])
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
