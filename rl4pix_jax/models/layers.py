"""Layers shared by the Flax UNet and VAE: embeddings, resnet blocks, resampling, attention.

Everything is NHWC. Parameters are float32 (``param_dtype``); ``dtype`` is the compute dtype.
Submodule names follow the PyTorch diffusers attribute names, with list indices written as
``<name>_<i>`` (``resnets_0``, ``to_out_0``), so that ``rl4pix_jax.weights.diffusers_models``
can map a Flax parameter path to its diffusers state-dict key by name alone.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

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


_NHWC_HWIO = ("NHWC", "HWIO", "NHWC")


def _conv_nhwc(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC_HWIO)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def canonical_conv(x: jax.Array, w: jax.Array, strides: Tuple[int, int],
                   padding: Tuple[Tuple[int, int], Tuple[int, int]]) -> jax.Array:
  """NHWC x HWIO convolution whose gradients are convolutions in that same layout.

  The forward is ``lax.conv_general_dilated``. The backward writes the input gradient as a
  convolution of the (stride-dilated) output gradient with the flipped, in/out-swapped kernel,
  and the kernel gradient as a convolution with batch and channels swapped (explicit
  transposes), so every convolution of the backward pass has NHWC/HWIO/NHWC dimension
  numbers. Why: XLA's CPU backend rewrites non-canonical convolutions into that fast form
  only in the entry computation; the ones autodiff produces inside a loop body (the PPO
  step's ``lax.scan`` over timesteps) ran through a generic loop there, ~5x slower
  (benchmarks/README.md). Same values as autodiff up to float rounding.

  Args:
    x: (B, H, W, Cin); w: (kh, kw, Cin, Cout); strides: (sh, sw);
    padding: ((top, bottom), (left, right)).
  Returns:
    (B, Ho, Wo, Cout).
  """
  return _conv_nhwc(x, w, strides, padding)


def _canonical_conv_fwd(x, w, strides, padding):
  return _conv_nhwc(x, w, strides, padding), (x, w)


def _canonical_conv_bwd(strides, padding, residuals, dy):
  x, w = residuals
  sizes, kernel, out = x.shape[1:3], w.shape[:2], dy.shape[1:3]
  input_pads, kernel_pads = [], []
  for size, k, s, (low, _), o in zip(sizes, kernel, strides, padding, out):
    dilated = (o - 1) * s + 1  # the output gradient with stride - 1 zeros between entries
    input_pads.append((k - 1 - low, size - dilated + low))
    kernel_pads.append((low, k - 1 + dilated - size - low))
  flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)  # (kh, kw, Cout, Cin)
  dx = jax.lax.conv_general_dilated(dy, flipped, (1, 1), input_pads, lhs_dilation=strides,
                                    dimension_numbers=_NHWC_HWIO)
  # dW[a, b, i, o] = sum_{n, y, x} x_pad[n, s*y + a, s*x + b, i] dy[n, y, x, o]: a
  # convolution over (y, x) with the channels as batch and the batch as features.
  dw = jax.lax.conv_general_dilated(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3),
                                    (1, 1), kernel_pads, rhs_dilation=strides,
                                    dimension_numbers=_NHWC_HWIO)  # (Cin, kh, kw, Cout)
  return dx.astype(x.dtype), dw.transpose(1, 2, 0, 3).astype(w.dtype)


canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def canonical_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                   rhs_dilation=None, dimension_numbers=None,
                                   feature_group_count=1, batch_group_count=1,
                                   precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated``'s signature (flax ``nn.Conv(conv_general_dilated=)``):
  :func:`canonical_conv` for plain NHWC/HWIO convolutions with explicit padding, the lax
  function for anything else."""
  plain = (lhs.ndim == 4 and dimension_numbers is not None and not isinstance(padding, str)
           and feature_group_count == 1 and batch_group_count == 1 and precision is None
           and preferred_element_type is None
           and all(d == 1 for d in (lhs_dilation or (1,)))
           and all(d == 1 for d in (rhs_dilation or (1,)))
           and (jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC_HWIO)))
  if not plain:
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type)
  return canonical_conv(lhs, rhs, tuple(window_strides),
                        tuple(tuple(int(v) for v in pair) for pair in padding))


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


