"""conv_ops.canonical_conv: same values and gradients as autodiff of lax.conv_general_dilated,
and a backward pass whose convolutions all have the canonical NHWC/HWIO/NHWC form inside a
``lax.scan`` (what makes the PPO step fast on XLA's CPU backend). No timing here."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl4pix_jax.models import conv_ops, layers

DIMS = ("NHWC", "HWIO", "NHWC")


def _reference(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DIMS)


@pytest.mark.parametrize("size,kernel,stride,padding,channels", [
    (8, 3, 1, ((1, 1), (1, 1)), (4, 6)),
    (16, 3, 2, ((1, 1), (1, 1)), (4, 6)),
    (15, 3, 2, ((1, 1), (1, 1)), (3, 5)),
    (9, 3, 2, ((0, 1), (0, 1)), (2, 3)),  # the VAE downsampler's asymmetric padding
    (7, 1, 1, ((0, 0), (0, 0)), (4, 4)),
    (10, 3, 1, ((0, 0), (2, 1)), (2, 2)),
])
def test_values_and_gradients_match_autodiff(size, kernel, stride, padding, channels):
  cin, cout = channels
  kx, kw, kd = jax.random.split(jax.random.PRNGKey(size * kernel + stride), 3)
  x = jax.random.normal(kx, (2, size, size + 1, cin))
  w = jax.random.normal(kw, (kernel, kernel, cin, cout))
  strides = (stride, stride)
  ours = conv_ops.canonical_conv(x, w, strides, padding)
  ref = _reference(x, w, strides, padding)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(kd, ref.shape)
  grads = jax.grad(lambda x, w: jnp.sum(conv_ops.canonical_conv(x, w, strides, padding)
                                        * cotangent), (0, 1))(x, w)
  want = jax.grad(lambda x, w: jnp.sum(_reference(x, w, strides, padding) * cotangent),
                  (0, 1))(x, w)
  for got, expected in zip(grads, want):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_gradients_keep_dtype_and_match():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4), jnp.bfloat16)
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 4, 8), jnp.bfloat16)
  pad = ((1, 1), (1, 1))
  loss = lambda f: lambda x, w: jnp.sum(f(x, w, (1, 1), pad).astype(jnp.float32) ** 2)
  grads = jax.grad(loss(conv_ops.canonical_conv), (0, 1))(x, w)
  want = jax.grad(loss(_reference), (0, 1))(x, w)
  for got, expected in zip(grads, want):
    assert got.dtype == jnp.bfloat16
    rel = (np.linalg.norm(np.asarray(got, np.float32) - np.asarray(expected, np.float32))
           / np.linalg.norm(np.asarray(expected, np.float32)))
    assert rel < 2e-2, rel


def test_general_signature_falls_back_for_other_convolutions():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 8, 4))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 2, 4))  # 2 groups
  dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, DIMS)
  grouped = conv_ops.canonical_conv_general_dilated(x, w, (1, 1), "SAME",
                                                  dimension_numbers=dims,
                                                  feature_group_count=2)
  np.testing.assert_allclose(grouped, jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=dims, feature_group_count=2), rtol=1e-6)
  plain_w = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 4, 5))
  dims = jax.lax.conv_dimension_numbers(x.shape, plain_w.shape, DIMS)
  jaxpr = str(jax.make_jaxpr(lambda x: conv_ops.canonical_conv_general_dilated(
      x, plain_w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims))(x))
  assert "custom_vjp" in jaxpr


def test_conv_layer_uses_canonical_gradients_on_cpu():
  if jax.default_backend() != "cpu":
    pytest.skip("the custom gradient is chosen on the CPU backend only")
  module = layers.conv(6, 3, jnp.float32, "conv", stride=2)
  x = jnp.ones((1, 9, 9, 4))
  variables = module.init(jax.random.PRNGKey(0), x)
  assert "custom_vjp" in str(jax.make_jaxpr(lambda v: module.apply(v, x).sum())(variables))


def test_backward_convolutions_inside_a_scan_are_canonical():
  """Compiled for the CPU, every convolution of a gradient taken inside lax.scan has the
  b01f_01io->b01f form that XLA's CPU backend runs on its fast path (autodiff of
  lax.conv_general_dilated leaves f01b_i01o->01bf and 01oi kernels there)."""
  w1 = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 4, 8))
  w2 = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 8, 8))
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 16, 16, 4))

  def labels(conv):
    def loss(ws, scale):
      h = jax.nn.silu(conv(x * scale, ws[0], (1, 1), ((1, 1), (1, 1))))
      return jnp.sum(conv(h, ws[1], (2, 2), ((1, 1), (1, 1))) ** 2)

    def scanned(ws):
      def body(acc, scale):
        grads = jax.grad(loss)(ws, scale)
        return jax.tree.map(jnp.add, acc, grads), None
      return jax.lax.scan(body, jax.tree.map(jnp.zeros_like, ws), jnp.arange(1.0, 3.0))[0]
    text = jax.jit(scanned).trace((w1, w2)).lower(
        lowering_platforms=("cpu",)).compile().as_text()
    return set(re.findall(r"dim_labels=([\w>-]+)", text))

  assert labels(conv_ops.canonical_conv) == {"b01f_01io->b01f"}
  assert labels(_reference) != {"b01f_01io->b01f"}  # the case this layer exists for
