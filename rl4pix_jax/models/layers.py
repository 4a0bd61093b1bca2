"""Layers shared by the Flax UNet and VAE: embeddings, resnet blocks, resampling, attention.

The modules only; the custom-VJP kernels they call are in ``conv_ops`` (the CPU convolution)
and ``attention_ops`` (explicit, XLA/cuDNN, chunked and Pallas TPU attention, the setting
that picks one per layer, target-token maps).

Everything is NHWC. Parameters are float32 (``param_dtype``); ``dtype`` is the compute dtype.
Submodule names follow the PyTorch diffusers attribute names, with list indices written as
``<name>_<i>`` (``resnets_0``, ``to_out_0``), so that ``rl4pix_jax.weights.diffusers_models``
can map a Flax parameter path to its diffusers state-dict key by name alone.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from rl4pix_jax.models.attention_ops import (AttentionConfig, attention, explicit_attention,
                                             token_attention_maps)
from rl4pix_jax.models.conv_ops import canonical_conv_general_dilated

Dtype = Any

SUPPORTED_ACTIVATIONS = ("silu", "swish")
ATTENTION_MAPS_COLLECTION = "attention_maps"


def activation(name: str):
  """Returns the activation function called ``name`` (diffusers' ``act_fn`` names).

  Raises:
    ValueError: for a name other than ``silu``/``swish``.
  """
  if name in SUPPORTED_ACTIVATIONS:
    return nn.silu
  raise ValueError(f"act_fn={name!r} is not supported; expected one of {SUPPORTED_ACTIVATIONS}.")


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    flip_sin_to_cos: bool,
    freq_shift: float,
    max_period: float = 10000.0,
) -> jax.Array:
  """Sinusoidal timestep embedding, as diffusers' ``get_timestep_embedding``.

  Frequencies are ``exp(-log(max_period) * i / (dim // 2 - freq_shift))`` for
  ``i < dim // 2``; the embedding is ``[sin, cos]`` (``[cos, sin]`` when ``flip_sin_to_cos``),
  zero-padded by one column when ``dim`` is odd.

  Args:
    timesteps: (B,) int or float timestep values (diffusers' integer scale, e.g. 0..999).
    dim: embedding width.
    flip_sin_to_cos: put the cosines first.
    freq_shift: ``downscale_freq_shift``.
    max_period: the longest period.
  Returns:
    (B, dim) float32.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def group_norm(groups: int, eps: float, dtype: Dtype, name: str) -> nn.GroupNorm:
  """A GroupNorm over the channel (last) axis with the two-pass variance (PyTorch-exact)."""
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                      use_fast_variance=False, name=name)


def conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1,
         padding: Any = None) -> nn.Conv:
  """A 2-D convolution with PyTorch's symmetric ``(kernel - 1) // 2`` padding by default.

  On the CPU backend it differentiates through :func:`canonical_conv` (same values, a
  backward pass that XLA's CPU backend runs fast inside loops); elsewhere plain autodiff.
  """
  if padding is None:
    pad = (kernel - 1) // 2
    padding = ((pad, pad), (pad, pad))
  custom = canonical_conv_general_dilated if jax.default_backend() == "cpu" else None
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=jnp.float32, name=name,
                 conv_general_dilated=custom)


def dense(features: int, dtype: Dtype, name: str, use_bias: bool = True) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


class TimestepEmbedding(nn.Module):
  """Two-layer MLP on the sinusoidal embedding: ``linear_2(act(linear_1(x)))``.

  Attributes:
    features: output width (``time_embed_dim``, 4 x block_out_channels[0] in SD).
    act_fn: activation name.
    dtype: compute dtype.
  """
  features: int
  act_fn: str = "silu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, D) -> (B, features) in ``dtype``."""
    x = dense(self.features, self.dtype, "linear_1")(x)
    x = activation(self.act_fn)(x)
    return dense(self.features, self.dtype, "linear_2")(x)


class ResnetBlock2D(nn.Module):
  """diffusers' ResnetBlock2D with ``time_embedding_norm='default'`` and no up/down sampling.

  ``out = (shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))) + proj(act(temb)))))) / scale``.

  Attributes:
    out_channels: output channels.
    groups: GroupNorm groups.
    eps: GroupNorm epsilon.
    output_scale_factor: the final divisor.
    act_fn: activation name.
    dtype: compute dtype.
  """
  out_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  act_fn: str = "silu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
    """x: (B, H, W, C_in); temb: (B, T) or None (VAE) -> (B, H, W, out_channels)."""
    act = activation(self.act_fn)
    h = act(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
    h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
    if temb is not None:
      t = dense(self.out_channels, self.dtype, "time_emb_proj")(act(temb))
      h = h + t[:, None, None, :]
    h = act(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
    h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
    return (x.astype(h.dtype) + h) / self.output_scale_factor


class Downsample2D(nn.Module):
  """Stride-2 3x3 convolution; ``padding=0`` pads one row/column at the bottom/right first.

  Attributes:
    out_channels: output channels.
    padding: symmetric padding of the convolution (1 in the UNet, 0 in the VAE).
    dtype: compute dtype.
  """
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), out_channels)."""
    if self.padding == 0:
      pads = ((0, 1), (0, 1))
    else:
      pads = ((self.padding, self.padding), (self.padding, self.padding))
    return conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=pads)(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour x2 upsampling followed by a 3x3 convolution.

  Attributes:
    out_channels: output channels.
    dtype: compute dtype.
  """
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, 2H, 2W, out_channels)."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(self.out_channels, 3, self.dtype, "conv")(x)


