"""Attention kernels of the models: explicit (with probabilities), fused, and chunked (custom VJP).

``explicit_attention`` returns the softmax probabilities (for the target-token maps of
``token_attention_maps``); ``fused_attention`` calls ``jax.nn.dot_product_attention``;
``chunked_attention`` processes one (batch, head) pair and block of queries at a time, with a
hand-written backward pass, so that self-attention over many tokens fits in memory on CPU.
``layers.Attention`` chooses between them.
"""

from __future__ import annotations

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
