"""Plain ViT image encoder (transformers ``ViTModel``; DINO ViT-S/16) in flax.linen, NHWC.

The transformer blocks are the project's pre-LayerNorm encoder from ``models/clip.py``
(``CLIPEncoder``: x + attn(ln1(x)), then x + mlp(ln2(x))); a ViT block is the same computation
under other names (``layernorm_before``/``attention``/``layernorm_after``/``intermediate`` +
``output`` in transformers). What differs from the CLIP vision tower lives here: the patch
convolution has a bias, the class token and the position table are plain parameters, there is
no LayerNorm before the encoder, and one LayerNorm (``layernorm``) follows it.

The embedding the metrics use is the class (CLS) token of the final LayerNorm's output, which
is what the torch.hub DINO model (``facebookresearch/dino`` ``dino_vits16``, head = Identity)
returns and what MagicBrush's evaluation compares. transformers' ``pooler`` (dense + tanh) is
not part of DINO and is not built.

Params are float32; ``dtype`` is the compute dtype. Apply with ``model.apply({"params": p}, x)``.
Weight import: ``rl4pix_jax/weights/transformers_vit.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rl4pix_jax.models import clip

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_RESIZE = 256  # MagicBrush / DINO eval transform: Resize(256, bicubic) ...
DINO_CROP = 224  # ... then CenterCrop(224)
_TORCH_BICUBIC_A = -0.75  # torch.nn.functional.interpolate(mode="bicubic") kernel parameter
# The CLIP config helpers validate the fields both encoders share (same names, same rules).
_get = clip._get  # pylint: disable=protected-access
_check_common = clip._check_common  # pylint: disable=protected-access


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Hyper-parameters of a transformers ``ViTModel`` (defaults = transformers' ViTConfig).

  The field names are the ones ``clip.CLIPEncoder`` reads, so the config drives it directly.

  Attributes:
    image_size: S, the input side the position table was trained for (pixels).
    patch_size: p; the patch grid is (S // p) x (S // p).
    layer_norm_eps: epsilon of every LayerNorm (transformers' ViT: 1e-12; original DINO: 1e-6).
    qkv_bias: whether the checkpoint has query/key/value biases (False: the loader fills zeros).
  """
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  qkv_bias: bool = True

  @property
  def grid_size(self) -> int:
    """Patches per side of the trained position table."""
    return self.image_size // self.patch_size

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any]) -> "ViTConfig":
    """From a transformers ViTModel ``config.json`` (model_type ``vit``).

    Raises:
      clip.CLIPConfigError: an unsupported or inconsistent value, named.
    """
    where = "ViT config"
    if not isinstance(config, Mapping):
      raise clip.CLIPConfigError(f"{where}: expected a config dict, got {type(config).__name__}.")
    if config.get("model_type", "vit") != "vit":
      raise clip.CLIPConfigError(f"{where}: model_type={config.get('model_type')!r}, expected "
                                 "'vit' (a transformers ViTModel folder such as "
                                 "facebook/dino-vits16).")
    image_size = _get(config, "image_size", cls.image_size, where)
    patch_size = _get(config, "patch_size", cls.patch_size, where)
    if patch_size < 1 or image_size % patch_size:
      raise clip.CLIPConfigError(f"{where}: image_size={image_size} is not a multiple of "
                                 f"patch_size={patch_size}.")
    qkv_bias = config.get("qkv_bias", True)
    if not isinstance(qkv_bias, bool):
      raise clip.CLIPConfigError(f"{where}: qkv_bias={qkv_bias!r}, expected true or false.")
    return cls(
        image_size=image_size, patch_size=patch_size,
        num_channels=_get(config, "num_channels", cls.num_channels, where),
        qkv_bias=qkv_bias,
        **_check_common(config, where, cls))


@struct.dataclass
class ViTOutput:
  """last_hidden_state (B, 1 + N, D) after the final LayerNorm (class token first);
  cls_embedding (B, D) = last_hidden_state[:, 0] (the DINO embedding)."""
  last_hidden_state: jax.Array
  cls_embedding: jax.Array