class Attention(nn.Module):
  """Multi-head (cross-)attention with diffusers' ``to_q/to_k/to_v/to_out.0`` projections.

  When ``capture`` is true and ``token_index`` is given, the probabilities are computed
  explicitly (float32 softmax) and the head-averaged maps of the chosen tokens are sown into
  the ``'attention_maps'`` collection under ``'probs'`` with shape (B, h, w, K), whatever
  ``attention`` says. Otherwise ``attention_ops.attention`` runs the kernel that
  ``attention`` picks for this layer's shape (XLA, cuDNN, Pallas TPU or chunked: the same
  function up to float rounding) and nothing is sown.

  Attributes:
    heads: number of heads.
    head_dim: width of each head.
    out_features: output width (the query width).
    qkv_bias: biases on to_q/to_k/to_v (False in the UNet, True in the VAE).
    upcast: compute q k^T and the softmax in float32 (``upcast_attention``).
    attention: the kernel setting (``attention_ops.AttentionConfig``; default XLA's).
    dtype: compute dtype.
  """
  heads: int
  head_dim: int
  out_features: int
  qkv_bias: bool = False
  upcast: bool = False
  attention: AttentionConfig = AttentionConfig()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      context: Optional[jax.Array] = None,
      capture: bool = False,
      token_index: Optional[jax.Array] = None,
      token_mask: Optional[jax.Array] = None,
      spatial_shape: Optional[Tuple[int, int]] = None,
  ) -> jax.Array:
    """x: (B, N, C) queries; context: (B, L, D) keys/values or None (self-attention).

    Returns:
      (B, N, out_features) in ``dtype``.
    """
    self_attention = context is None
    context = x if context is None else context
    inner = self.heads * self.head_dim
    q = dense(inner, self.dtype, "to_q", self.qkv_bias)(x)
    k = dense(inner, self.dtype, "to_k", self.qkv_bias)(context)
    v = dense(inner, self.dtype, "to_v", self.qkv_bias)(context)
    if capture and token_index is not None:
      out, probs = explicit_attention(q, k, v, self.heads)
      self.sow(ATTENTION_MAPS_COLLECTION, "probs",
               token_attention_maps(probs, token_index, token_mask, spatial_shape))
    else:
      out = attention(q, k, v, self.heads, self.attention, self.upcast, self_attention)
    return dense(self.out_features, self.dtype, "to_out_0")(out.astype(self.dtype))


class FeedForward(nn.Module):
  """GEGLU feed-forward: ``net_2(a * gelu(b))`` with ``[a, b] = net_0.proj(x)``.

  Attributes:
    features: input/output width.
    mult: hidden width multiplier (4 in SD).
    dtype: compute dtype.
  """
  features: int
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, N, features) -> (B, N, features)."""
    hidden = self.features * self.mult
    proj = GEGLU(hidden, self.dtype, name="net_0")(x)
    return dense(self.features, self.dtype, "net_2")(proj)


class GEGLU(nn.Module):
  """``a * gelu(b)`` (exact erf GELU) with ``[a, b] = proj(x)`` split along channels."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    a, b = jnp.split(dense(2 * self.features, self.dtype, "proj")(x), 2, axis=-1)
    return a * nn.gelu(b, approximate=False)


