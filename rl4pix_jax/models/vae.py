"""Flax AutoencoderKL (the Stable Diffusion VAE), NHWC, float32 parameters.

Matches diffusers' ``AutoencoderKL`` for the configurations ``VAEConfig`` accepts. Latents
are unscaled: multiply by ``config.scaling_factor`` before the UNet and divide after.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rl4pix_jax.models import layers
from rl4pix_jax.models.attention_ops import AttentionConfig

Dtype = Any

_EPS = 1e-6  # every VAE norm uses diffusers' resnet_eps=1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
_FIXED_FIELDS = {"shift_factor": None, "latents_mean": None, "latents_std": None}
_IGNORED_FIELDS = ("force_upcast",)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """diffusers ``AutoencoderKL`` config fields (see its ``config.json``)."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",) * 4
  up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",) * 4
  block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 512
  scaling_factor: float = 0.18215
  mid_block_add_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True

  @classmethod
  def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
    """Builds a config from diffusers' ``vae/config.json`` (a dict).

    Raises ValueError naming the field, its value and what is supported, for unknown fields,
    block types other than DownEncoderBlock2D/UpDecoderBlock2D, and SD3/Flux extras
    (``shift_factor``, ``latents_mean``, ``latents_std``).
    """
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    for name, supported in _FIXED_FIELDS.items():
      value = config.pop(name, supported)
      if value != supported:
        raise ValueError(f"VAE config field {name!r}={value!r} is not supported; only "
                         f"{supported!r} is (Stable Diffusion 1.x/2.x VAEs).")
    for name in _IGNORED_FIELDS:
      config.pop(name, None)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
      raise ValueError(f"Unknown VAE config fields {unknown}; expected diffusers "
                       f"AutoencoderKL fields: {sorted(known | set(_FIXED_FIELDS))}.")
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name in config:
        value = config[f.name]
        kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    result = cls(**kwargs)
    result.validate()
    return result

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> "VAEConfig":
    """Builds a config from a dict or ml_collections ConfigDict with diffusers field names."""
    if hasattr(config, "to_dict"):
      config = config.to_dict()
    return cls.from_diffusers(config)

  def validate(self) -> None:
    """Raises ValueError naming the offending field."""
    n = len(self.block_out_channels)
    for name, types, allowed in (("down_block_types", self.down_block_types,
                                  "DownEncoderBlock2D"),
                                 ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
      bad = [t for t in types if t != allowed]
      if bad or len(types) != n:
        raise ValueError(f"VAE config field {name!r}={list(types)!r}: expected {n} "
                         f"{allowed!r} entries (one per block_out_channels).")
    if not isinstance(self.layers_per_block, int):
      raise ValueError(f"VAE config field 'layers_per_block'={self.layers_per_block!r}: "
                       "expected an int.")
    for i, channels in enumerate(self.block_out_channels):
      if channels % self.norm_num_groups:
        raise ValueError(f"VAE config: block_out_channels[{i}]={channels} is not divisible by "
                         f"norm_num_groups={self.norm_num_groups}.")
    layers.activation(self.act_fn)

  @property
  def downscale_factor(self) -> int:
    """Image pixels per latent pixel along each side (8 for SD)."""
    return 2 ** (len(self.block_out_channels) - 1)

  def to_diffusers(self) -> dict:
    """A ``config.json`` dict that ``diffusers.AutoencoderKL`` accepts."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
      out[name] = list(out[name])
    out["_class_name"] = "AutoencoderKL"
    return out


class _MidBlock(nn.Module):
  """UNetMidBlock2D without time embedding: resnet, [self-attention], resnet."""
  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention: AttentionConfig = AttentionConfig()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    channels = x.shape[-1]
    resnet = lambda name: layers.ResnetBlock2D(channels, cfg.norm_num_groups, _EPS, 1.0,
                                               cfg.act_fn, self.dtype, name=name)
    x = resnet("resnets_0")(x)
    if cfg.mid_block_add_attention:
      x = layers.SpatialSelfAttention(channels, cfg.norm_num_groups, _EPS, 1.0, self.dtype,
                                      self.attention, name="attentions_0")(x)
    return resnet("resnets_1")(x)


class _ResampleBlock(nn.Module):
  """DownEncoderBlock2D / UpDecoderBlock2D: resnets, then an optional down/up sampler."""
  config: VAEConfig
  channels: int
  num_layers: int
  direction: str  # "down" or "up"
  resample: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    for j in range(self.num_layers):
      x = layers.ResnetBlock2D(self.channels, cfg.norm_num_groups, _EPS, 1.0, cfg.act_fn,
                               self.dtype, name=f"resnets_{j}")(x)
    if self.resample and self.direction == "down":
      x = layers.Downsample2D(self.channels, 0, self.dtype, name="downsamplers_0")(x)
    elif self.resample:
      x = layers.Upsample2D(self.channels, self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  """Images (B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels) moments."""
  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention: AttentionConfig = AttentionConfig()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    x = layers.conv(cfg.block_out_channels[0], 3, self.dtype, "conv_in")(x)
    n = len(cfg.block_out_channels)
    for i, channels in enumerate(cfg.block_out_channels):
      x = _ResampleBlock(cfg, channels, cfg.layers_per_block, "down", i < n - 1, self.dtype,
                         name=f"down_blocks_{i}")(x)
    x = _MidBlock(cfg, self.dtype, self.attention, name="mid_block")(x)
    x = layers.group_norm(cfg.norm_num_groups, _EPS, self.dtype, "conv_norm_out")(x)
    x = layers.activation(cfg.act_fn)(x)
    return layers.conv(2 * cfg.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
  """Latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels)."""
  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention: AttentionConfig = AttentionConfig()

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg = self.config
    x = layers.conv(cfg.block_out_channels[-1], 3, self.dtype, "conv_in")(z)
    x = _MidBlock(cfg, self.dtype, self.attention, name="mid_block")(x)
    reversed_channels = cfg.block_out_channels[::-1]
    for i, channels in enumerate(reversed_channels):
      x = _ResampleBlock(cfg, channels, cfg.layers_per_block + 1, "up",
                         i < len(reversed_channels) - 1, self.dtype, name=f"up_blocks_{i}")(x)
    x = layers.group_norm(cfg.norm_num_groups, _EPS, self.dtype, "conv_norm_out")(x)
    x = layers.activation(cfg.act_fn)(x)
    return layers.conv(cfg.out_channels, 3, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
  """The KL autoencoder. Use ``apply(params, x, method=AutoencoderKL.encode)`` etc.

  Attributes:
    config: the architecture.
    dtype: compute dtype; parameters are float32 and outputs are float32.
    attention: the mid-block self-attention's kernels (``attention_ops.AttentionConfig``;
      default XLA's; one head over h * w latent tokens, always float32).
  """
  config: VAEConfig
  dtype: Dtype = jnp.float32
  attention: AttentionConfig = AttentionConfig()

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype, self.attention)
    self.decoder = Decoder(cfg, self.dtype, self.attention)
    if cfg.use_quant_conv:
      self.quant_conv = layers.conv(2 * cfg.latent_channels, 1, self.dtype, "quant_conv")
    if cfg.use_post_quant_conv:
      self.post_quant_conv = layers.conv(cfg.latent_channels, 1, self.dtype, "post_quant_conv")

  def encode(self, images: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Posterior moments of images.

    Args:
      images: (B, H, W, in_channels) in [-1, 1], NHWC; H, W divisible by the downscale factor.
    Returns:
      (mean, logvar), each (B, H/f, W/f, latent_channels) float32; logvar clipped to
      [-30, 20] as diffusers does. Latents are unscaled.
    """
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
      raise ValueError(f"VAE encode got images of shape {images.shape}; expected "
                       f"(B, H, W, {cfg.in_channels}) NHWC in [-1, 1].")
    f = cfg.downscale_factor
    if images.shape[1] % f or images.shape[2] % f:
      raise ValueError(f"VAE encode: image size {images.shape[1:3]} must be divisible by {f}.")
    moments = self.encoder(images.astype(self.dtype))
    if cfg.use_quant_conv:
      moments = self.quant_conv(moments)
    moments = moments.astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def decode(self, latents: jax.Array) -> jax.Array:
    """Images from unscaled latents.

    Args:
      latents: (B, h, w, latent_channels) unscaled latents.
    Returns:
      (B, h*f, w*f, out_channels) float32, nominally in [-1, 1] (not clipped).
    """
    cfg = self.config
    if latents.ndim != 4 or latents.shape[-1] != cfg.latent_channels:
      raise ValueError(f"VAE decode got latents of shape {latents.shape}; expected "
                       f"(B, h, w, {cfg.latent_channels}) NHWC.")
    z = latents.astype(self.dtype)
    if cfg.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Reconstruction through the posterior mode (used by ``init``)."""
    mean, _ = self.encode(images)
    return self.decode(mean)


def latent_mode(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """The posterior mode (= mean), (B, h, w, C) float32; ``logvar`` is unused."""
  del logvar
  return mean


def latent_sample(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """A posterior sample ``mean + exp(logvar / 2) * eps``, eps ~ N(0, 1) drawn with ``key``.

  Args:
    key: PRNG key.
    mean, logvar: (B, h, w, C) float32 from ``AutoencoderKL.encode``.
  Returns:
    (B, h, w, C) float32 unscaled latents.
  """
  noise = jax.random.normal(key, mean.shape, jnp.float32)
  return mean + jnp.exp(0.5 * logvar) * noise