def token_attention_maps(
    probs: jax.Array,
    token_index: jax.Array,
    token_mask: Optional[jax.Array],
    spatial_shape: Tuple[int, int],
) -> jax.Array:
  """Selects token columns of attention probabilities and averages them over heads.

  Args:
    probs: (B, heads, N, L) float32 softmax probabilities, N = h * w queries.
    token_index: (B, K) int32 key positions to keep.
    token_mask: (B, K) bool, or None for all True; masked-out tokens give zero maps.
    spatial_shape: (h, w) with h * w == N.
  Returns:
    (B, h, w, K) float32.
  """
  batch, _, queries, _ = probs.shape
  index = token_index.astype(jnp.int32)[:, None, None, :]
  picked = jnp.take_along_axis(probs, index, axis=-1).mean(axis=1)  # (B, N, K)
  if token_mask is not None:
    picked = picked * token_mask.astype(picked.dtype)[:, None, :]
  h, w = spatial_shape
  if h * w != queries:
    raise ValueError(f"spatial_shape {spatial_shape} does not match {queries} query positions.")
  return picked.reshape(batch, h, w, token_index.shape[-1]).astype(jnp.float32)


def _split_heads(t: jax.Array, heads: int) -> jax.Array:
  return t.reshape(t.shape[:2] + (heads, t.shape[-1] // heads))


def explicit_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                       heads: int) -> Tuple[jax.Array, jax.Array]:
  """Scaled dot-product attention with the probabilities materialised (float32 softmax).

  Args:
    q: (B, N, heads * d) queries; k, v: (B, L, heads * d).
    heads: number of heads.
  Returns:
    (out (B, N, heads * d) in v's dtype, probs (B, heads, N, L) float32).
  """
  qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
  scale = 1.0 / math.sqrt(qh.shape[-1])
  scores = jnp.einsum("bnhd,blhd->bhnl", qh.astype(jnp.float32), kh.astype(jnp.float32))
  probs = jax.nn.softmax(scores * scale, axis=-1)
  out = jnp.einsum("bhnl,blhd->bnhd", probs.astype(v.dtype), vh)
  return out.reshape(q.shape[:2] + (-1,)), probs


def attention_implementation_for(implementation: Optional[str], key_length: int,
                                  dtype) -> Optional[str]:
  """The ``jax.nn.dot_product_attention`` implementation one layer uses.

  'cudnn' (flash attention) takes bfloat16/float16 inputs with an even number of keys
  (cuDNN refuses odd ones, e.g. CLIP's 77 text tokens, seen on an H100 with jax 0.11.2);
  layers outside that (the cross-attention, float32 upcast layers) use XLA's attention, so a
  UNet built with 'cudnn' runs its self-attention on cuDNN and the rest on XLA. Other
  values pass through.
  """
  if implementation == "cudnn" and (key_length % 2 or
                                    jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16)):
    return "xla"
  return implementation


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int,
                    upcast: bool = False, implementation: Optional[str] = None) -> jax.Array:
  """Scaled dot-product attention through ``jax.nn.dot_product_attention``.

  Args:
    q: (B, N, heads * d); k, v: (B, L, heads * d).
    heads: number of heads.
    upcast: run in float32 (diffusers' ``upcast_attention``/``upcast_softmax``).
    implementation: None, 'xla' or 'cudnn' (see ``attention_implementation_for``).
  Returns:
    (B, N, heads * d) in q's original dtype.
  """
  dtype = q.dtype
  qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
  if upcast:
    qh, kh, vh = (t.astype(jnp.float32) for t in (qh, kh, vh))
  scale = 1.0 / math.sqrt(qh.shape[-1])
  implementation = attention_implementation_for(implementation, kh.shape[1], qh.dtype)
  out = jax.nn.dot_product_attention(qh, kh, vh, scale=scale, implementation=implementation)
  return out.astype(dtype).reshape(q.shape[:2] + (-1,))


def _attention_block_forward(q_block: jax.Array, keys_t: jax.Array, values_t: jax.Array,
                             scale: float) -> Tuple[jax.Array, jax.Array]:
  """One block of queries of one (batch, head) pair against all its keys.

  q_block: (c, d); keys_t, values_t: (d, L). Returns (out (c, d) in values' dtype,
  log-sum-exp of the scaled scores (c, 1) float32).
  """
  scores = jnp.dot(q_block, keys_t, preferred_element_type=jnp.float32) * scale
  # The softmax does not depend on the subtracted maximum.
  peak = jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))
  shifted = jnp.exp(scores - peak)
  total = jnp.sum(shifted, axis=-1, keepdims=True)
  out = jnp.einsum("nl,dl->nd", shifted.astype(values_t.dtype), values_t,
                   preferred_element_type=jnp.float32) / total
  return out.astype(values_t.dtype), peak + jnp.log(total)


