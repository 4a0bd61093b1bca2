"""The NHWC convolution with a custom VJP whose backward convolutions stay in canonical layout.

``canonical_conv`` has the values of ``lax.conv_general_dilated``; its backward pass is written
so that every convolution has NHWC/HWIO/NHWC dimension numbers, which XLA's CPU backend runs
fast inside a loop body (see ``canonical_conv``). ``layers.conv`` uses it on the CPU backend.
"""

from __future__ import annotations

import functools
from typing import Tuple

import jax
import jax.numpy as jnp


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
