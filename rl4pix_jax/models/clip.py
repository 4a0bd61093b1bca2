"""CLIP text and vision transformers in flax.linen (NHWC images), matching transformers' CLIP.

One pre-LayerNorm transformer encoder serves both towers. Parameter names mirror the
transformers module names (``embeddings.token_embedding``, ``encoder.layers_0.self_attn.q_proj``,
``final_layer_norm``, ``pre_layrnorm`` ...), so weight conversion is a renaming plus layout
change; see ``rl4pix_jax/weights/transformers_clip.py``.

Params are float32; ``dtype`` is the compute dtype (bfloat16 on accelerators). Apply a model
with ``model.apply({"params": params}, ...)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
_LEGACY_EOS_TOKEN_ID = 2  # transformers' pre-#24773 configs: pool at argmax(input_ids)


class CLIPConfigError(ValueError):
  """A CLIP config.json value this implementation does not support."""


def _get(config: Mapping[str, Any], key: str, default: Any, where: str, kind=int) -> Any:
  """config[key] (or ``default`` when absent) converted with ``kind``, with a named error."""
  value = config.get(key, default)
  if value is None or isinstance(value, (list, tuple, dict)) or isinstance(value, bool):
    raise CLIPConfigError(f"{where}: '{key}'={value!r} is not supported; expected a single "
                          f"{kind.__name__}.")
  try:
    return kind(value)
  except (TypeError, ValueError) as e:
    raise CLIPConfigError(f"{where}: '{key}'={value!r} is not a valid {kind.__name__}.") from e


def _check_common(config: Mapping[str, Any], where: str, defaults) -> dict:
  """Fields shared by both towers; absent keys take transformers' defaults (``defaults``)."""
  act = _get(config, "hidden_act", defaults.hidden_act, where, str)
  if act not in _ACTIVATIONS:
    raise CLIPConfigError(f"{where}: hidden_act={act!r} is not supported; expected one of "
                          f"{sorted(_ACTIVATIONS)}.")
  hidden = _get(config, "hidden_size", defaults.hidden_size, where)
  heads = _get(config, "num_attention_heads", defaults.num_attention_heads, where)
  if heads < 1 or hidden % heads:
    raise CLIPConfigError(f"{where}: hidden_size={hidden} is not divisible by "
                          f"num_attention_heads={heads}.")
  return dict(
      hidden_size=hidden,
      intermediate_size=_get(config, "intermediate_size", defaults.intermediate_size, where),
      num_hidden_layers=_get(config, "num_hidden_layers", defaults.num_hidden_layers, where),
      num_attention_heads=heads,
      hidden_act=act,
      layer_norm_eps=_get(config, "layer_norm_eps", defaults.layer_norm_eps, where, float),
  )