def _pair_forward(q_blocks, keys_t, values_t, scale):
  """All query blocks (blocks, c, d) of one pair, one after the other."""
  return jax.lax.map(lambda q_block: _attention_block_forward(q_block, keys_t, values_t, scale),
                     q_blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_attention(q_blocks: jax.Array, keys_t: jax.Array, values_t: jax.Array,
                       scale: float) -> jax.Array:
  """Attention of every (batch, head) pair, one pair and one query block at a time.

  q_blocks: (pairs, blocks, c, d); keys_t, values_t: (pairs, d, L).
  Returns (pairs, blocks, c, d). The backward pass recomputes each block's probabilities.
  """
  return jax.lax.map(lambda pair: _pair_forward(*pair, scale)[0], (q_blocks, keys_t, values_t))


def _blocked_attention_fwd(q_blocks, keys_t, values_t, scale):
  out, log_sum = jax.lax.map(lambda pair: _pair_forward(*pair, scale),
                             (q_blocks, keys_t, values_t))
  return out, (q_blocks, keys_t, values_t, out, log_sum)


def _pair_backward(scale, pair):
  """The softmax-attention gradient of one pair from recomputed probabilities.

  A scan over the pair's query blocks accumulates the key and value gradients in (d, L)
  layout (an (L, d) result with d as small as 4 is several times slower on XLA's CPU backend).
  """
  q_blocks, keys_t, values_t, out, log_sum, d_out = pair
  f32 = jnp.float32
  keys = jnp.swapaxes(keys_t, -1, -2).astype(f32)  # (L, d)

  def step(carry, block):
    d_keys_t, d_values_t = carry
    q_block, out_block, log_sum_block, d_out_block = block
    scores = jnp.dot(q_block, keys_t, preferred_element_type=f32) * scale
    probs = jnp.exp(scores - log_sum_block)  # (c, L)
    d_out_block = d_out_block.astype(f32)
    d_values_t = d_values_t + jnp.dot(d_out_block.T, probs)
    d_probs = jnp.dot(d_out_block, values_t, preferred_element_type=f32)
    row = jnp.sum(d_out_block * out_block.astype(f32), axis=-1, keepdims=True)
    d_scores = probs * (d_probs - row) * scale
    d_keys_t = d_keys_t + jnp.dot(q_block.astype(f32).T, d_scores)
    d_q = jnp.dot(d_scores, keys)
    return (d_keys_t, d_values_t), d_q.astype(q_block.dtype)

  zeros = jnp.zeros(keys_t.shape, f32)
  (d_keys_t, d_values_t), d_q = jax.lax.scan(step, (zeros, zeros),
                                              (q_blocks, out, log_sum, d_out))
  return d_q, d_keys_t.astype(keys_t.dtype), d_values_t.astype(values_t.dtype)


def _blocked_attention_bwd(scale, residuals, d_out):
  return jax.lax.map(functools.partial(_pair_backward, scale), residuals + (d_out,))


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, query_chunk: int,
                      upcast: bool = False) -> jax.Array:
  """Exact softmax attention, one (batch, head) pair and ``query_chunk`` queries at a time.

  The same function as ``fused_attention``, evaluated differently: ``lax.map`` runs over the
  B * heads (batch, head) pairs, and within a pair over blocks of at most ``query_chunk``
  queries, so only one (query_chunk, L) block of scores exists at any time instead of all
  (B, heads, N, L). Every block sees all L keys, so its softmax is the ordinary one (no
  online rescaling): a float32 max-subtracted ``exp``, ``exp @ v``, then division by the row
  sums (normalising the (chunk, d) output instead of the (chunk, L) probabilities). The
  backward pass (a custom VJP over the same loops) recomputes each block's probabilities
  from its log-sum-exp, so neither pass stores the probabilities. Every product is a plain
  2-D matmul: on XLA's CPU backend batched matmuls of many small (batch, head) matrices
  were 2-3x slower than this loop (benchmarks/README.md, "Profile"). Results equal
  ``fused_attention`` up to float rounding (~1e-6 relative in float32). Reverse-mode
  differentiable (``jax.grad``/``jax.vjp``), not forward-mode (``jax.jvp``).

  Args:
    q: (B, N, heads * d) queries; k, v: (B, L, heads * d).
    heads: number of heads.
    query_chunk: at most this many queries per block (N need not be a multiple: the last
      block is padded; query_chunk >= N: one block per pair).
    upcast: run in float32 (diffusers' ``upcast_attention``/``upcast_softmax``).
  Returns:
    (B, N, heads * d) in q's original dtype.
  """
  dtype = q.dtype
  batch, queries = q.shape[:2]
  keys = k.shape[1]
  qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
  if upcast:
    qh, kh, vh = (t.astype(jnp.float32) for t in (qh, kh, vh))
  head_dim = qh.shape[-1]
  pairs = batch * heads
  scale = 1.0 / math.sqrt(head_dim)
  keys_t = jnp.transpose(kh, (0, 2, 3, 1)).reshape(pairs, head_dim, keys)
  values_t = jnp.transpose(vh, (0, 2, 3, 1)).reshape(pairs, head_dim, keys)
  q_pairs = jnp.transpose(qh, (0, 2, 1, 3)).reshape(pairs, queries, head_dim)
  chunk = max(1, min(int(query_chunk), queries))
  blocks = -(-queries // chunk)
  padded = jnp.pad(q_pairs, ((0, 0), (0, blocks * chunk - queries), (0, 0)))
  out = _blocked_attention(padded.reshape(pairs, blocks, chunk, head_dim), keys_t, values_t,
                           scale)
  out = out.reshape(batch, heads, blocks * chunk, head_dim)[:, :, :queries]
  return jnp.transpose(out, (0, 2, 1, 3)).astype(dtype).reshape(q.shape[:2] + (-1,))


class Attention(nn.Module):
  """Multi-head (cross-)attention with diffusers' ``to_q/to_k/to_v/to_out.0`` projections.

  When ``capture`` is true and ``token_index`` is given, the probabilities are computed
  explicitly (float32 softmax) and the head-averaged maps of the chosen tokens are sown into
  the ``'attention_maps'`` collection under ``'probs'`` with shape (B, h, w, K). Otherwise
  ``jax.nn.dot_product_attention`` does the work and nothing is sown, or, with
  ``query_chunk`` set, ``chunked_attention`` (the same function, one (batch, head) pair and
  block of queries at a time).

  Attributes:
    heads: number of heads.
    head_dim: width of each head.
    out_features: output width (the query width).
    qkv_bias: biases on to_q/to_k/to_v (False in the UNet, True in the VAE).
    upcast: compute q k^T and the softmax in float32 (``upcast_attention``).
    implementation: passed to ``jax.nn.dot_product_attention`` (None, 'xla' or 'cudnn').
    query_chunk: None (off): ``jax.nn.dot_product_attention``; an int: ``chunked_attention``
      with at most that many queries per block (a CPU option; on accelerators use the fused
      path).
    dtype: compute dtype.
  """
  heads: int
  head_dim: int
  out_features: int
  qkv_bias: bool = False
  upcast: bool = False
  implementation: Optional[str] = None
  query_chunk: Optional[int] = None
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
    context = x if context is None else context
    inner = self.heads * self.head_dim
    q = dense(inner, self.dtype, "to_q", self.qkv_bias)(x)
    k = dense(inner, self.dtype, "to_k", self.qkv_bias)(context)
    v = dense(inner, self.dtype, "to_v", self.qkv_bias)(context)
    if capture and token_index is not None:
      out, probs = explicit_attention(q, k, v, self.heads)
      self.sow(ATTENTION_MAPS_COLLECTION, "probs",
               token_attention_maps(probs, token_index, token_mask, spatial_shape))
    elif self.query_chunk:
      out = chunked_attention(q, k, v, self.heads, self.query_chunk, self.upcast)
    else:
      out = fused_attention(q, k, v, self.heads, self.upcast, self.implementation)
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
    implementation: ``jax.nn.dot_product_attention`` implementation.
    dtype: compute dtype.
    query_chunk: see ``Attention`` (None: off).
  """
  heads: int
  head_dim: int
  only_cross_attention: bool = False
  upcast: bool = False
  implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  query_chunk: Optional[int] = None

  @nn.compact
  def __call__(self, x, context, capture=False, token_index=None, token_mask=None,
               spatial_shape=None):
    """x: (B, N, C); context: (B, L, D) -> (B, N, C). Only attn2 captures maps."""
    dim = x.shape[-1]
    attn = lambda name: Attention(self.heads, self.head_dim, dim, upcast=self.upcast,
                                  implementation=self.implementation,
                                  query_chunk=self.query_chunk, dtype=self.dtype, name=name)
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
    implementation: ``jax.nn.dot_product_attention`` implementation.
    dtype: compute dtype.
    query_chunk: see ``Attention`` (None: off).
  """
  heads: int
  head_dim: int
  num_layers: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  upcast: bool = False
  capture_size: Optional[int] = None
  implementation: Optional[str] = None
  dtype: Dtype = jnp.float32
  query_chunk: Optional[int] = None

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
          self.implementation, self.dtype, self.query_chunk, name=f"transformer_blocks_{i}")(
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
  """
  head_dim: int
  groups: int
  eps: float = 1e-6
  rescale_output_factor: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H, W, C)."""
    batch, height, width, channels = x.shape
    h = group_norm(self.groups, self.eps, self.dtype, "group_norm")(x)
    h = h.reshape(batch, height * width, channels)
    q = dense(channels, self.dtype, "to_q")(h)
    k = dense(channels, self.dtype, "to_k")(h)
    v = dense(channels, self.dtype, "to_v")(h)
    h = fused_attention(q, k, v, channels // self.head_dim, upcast=True)
    h = dense(channels, self.dtype, "to_out_0")(h)
    h = h.reshape(batch, height, width, channels)
    return (h + x.astype(h.dtype)) / self.rescale_output_factor