def _cubic_weight(distance: np.ndarray, a: float) -> np.ndarray:
  """Keys cubic convolution kernel at |distance| (as in PyTorch's upsample_bicubic2d)."""
  x = np.abs(distance)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float64 matrix M with M @ v = torch bicubic resize of v.

  Reproduces ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`` along
  one axis given a target size (no antialiasing): source coordinate (i + 0.5) * in / out - 0.5,
  4 taps with the a = -0.75 kernel, indices clamped to the border.
  """
  matrix = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for i in range(out_size):
    source = (i + 0.5) * scale - 0.5
    base = int(np.floor(source))
    fraction = source - base
    for tap in range(-1, 3):
      weight = _cubic_weight(np.asarray(tap - fraction), _TORCH_BICUBIC_A)
      matrix[i, min(max(base + tap, 0), in_size - 1)] += float(weight)
  return matrix


def interpolate_position_embeddings(table: jax.Array, grid_size: int,
                                    new_grid: Tuple[int, int]) -> jax.Array:
  """Resizes a (1, 1 + g*g, D) position table to a (gh, gw) patch grid, as transformers does.

  Matches ``ViTEmbeddings.interpolate_pos_encoding`` (bicubic, align_corners=False, PyTorch's
  kernel); the class-token row is kept. (The original DINO code instead scales by
  ``(g' + 0.1) / g``; the two agree at the trained size, where no interpolation happens.)

  Args:
    table: (1, 1 + grid_size**2, D) float.
    grid_size: g, the trained grid side.
    new_grid: (gh, gw) target patch grid.
  Returns:
    (1, 1 + gh * gw, D) float32.
  """
  height, width = new_grid
  if (height, width) == (grid_size, grid_size):
    return table
  dim = table.shape[-1]
  patches = table[0, 1:].reshape(grid_size, grid_size, dim).astype(jnp.float32)
  rows = jnp.asarray(torch_bicubic_matrix(grid_size, height), jnp.float32)
  cols = jnp.asarray(torch_bicubic_matrix(grid_size, width), jnp.float32)
  resized = jnp.einsum("ij,jkd,lk->ild", rows, patches, cols)
  return jnp.concatenate([table[:, :1].astype(jnp.float32),
                          resized.reshape(1, height * width, dim)], axis=1)


class ViTEmbeddings(nn.Module):
  """Patch conv (with bias) + class token + position table; NHWC -> (B, 1 + N, D)."""
  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool) -> jax.Array:
    c = self.config
    p = c.patch_size
    patches = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID",
                      dtype=self.dtype, name="patch_embedding")(pixel_values.astype(self.dtype))
    batch, grid_h, grid_w, _ = patches.shape
    patches = patches.reshape(batch, grid_h * grid_w, c.hidden_size)
    init = nn.initializers.truncated_normal(0.02)
    cls_token = self.param("cls_token", init, (1, 1, c.hidden_size), jnp.float32)
    table = self.param("position_embeddings", init, (1, c.grid_size ** 2 + 1, c.hidden_size),
                       jnp.float32)
    if (grid_h, grid_w) != (c.grid_size, c.grid_size):
      if not interpolate_pos_encoding:
        raise ValueError(
            f"ViTModel: a {pixel_values.shape[1]}x{pixel_values.shape[2]} input gives a "
            f"{grid_h}x{grid_w} patch grid but the position table is {c.grid_size}x"
            f"{c.grid_size} (image_size={c.image_size}); resize the input to {c.image_size} "
            "(preprocess_dino_images does) or pass interpolate_pos_encoding=True.")
      table = interpolate_position_embeddings(table, c.grid_size, (grid_h, grid_w))
    cls = jnp.broadcast_to(cls_token.astype(patches.dtype), (batch, 1, c.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1)
    return x + table.astype(x.dtype)


class ViTModel(nn.Module):
  """transformers ``ViTModel`` without the pooler.

  Call with pixel_values (B, H, W, C) float, already normalised (``preprocess_dino_images``),
  H = W = image_size unless ``interpolate_pos_encoding`` (static bool) is True; returns
  ``ViTOutput``.
  """
  config: ViTConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array,
               interpolate_pos_encoding: bool = False) -> ViTOutput:
    c = self.config
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != c.num_channels:
      raise ValueError(f"ViTModel: pixel_values have shape {pixel_values.shape}, expected "
                       f"(B, H, W, {c.num_channels}) NHWC.")
    if min(pixel_values.shape[1:3]) < c.patch_size:
      raise ValueError(f"ViTModel: input {pixel_values.shape[1]}x{pixel_values.shape[2]} is "
                       f"smaller than one {c.patch_size}x{c.patch_size} patch.")
    x = ViTEmbeddings(c, self.dtype, name="embeddings")(pixel_values, interpolate_pos_encoding)
    x = clip.CLIPEncoder(c, self.dtype, name="encoder")(x.astype(self.dtype))
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, use_fast_variance=False, dtype=jnp.float32,
                     name="layernorm")(x)
    return ViTOutput(last_hidden_state=x, cls_embedding=x[:, 0])


def _center_crop_offset(size: int, crop: int) -> int:
  """torchvision's CenterCrop offset: int(round((size - crop) / 2))."""
  return int(round((size - crop) / 2.0))


def preprocess_dino_images(
    images: jax.Array,
    resize: int = DINO_RESIZE,
    crop: int = DINO_CROP,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> jax.Array:
  """DINO evaluation preprocessing in pure JAX (jit-able; shapes are static).

  The transform of MagicBrush's ``evaluation/image_eval.py`` (and DINO's own eval):
  ``Resize(256, interpolation=bicubic)`` of the shortest side (long side
  ``int(256 * long / short)``, torchvision's rule), ``CenterCrop(224)`` (offset
  ``round((size - 224) / 2)``), ``ToTensor``, ``Normalize(ImageNet mean, std)``.
  Resampling is ``jax.image.resize`` bicubic with antialiasing in float; torchvision resizes
  the uint8 PIL image with PIL's bicubic filter, so values differ by resampling/rounding only.

  Args:
    images: (B, H, W, 3) float in [0, 1].
    resize: the shortest side after resizing (pixels).
    crop: the square crop side (pixels); must be <= resize.
    mean, std: per-channel normalisation.
  Returns:
    (B, crop, crop, 3) float32 pixel values for ``ViTModel``.
  """
  if images.ndim != 4 or images.shape[-1] != len(mean):
    raise ValueError(f"preprocess_dino_images: images have shape {images.shape}, expected "
                     f"(B, H, W, {len(mean)}) with values in [0, 1].")
  if crop > resize:
    raise ValueError(f"preprocess_dino_images: crop={crop} is larger than resize={resize}.")
  batch, height, width, channels = images.shape
  if width <= height:
    new_h, new_w = int(resize * height / width), resize
  else:
    new_h, new_w = resize, int(resize * width / height)
  x = images.astype(jnp.float32)
  if (new_h, new_w) != (height, width):
    x = jax.image.resize(x, (batch, new_h, new_w, channels), method="bicubic", antialias=True)
  top, left = _center_crop_offset(new_h, crop), _center_crop_offset(new_w, crop)
  x = x[:, top:top + crop, left:left + crop]
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def dino_image_embeddings(model: ViTModel, params, images: jax.Array,
                          resize: int = DINO_RESIZE) -> jax.Array:
  """L2-normalised DINO CLS embeddings of raw images.

  Args:
    model: a ``ViTModel`` (DINO ViT-S/16: image_size 224).
    params: its parameter tree.
    images: (B, H, W, 3) float in [0, 1], any size; preprocessed with
      ``preprocess_dino_images(resize=resize, crop=model.config.image_size)``.
    resize: shortest side before the crop (256 for DINO at 224; scale it with image_size for
      tiny test models).
  Returns:
    (B, D) float32 unit vectors.
  """
  pixels = preprocess_dino_images(images, resize, model.config.image_size)
  embeddings = model.apply({"params": params}, pixels).cls_embedding.astype(jnp.float32)
  return embeddings / jnp.linalg.norm(embeddings, axis=-1, keepdims=True)