def _pick_tower(config: Mapping[str, Any], tower_key: str, model_type: str, where: str):
  """Returns (tower config, projection_dim of the enclosing CLIPModel or None)."""
  if not isinstance(config, Mapping):
    raise CLIPConfigError(f"{where}: expected a config dict, got {type(config).__name__}.")
  if tower_key in config:  # a whole CLIPModel config
    if config.get("model_type", "clip") != "clip":
      raise CLIPConfigError(f"{where}: model_type={config.get('model_type')!r}, expected 'clip'.")
    return config[tower_key], config.get("projection_dim")
  found = config.get("model_type", model_type)
  if found != model_type:
    raise CLIPConfigError(f"{where}: model_type={found!r}, expected {model_type!r} (or a "
                          f"CLIPModel config with '{tower_key}').")
  return config, None


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """Hyper-parameters of the CLIP text tower.

  Attributes:
    projection_dim: P, size of ``text_embeds``; None for a bare CLIPTextModel (SD's
      text_encoder) that has no ``text_projection``.
    eos_token_id: pooling rule: 2 means the legacy argmax of input_ids, else the first
      position of this id.
  """
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  projection_dim: Optional[int] = None

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any],
                        projection_dim: Optional[int] = None) -> "CLIPTextConfig":
    """From a CLIPTextModel(WithProjection) config.json, a CLIPModel's ``text_config``, or a
    whole CLIPModel config (then ``projection_dim`` defaults to the CLIPModel's).

    Args:
      config: the parsed JSON dict.
      projection_dim: P to build a ``text_projection``; None for none (bare CLIPTextModel).
    """
    where = "CLIP text config"
    tower, model_projection = _pick_tower(config, "text_config", "clip_text_model", where)
    if projection_dim is None:
      projection_dim = model_projection
    return cls(
        vocab_size=_get(tower, "vocab_size", cls.vocab_size, where),
        max_position_embeddings=_get(tower, "max_position_embeddings",
                                     cls.max_position_embeddings, where),
        eos_token_id=_get(tower, "eos_token_id", cls.eos_token_id, where),
        projection_dim=None if projection_dim is None else int(projection_dim),
        **_check_common(tower, where, cls))


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """Hyper-parameters of the CLIP vision tower (ViT).

  Attributes:
    image_size: S, input height = width in pixels; patch_size: p (S % p == 0).
    projection_dim: P, size of ``image_embeds``; None for a bare CLIPVisionModel.
  """
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: Optional[int] = None

  @classmethod
  def from_transformers(cls, config: Mapping[str, Any],
                        projection_dim: Optional[int] = None) -> "CLIPVisionConfig":
    """From a CLIPVisionModel(WithProjection) config.json, a CLIPModel's ``vision_config``,
    or a whole CLIPModel config (then ``projection_dim`` defaults to the CLIPModel's)."""
    where = "CLIP vision config"
    tower, model_projection = _pick_tower(config, "vision_config", "clip_vision_model", where)
    if projection_dim is None:
      projection_dim = model_projection
    image_size = _get(tower, "image_size", cls.image_size, where)
    patch_size = _get(tower, "patch_size", cls.patch_size, where)
    if image_size % patch_size:
      raise CLIPConfigError(f"{where}: image_size={image_size} is not a multiple of "
                            f"patch_size={patch_size}.")
    return cls(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=_get(tower, "num_channels", cls.num_channels, where),
        projection_dim=None if projection_dim is None else int(projection_dim),
        **_check_common(tower, where, cls))


@struct.dataclass
class CLIPTextOutput:
  """last_hidden_state (B, L, D); pooled_output (B, D) at the end token; text_embeds (B, P)
  (projected, not normalised) or None without a projection."""
  last_hidden_state: jax.Array
  pooled_output: jax.Array
  text_embeds: Optional[jax.Array] = None


@struct.dataclass
class CLIPVisionOutput:
  """last_hidden_state (B, 1 + N, D) (class token first, no post LayerNorm); pooled_output
  (B, D) = post LayerNorm of the class token; image_embeds (B, P) or None."""
  last_hidden_state: jax.Array
  pooled_output: jax.Array
  image_embeds: Optional[jax.Array] = None


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
  # Exact two-pass variance and float32 statistics: parity with torch.nn.LayerNorm.
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=jnp.float32, name=name)


class CLIPAttention(nn.Module):
  """Multi-head self-attention; (B, T, D) -> (B, T, D)."""
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array], is_causal: bool) -> jax.Array:
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    dense = lambda name: nn.Dense(width, dtype=self.dtype, name=name)
    split = lambda t: t.reshape(batch, length, self.num_heads, head_dim)
    q = split(dense("q_proj")(x))
    k = split(dense("k_proj")(x))
    v = split(dense("v_proj")(x))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal)
    return dense("out_proj")(out.reshape(batch, length, width))


