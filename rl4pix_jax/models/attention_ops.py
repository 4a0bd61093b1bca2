"""Attention kernels of the models and the one setting that picks them per layer.

``explicit_attention`` returns the softmax probabilities (for the target-token maps of
``token_attention_maps``); ``fused_attention`` calls ``jax.nn.dot_product_attention`` (XLA or
cuDNN flash attention); ``chunked_attention`` processes one (batch, head) pair and block of
queries at a time, with a hand-written backward pass, so that self-attention over many tokens
fits in memory on CPU; ``pallas_tpu_attention`` runs JAX's Pallas TPU flash-attention kernel
(on a CPU only under ``jax.experimental.pallas.tpu.force_tpu_interpret_mode()``).
``AttentionConfig`` is the models' ``attention`` setting (config key ``model.attention``:
auto | xla | cudnn | pallas_tpu | chunked); ``choose_attention`` resolves it for one layer
shape and ``attention`` runs the chosen kernel. ``layers.Attention`` and
``layers.SpatialSelfAttention`` call ``attention`` for every layer that records no maps.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp


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


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int,
                    upcast: bool = False, implementation: Optional[str] = None) -> jax.Array:
  """Scaled dot-product attention through ``jax.nn.dot_product_attention``.

  Args:
    q: (B, N, heads * d); k, v: (B, L, heads * d).
    heads: number of heads.
    upcast: run in float32 (diffusers' ``upcast_attention``/``upcast_softmax``).
    implementation: None (JAX chooses), 'xla' or 'cudnn' (flash attention; the caller checks
      that cuDNN takes the shape, see ``cudnn_accepts``).
  Returns:
    (B, N, heads * d) in q's original dtype.
  """
  dtype = q.dtype
  qh, kh, vh = (_split_heads(t, heads) for t in (q, k, v))
  if upcast:
    qh, kh, vh = (t.astype(jnp.float32) for t in (qh, kh, vh))
  scale = 1.0 / math.sqrt(qh.shape[-1])
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


# ---- Pallas TPU flash attention -----------------------------------------------------------

# The TPU kernel's key blocks and (above 128) head widths are whole multiples of the 128 lanes.
_TPU_LANES = 128


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def pallas_tpu_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int,
                         block: int, upcast: bool = False) -> jax.Array:
  """Exact softmax attention through JAX's Pallas TPU flash-attention kernel.

  ``jax.experimental.pallas.ops.tpu.flash_attention`` (forward and its own backward kernels):
  no (N, L) score array leaves the kernel's VMEM tiles. The kernel wants sequence lengths that
  are multiples of its blocks and head widths that are whole multiples of 128 lanes, so (as
  maxdiffusion does) queries and keys are zero-padded to a multiple of the block, padded keys
  are masked out through the kernel's segment ids (real tokens segment 1, padding 0), and
  heads are zero-padded to a multiple of 128 (zero q/k columns leave every score unchanged,
  zero v columns give output columns that are dropped); the scale stays 1/sqrt(d) of the
  real width. Runs on a TPU, or on a CPU under
  ``jax.experimental.pallas.tpu.force_tpu_interpret_mode()`` (slow: tests only).
  Reverse-mode differentiable.

  Args:
    q: (B, N, heads * d) queries; k, v: (B, L, heads * d).
    heads: number of heads.
    block: queries and keys per kernel block, a multiple of 128 (a sequence shorter than the
      block uses one block of its length rounded up to 128).
    upcast: run in float32 (diffusers' ``upcast_attention``/``upcast_softmax``).
  Returns:
    (B, N, heads * d) in q's original dtype.
  """
  # pylint: disable-next=import-outside-toplevel
  from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
  if block < _TPU_LANES or block % _TPU_LANES:
    raise ValueError(f"Pallas flash-attention block {block}: must be a positive multiple of "
                     f"{_TPU_LANES}.")
  dtype = q.dtype
  batch, queries = q.shape[:2]
  keys = k.shape[1]
  qh, kh, vh = (jnp.swapaxes(_split_heads(t, heads), 1, 2) for t in (q, k, v))  # (B, h, ., d)
  if upcast:
    qh, kh, vh = (t.astype(jnp.float32) for t in (qh, kh, vh))
  head_dim = qh.shape[-1]
  block_q = min(block, _round_up(queries, _TPU_LANES))
  block_k = min(block, _round_up(keys, _TPU_LANES))
  padded_q, padded_k = _round_up(queries, block_q), _round_up(keys, block_k)
  padded_d = _round_up(head_dim, _TPU_LANES)

  def pad(t, length):
    return jnp.pad(t, ((0, 0), (0, 0), (0, length - t.shape[2]), (0, padded_d - head_dim)))

  segment_ids = None
  if padded_q != queries or padded_k != keys:
    real = lambda length, n: jnp.broadcast_to(
        (jnp.arange(length) < n).astype(jnp.int32), (batch, length))
    segment_ids = tpu_flash.SegmentIds(q=real(padded_q, queries), kv=real(padded_k, keys))
  sizes = tpu_flash.BlockSizes(
      block_q=block_q, block_k_major=block_k, block_k=block_k, block_b=1,
      block_q_major_dkv=block_q, block_k_major_dkv=block_k, block_k_dkv=block_k,
      block_q_dkv=block_q, block_k_major_dq=block_k, block_k_dq=block_k, block_q_dq=block_q)
  out = tpu_flash.flash_attention(pad(qh, padded_q), pad(kh, padded_k), pad(vh, padded_k),
                                  segment_ids=segment_ids, sm_scale=1.0 / math.sqrt(head_dim),
                                  block_sizes=sizes)
  out = jnp.swapaxes(out[:, :, :queries, :head_dim], 1, 2)
  return out.astype(dtype).reshape(batch, queries, -1)


# ---- the one setting ----------------------------------------------------------------------

ATTENTION_KINDS = ("auto", "xla", "cudnn", "pallas_tpu", "chunked")
# What ``choose_attention`` returns: the kernel one layer runs.
ATTENTION_PATHS = ("xla", "cudnn", "pallas_tpu", "chunked")
_PLATFORMS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """The models' attention setting (run config: ``model.attention`` and its three numbers).

  ``kind``:
    'auto': per backend and layer shape (``choose_attention``): on TPU the Pallas flash
      kernel for self-attention over >= ``flash_min_tokens`` tokens, XLA otherwise; on GPU
      cuDNN flash attention where cuDNN takes the shape (``cudnn_accepts``), XLA otherwise
      (CLIP's 77-token cross-attention); on CPU the blocked path for more than
      ``chunk_queries`` queries, XLA for fewer (one block would hold the whole layer); XLA
      elsewhere.
    'xla': ``jax.nn.dot_product_attention(implementation='xla')`` (materialises the scores).
    'cudnn': cuDNN flash attention where cuDNN takes the shape, XLA elsewhere.
    'pallas_tpu': the Pallas TPU kernel in every layer (on a CPU only in interpret mode).
    'chunked': ``chunked_attention`` in every layer.
  Layers that record attention maps compute explicit probabilities whatever the kind.

  Attributes:
    kind: one of ``ATTENTION_KINDS``.
    flash_min_tokens: 'auto' on TPU: shortest self-attention (queries) for the Pallas kernel.
    chunk_queries: queries per block of ``chunked_attention`` ('auto' on CPU, 'chunked').
    flash_block: queries/keys per block of ``pallas_tpu_attention`` (a multiple of 128).
    platform: the backend 'auto' decides for ('cpu', 'gpu'/'cuda', 'tpu'); None:
      ``jax.default_backend()`` when the model is traced. Set it to lower for another
      platform than the one present (``jax.jit(...).trace(...).lower(lowering_platforms=)``).
  """
  kind: str = "xla"
  flash_min_tokens: Optional[int] = None
  chunk_queries: Optional[int] = None
  flash_block: Optional[int] = None
  platform: Optional[str] = None

  def __post_init__(self):
    if self.kind not in ATTENTION_KINDS:
      raise ValueError(f"attention {self.kind!r}: must be one of {', '.join(ATTENTION_KINDS)}.")
    needs = {"auto": ("flash_min_tokens", "chunk_queries", "flash_block"),
             "chunked": ("chunk_queries",), "pallas_tpu": ("flash_block",)}
    for name in needs.get(self.kind, ()):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"attention {self.kind!r} needs a positive integer {name}, got "
                         f"{value!r}.")
    if self.flash_block is not None and self.flash_block % _TPU_LANES:
      raise ValueError(f"attention flash_block {self.flash_block}: must be a multiple of "
                       f"{_TPU_LANES}.")
    if self.platform is not None and self.platform not in _PLATFORMS:
      raise ValueError(f"attention platform {self.platform!r}: must be one of "
                       f"{', '.join(_PLATFORMS)} (or None: the default backend).")


def cudnn_max_head_dim(platform: str) -> int:
  """The widest head cuDNN flash attention takes: 256 on Hopper or later, else 128.

  (jax's ``check_is_flash_attention``.) Without a GPU device to ask (lowering for 'gpu'
  elsewhere) the conservative 128.
  """
  if platform != "gpu":
    return 128
  try:
    device = jax.devices("gpu")[0]
    major, minor = (int(x) for x in device.compute_capability.split(".")[:2])
  except (RuntimeError, AttributeError, ValueError):
    return 128
  return 256 if (major, minor) >= (9, 0) else 128


def cudnn_accepts(keys: int, head_dim: int, dtype, max_head_dim: int = 128) -> bool:
  """Whether cuDNN flash attention takes a layer: bfloat16/float16, an even number of keys
  (cuDNN refused CLIP's 77 text tokens on an H100, jax 0.11.2), head width a multiple of 8
  and at most ``max_head_dim`` (see ``cudnn_max_head_dim``)."""
  return (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and keys % 2 == 0
          and head_dim % 8 == 0 and head_dim <= max_head_dim)


def choose_attention(config: AttentionConfig, queries: int, keys: int, head_dim: int, dtype,
                     self_attention: bool) -> str:
  """The kernel (one of ``ATTENTION_PATHS``) a layer of this shape runs under ``config``.

  Args:
    config: the setting.
    queries, keys: N and L of the layer.
    head_dim: head width d.
    dtype: the dtype the attention computes in (after any float32 upcast).
    self_attention: keys are the queries' own tokens (not the text).
  """
  platform = _PLATFORMS.get(config.platform or jax.default_backend())  # None: another one
  if config.kind == "cudnn" or (config.kind == "auto" and platform == "gpu"):
    accepted = cudnn_accepts(keys, head_dim, dtype, cudnn_max_head_dim(platform))
    return "cudnn" if accepted else "xla"
  if config.kind != "auto":
    return config.kind
  if platform == "tpu":
    return "pallas_tpu" if self_attention and queries >= config.flash_min_tokens else "xla"
  if platform == "cpu":  # blocks where they split the queries; the default's 64-token layers: XLA
    return "chunked" if queries > config.chunk_queries else "xla"
  return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, config: AttentionConfig,
              upcast: bool = False, self_attention: bool = True) -> jax.Array:
  """Softmax attention through the kernel ``choose_attention`` picks for this shape.

  Args:
    q: (B, N, heads * d) queries; k, v: (B, L, heads * d).
    heads: number of heads.
    config: the setting.
    upcast: run in float32 (diffusers' ``upcast_attention``/``upcast_softmax``).
    self_attention: see ``choose_attention``.
  Returns:
    (B, N, heads * d) in q's dtype.
  """
  head_dim = q.shape[-1] // heads
  dtype = jnp.float32 if upcast else q.dtype
  path = choose_attention(config, q.shape[1], k.shape[1], head_dim, dtype, self_attention)
  if path == "chunked":
    return chunked_attention(q, k, v, heads, config.chunk_queries, upcast)
  if path == "pallas_tpu":
    return pallas_tpu_attention(q, k, v, heads, config.flash_block, upcast)
  return fused_attention(q, k, v, heads, upcast, path)