class BasicTransformerBlock(nn.Module):
  """Self-attention, cross-attention and GEGLU feed-forward, each pre-LayerNorm + residual.

  Attributes:
    heads: attention heads.
    head_dim: head width.
    only_cross_attention: ``attn1`` attends to the text too (diffusers' flag).
    upcast: float32 attention scores.
    attention: the kernel setting (see ``Attention``).
    dtype: compute dtype.
  """
  heads: int
  head_dim: int
  only_cross_attention: bool = False
  upcast: bool = False
  attention: AttentionConfig = AttentionConfig()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, capture=False, token_index=None, token_mask=None,
               spatial_shape=None):
    """x: (B, N, C); context: (B, L, D) -> (B, N, C). Only attn2 captures maps."""
    dim = x.shape[-1]
    attn = lambda name: Attention(self.heads, self.head_dim, dim, upcast=self.upcast,
                                  attention=self.attention, dtype=self.dtype, name=name)
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32,
                                     use_fast_variance=False, name=name)
    self_context = context if self.only_cross_attention else None
    x = attn("attn1")(norm("norm1")(x), self_context) + x
    x = attn("attn2")(norm("norm2")(x), context, capture, token_index, token_mask,
                      spatial_shape) + x
    return FeedForward(dim, dtype=self.dtype, name="ff")(norm("norm3")(x)) + x


class Transformer2D(nn.Module):
  """diffusers' Transformer2DModel for continuous (B, H, W, C) inputs.

  Attributes:
    heads: attention heads.
    head_dim: head width (channels // heads).
    num_layers: transformer blocks.
    groups: GroupNorm groups (epsilon 1e-6 as in diffusers).
    use_linear_projection: Dense proj_in/proj_out instead of 1x1 convolutions.
    only_cross_attention: see BasicTransformerBlock.
    upcast: float32 attention scores.
    capture_size: spatial side whose cross-attention maps are captured (None: all sides).
    attention: the kernel setting (see ``Attention``).
    dtype: compute dtype.
  """
  heads: int
  head_dim: int
  num_layers: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  upcast: bool = False
  capture_size: Optional[int] = None
  attention: AttentionConfig = AttentionConfig()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context, token_index=None, token_mask=None):
    """x: (B, H, W, C); context: (B, L, D) -> (B, H, W, C)."""
    batch, height, width, channels = x.shape
    inner = self.heads * self.head_dim
    residual = x
    h = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
    if self.use_linear_projection:
      h = dense(inner, self.dtype, "proj_in")(h.reshape(batch, height * width, channels))
    else:
      h = conv(inner, 1, self.dtype, "proj_in")(h).reshape(batch, height * width, inner)
    capture = token_index is not None and (
        self.capture_size is None or height == self.capture_size)
    for i in range(self.num_layers):
      h = BasicTransformerBlock(
          self.heads, self.head_dim, self.only_cross_attention, self.upcast,
          self.attention, self.dtype, name=f"transformer_blocks_{i}")(
              h, context, capture, token_index, token_mask, (height, width))
    if self.use_linear_projection:
      h = dense(channels, self.dtype, "proj_out")(h).reshape(batch, height, width, channels)
    else:
      h = conv(channels, 1, self.dtype, "proj_out")(h.reshape(batch, height, width, inner))
    return h + residual.astype(h.dtype)


class SpatialSelfAttention(nn.Module):
  """The VAE mid-block attention: GroupNorm, biased q/k/v, residual, ``/ rescale``.

  Attributes:
    head_dim: head width (diffusers gives the VAE one head of all channels).
    groups: GroupNorm groups.
    eps: GroupNorm epsilon.
    rescale_output_factor: final divisor.
    dtype: compute dtype.
    attention: the kernel setting (``attention_ops.AttentionConfig``; default XLA's). The
      attention always runs in float32 (diffusers upcasts the VAE's).
  """
  head_dim: int
  groups: int
  eps: float = 1e-6
  rescale_output_factor: float = 1.0
  dtype: Dtype = jnp.float32
  attention: AttentionConfig = AttentionConfig()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H, W, C)."""
    batch, height, width, channels = x.shape
    h = group_norm(self.groups, self.eps, self.dtype, "group_norm")(x)
    h = h.reshape(batch, height * width, channels)
    q = dense(channels, self.dtype, "to_q")(h)
    k = dense(channels, self.dtype, "to_k")(h)
    v = dense(channels, self.dtype, "to_v")(h)
    h = attention(q, k, v, channels // self.head_dim, self.attention, upcast=True)
    h = dense(channels, self.dtype, "to_out_0")(h)
    h = h.reshape(batch, height, width, channels)
    return (h + x.astype(h.dtype)) / self.rescale_output_factor