class CLIPMLP(nn.Module):
  """fc1 -> activation -> fc2; (B, T, D) -> (B, T, D)."""
  hidden_size: int
  intermediate_size: int
  hidden_act: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
    x = _ACTIVATIONS[self.hidden_act](x)
    return nn.Dense(self.hidden_size, dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
  """Pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  config: Any  # CLIPTextConfig or CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array], is_causal: bool) -> jax.Array:
    c = self.config
    h = _layer_norm(c.layer_norm_eps, "layer_norm1")(x).astype(self.dtype)
    x = x + CLIPAttention(c.num_attention_heads, self.dtype, name="self_attn")(h, mask, is_causal)
    h = _layer_norm(c.layer_norm_eps, "layer_norm2")(x).astype(self.dtype)
    mlp = CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act, self.dtype, name="mlp")
    return x + mlp(h)


class CLIPEncoder(nn.Module):
  """A stack of ``num_hidden_layers`` blocks named ``layers_0`` ... ``layers_{n-1}``."""
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None,
               is_causal: bool = False) -> jax.Array:
    for i in range(self.config.num_hidden_layers):
      x = CLIPEncoderLayer(self.config, self.dtype, name=f"layers_{i}")(x, mask, is_causal)
    return x


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """Position of the pooled token per row, following transformers' CLIPTextModel rule.

  Args:
    input_ids: (B, L) int token ids.
    eos_token_id: the config's value; 2 selects the legacy rule (argmax of the ids, i.e. the
      highest id = ``<|endoftext|>`` for OpenAI vocabularies), anything else the first position
      equal to it (0 when absent).
  Returns:
    (B,) int32 positions.
  """
  if eos_token_id == _LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(input_ids, axis=-1).astype(jnp.int32)
  return jnp.argmax(input_ids == eos_token_id, axis=-1).astype(jnp.int32)


class CLIPTextModel(nn.Module):
  """CLIP text transformer (causal), optionally with ``text_projection``.

  Call with input_ids (B, L) int (L <= max_position_embeddings) and an optional padding
  attention_mask (B, L) (1 = attend); returns ``CLIPTextOutput``. Stable Diffusion passes no
  attention_mask.
  """
  config: CLIPTextConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array,
               attention_mask: Optional[jax.Array] = None) -> CLIPTextOutput:
    c = self.config
    batch, length = input_ids.shape
    if length > c.max_position_embeddings:
      raise ValueError(f"CLIPTextModel: sequence length {length} exceeds "
                       f"max_position_embeddings={c.max_position_embeddings}.")
    x = _TextEmbeddings(c, name="embeddings")(input_ids)
    mask = None
    if attention_mask is not None:
      keys = attention_mask.astype(bool)[:, None, None, :]  # (B, 1, 1, L)
      causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
      mask = jnp.logical_and(keys, causal)
    encoder = CLIPEncoder(c, self.dtype, name="encoder")
    x = encoder(x.astype(self.dtype), mask=mask, is_causal=mask is None)
    x = _layer_norm(c.layer_norm_eps, "final_layer_norm")(x)
    pooled = x[jnp.arange(batch), eos_positions(input_ids, c.eos_token_id)]
    text_embeds = None
    if c.projection_dim is not None:
      text_embeds = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype,
                             name="text_projection")(pooled)
    return CLIPTextOutput(last_hidden_state=x, pooled_output=pooled, text_embeds=text_embeds)


class _TextEmbeddings(nn.Module):
  """Token + learned absolute position embeddings; (B, L) ids -> (B, L, D) float32."""
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array) -> jax.Array:
    c = self.config
    tokens = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding")(input_ids)
    positions = nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embedding")(
        jnp.arange(input_ids.shape[1]))
    return tokens + positions[None]


class _VisionEmbeddings(nn.Module):
  """Patch conv (no bias) + class token + position embeddings; NHWC -> (B, 1 + N, D)."""
  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    c = self.config
    p = c.patch_size
    patches = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                      dtype=self.dtype, name="patch_embedding")(pixel_values.astype(self.dtype))
    batch = patches.shape[0]
    patches = patches.reshape(batch, -1, c.hidden_size)
    class_embedding = self.param("class_embedding", nn.initializers.normal(1.0),
                                 (c.hidden_size,), jnp.float32)
    num_positions = (c.image_size // p) ** 2 + 1
    position_embedding = nn.Embed(num_positions, c.hidden_size, name="position_embedding")
    cls = jnp.broadcast_to(class_embedding.astype(patches.dtype), (batch, 1, c.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1)
    return x + position_embedding(jnp.arange(num_positions))[None].astype(x.dtype)


class CLIPVisionModel(nn.Module):
  """CLIP ViT image tower, optionally with ``visual_projection``.

  Call with pixel_values (B, S, S, C) float, already CLIP-normalised (see
  ``preprocess_clip_images``); returns ``CLIPVisionOutput``.
  """
  config: CLIPVisionConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> CLIPVisionOutput:
    c = self.config
    expected = (c.image_size, c.image_size, c.num_channels)
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
      raise ValueError(f"CLIPVisionModel: pixel_values have shape {pixel_values.shape}, "
                       f"expected (B, {c.image_size}, {c.image_size}, {c.num_channels}) NHWC.")
    x = _VisionEmbeddings(c, self.dtype, name="embeddings")(pixel_values)
    x = _layer_norm(c.layer_norm_eps, "pre_layrnorm")(x)
    x = CLIPEncoder(c, self.dtype, name="encoder")(x.astype(self.dtype))
    pooled = _layer_norm(c.layer_norm_eps, "post_layernorm")(x[:, 0])
    image_embeds = None
    if c.projection_dim is not None:
      image_embeds = nn.Dense(c.projection_dim, use_bias=False, dtype=self.dtype,
                              name="visual_projection")(pooled)
    return CLIPVisionOutput(last_hidden_state=x, pooled_output=pooled, image_embeds=image_embeds)


def _shortest_edge_resize_shape(height: int, width: int, size: int):
  """transformers' shortest-edge rule: short side -> size, long side -> int(size*long/short)."""
  if width <= height:
    return int(size * height / width), size
  return size, int(size * width / height)


def preprocess_clip_images(
    images: jax.Array,
    image_size: int = 224,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> jax.Array:
  """CLIP image preprocessing in pure JAX (jit-able; shapes are static).

  Resizes the shortest side to ``image_size`` (bicubic, antialiased, via ``jax.image.resize``;
  long side ``int(image_size * long / short)`` as transformers computes it), center-crops
  ``image_size`` x ``image_size`` (offset ``(H - S) // 2``), normalises per channel.

  It matches ``CLIPImageProcessor`` up to resampling: the processor rounds to uint8 and
  resizes with PIL/torchvision, this stays in float. ``tests/models/test_clip.py`` measures the gap.

  Args:
    images: (B, H, W, 3) float in [0, 1].
    image_size: S, the vision tower's ``image_size``.
    mean, std: per-channel normalisation (OpenAI CLIP's by default).
  Returns:
    (B, S, S, 3) float32 pixel values for ``CLIPVisionModel``.
  """
  if images.ndim != 4 or images.shape[-1] != len(mean):
    raise ValueError(f"preprocess_clip_images: images have shape {images.shape}, expected "
                     f"(B, H, W, {len(mean)}) with values in [0, 1].")
  batch, height, width, channels = images.shape
  new_h, new_w = _shortest_edge_resize_shape(height, width, image_size)
  x = images.astype(jnp.float32)
  if (new_h, new_w) != (height, width):
    x = jax.image.resize(x, (batch, new_h, new_w, channels), method="bicubic", antialias=True)
  top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
  x = x[:, top:top + image_size, left:left + image_size]
  mean_array = jnp.asarray(mean, jnp.float32)
  std_array = jnp.asarray(std, jnp.float32)
  return (x - mean_array) / std_array


def _l2_normalise(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def clip_text_embeddings(model: CLIPTextModel, params, input_ids: jax.Array) -> jax.Array:
  """L2-normalised projected text embeddings.

  Args:
    model: a ``CLIPTextModel`` whose config has ``projection_dim``.
    params: its parameter tree.
    input_ids: (B, L) int ids from ``rl4pix_jax.tokenizer.tokenize``.
  Returns:
    (B, P) float32 unit vectors.
  """
  if model.config.projection_dim is None:
    raise ValueError("clip_text_embeddings needs a text tower with text_projection "
                     "(load a CLIPModel or CLIPTextModelWithProjection folder).")
  return _l2_normalise(model.apply({"params": params}, input_ids).text_embeds)


def clip_image_embeddings(
    model: CLIPVisionModel,
    params,
    images: jax.Array,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> jax.Array:
  """L2-normalised projected image embeddings of raw images.

  Args:
    model: a ``CLIPVisionModel`` whose config has ``projection_dim``.
    params: its parameter tree.
    images: (B, H, W, 3) float in [0, 1], any size (preprocessed with
      ``preprocess_clip_images`` to the model's image_size).
    mean, std: the normalisation of the checkpoint's image processor.
  Returns:
    (B, P) float32 unit vectors.
  """
  if model.config.projection_dim is None:
    raise ValueError("clip_image_embeddings needs a vision tower with visual_projection "
                     "(load a CLIPModel or CLIPVisionModelWithProjection folder).")
  pixels = preprocess_clip_images(images, model.config.image_size, mean, std)
  return _l2_normalise(model.apply({"params": params}, pixels).image_embeds)
