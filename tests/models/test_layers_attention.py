"""The chunked (memory-efficient) attention option: same function as the fused path.

``attention_ops.chunked_attention`` and ``UNet2DConditionModel(attention_query_chunk=...)`` against
``attention_ops.fused_attention`` (values and gradients) and against diffusers PyTorch. No timing
here: the speed figures are in benchmarks/README.md ("Profile"), from benchmarks/profile_unet.py.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes as shapes_config
from rl4pix_jax import pipeline
from rl4pix_jax.models import attention_ops, layers
from rl4pix_jax.models.clip import CLIPTextConfig
from rl4pix_jax.models.unet import UNet2DConditionModel, UNetConfig, collect_attention_maps
from rl4pix_jax.models.vae import VAEConfig
from rl4pix_jax.weights.diffusers_models import load_unet
from tests.helpers import rl_fixtures
from tests.helpers import tiny_models
from tests.models.test_unet import (BATCH, SIDE, TOKENS, build_torch_unet, tolerance, torch_forward,
                             unet_inputs)
from tests.helpers.paths import REPO_ROOT


def _qkv(seed, queries, keys, width, dtype=jnp.float32):
  rng = np.random.RandomState(seed)
  q = rng.randn(2, queries, width).astype(np.float32)
  k, v = (rng.randn(2, keys, width).astype(np.float32) for _ in range(2))
  return tuple(jnp.asarray(t, dtype) for t in (q, k, v))


def float_rounding_bound(ref) -> float:
  """Chunked vs fused attention: the same float32 sums in another order and other kernels.

  Each output is sum_l exp(s_l) v_l / sum_l exp(s_l) over L <= 64 keys, with scores s from
  d = 8-32 term dot products; exp turns a score's absolute rounding (~|s| ulps) into a
  relative one. Worst case ~(L + d |s|) float32 roundings (6e-8 each) of the output scale:
  ~1e-5. Measured here 4.8e-7 at |out| <= 2.5 (2 ulps; AMD EPYC), while the old fixed
  2e-6 was 8 ulps, fitted to that. A real bug (a block offset, padded rows kept, a wrong
  scale) is >= 1e-2.
  """
  return 1e-5 * (1.0 + float(np.abs(ref).max()))


# (queries, keys, heads, chunk): several blocks, a padded last block, one block (chunk >= N),
# cross-attention (keys != queries), one head.
CASES = [(64, 64, 4, 16), (50, 50, 2, 16), (20, 20, 4, 32), (48, 7, 4, 16), (33, 12, 1, 8)]


@pytest.mark.parametrize("queries,keys,heads,chunk", CASES)
def test_chunked_matches_fused_values_and_gradients(queries, keys, heads, chunk):
  q, k, v = _qkv(queries + keys, queries, keys, 8 * heads)
  chunked = lambda q, k, v: attention_ops.chunked_attention(q, k, v, heads, chunk)
  fused = lambda q, k, v: attention_ops.fused_attention(q, k, v, heads)
  out = jax.jit(chunked)(q, k, v)
  ref = fused(q, k, v)
  assert out.shape == ref.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=float_rounding_bound(ref))

  weights = jnp.asarray(np.random.RandomState(1).randn(*ref.shape).astype(np.float32))
  loss = lambda fn: (lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)) * weights))
  grads = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2)))(q, k, v)
  ref_grads = jax.grad(loss(fused), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(a, b, atol=1e-5 * (1 + float(np.abs(b).max())), err_msg=name)


def test_chunked_upcast_and_bfloat16():
  q, k, v = _qkv(3, 40, 40, 16, jnp.bfloat16)
  ref = attention_ops.fused_attention(*(t.astype(jnp.float32) for t in (q, k, v)), heads=2)
  for upcast in (False, True):
    out = jax.jit(lambda q, k, v, u=upcast: attention_ops.chunked_attention(q, k, v, 2, 16, u)
                  )(q, k, v)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)
  grads = jax.grad(lambda q: jnp.sum(attention_ops.chunked_attention(q, k, v, 2, 16).astype(
      jnp.float32)))(q)
  assert grads.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(grads)))


def test_attention_module_with_query_chunk_matches_fused_for_any_chunk():
  """query_chunk set: the blocked path for every chunk (smaller, equal, larger than N)."""
  x = jnp.asarray(np.random.RandomState(4).randn(2, 24, 16).astype(np.float32))
  module = layers.Attention(heads=2, head_dim=8, out_features=16)
  params = module.init(jax.random.PRNGKey(0), x)
  ref = module.apply(params, x)
  for chunk in (8, 24, 100):
    out = layers.Attention(2, 8, 16, query_chunk=chunk).apply(params, x)
    np.testing.assert_allclose(out, ref, atol=float_rounding_bound(ref))


def test_chunked_attention_gradient_runs_only_two_dimensional_matmuls():
  """Every dot of the compiled forward + backward is a plain 2-D matmul (no batch dims).

  The speed of the path on XLA's CPU backend rests on this: batched dots over many small
  (batch, head) matrices were 2-3x slower (benchmarks/README.md, "Profile").
  """
  q, k, v = _qkv(5, 40, 24, 16)
  loss = lambda q, k, v: jnp.sum(attention_ops.chunked_attention(q, k, v, 4, 16) ** 2)
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
  dots = re.findall(r"= f32\[[^\]]*\][^=]* dot\((.*)", hlo)
  assert dots, "no dot in the compiled gradient"
  for line in dots:
    assert "lhs_batch_dims" not in line, line


@pytest.fixture(scope="module")
def tiny_chunked(tmp_path_factory):
  """(torch model, config, params): the tiny test UNet (16x16 = 256 self-attention tokens)."""
  torch_model = build_torch_unet(seed=11)
  folder = str(tmp_path_factory.mktemp("unet_chunked"))
  torch_model.save_pretrained(folder)
  config, params = load_unet(folder)
  return torch_model, config, params


def test_unet_query_chunk_matches_diffusers_and_default(tiny_chunked):
  torch_model, config, params = tiny_chunked
  sample, timesteps, context = unet_inputs(seed=2)
  ref = torch_forward(torch_model, sample, timesteps, context)
  default = np.asarray(jax.jit(UNet2DConditionModel(config).apply)(
      params, sample, timesteps, context))
  # 48 divides neither 16x16 = 256 nor the mid block's 8x8 = 64 queries: padded last blocks.
  model = UNet2DConditionModel(config, attention_query_chunk=48)
  out = np.asarray(jax.jit(model.apply)(params, sample, timesteps, context))
  diff = np.abs(out - ref).max()
  print(f"UNet attention_query_chunk=48 vs diffusers: max abs diff {diff:.3g}, "
        f"max |ref| {np.abs(ref).max():.3g}")
  assert diff <= tolerance(ref)
  np.testing.assert_allclose(out, default, atol=1e-5 * (1 + np.abs(default).max()))


def test_unet_query_chunk_gradients_match_default(tiny_chunked):
  _, config, params = tiny_chunked
  sample, timesteps, context = unet_inputs(seed=3)

  def loss_and_grad(chunk):
    model = UNet2DConditionModel(config, attention_query_chunk=chunk)
    loss = lambda p: jnp.mean(model.apply(p, sample, timesteps, context) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  (loss_a, grad_a), (loss_b, grad_b) = loss_and_grad(None), loss_and_grad(64)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(grad_a), jax.tree_util.tree_leaves(grad_b)):
    np.testing.assert_allclose(b, a, atol=1e-5 * (1 + float(np.abs(a).max())))


def test_unet_query_chunk_keeps_attention_capture(tiny_chunked):
  """Capturing layers keep the explicit softmax; the maps and output do not change."""
  _, config, params = tiny_chunked
  sample, timesteps, context = unet_inputs(seed=4)
  token_index = np.tile(np.arange(TOKENS, dtype=np.int32), (BATCH, 1))

  def run(chunk):
    model = UNet2DConditionModel(config, attention_query_chunk=chunk)
    return jax.jit(lambda p: model.apply(p, sample, timesteps, context, token_index,
                                         capture_size=SIDE, mutable=["attention_maps"]))(params)

  (out_a, state_a), (out_b, state_b) = run(None), run(32)
  np.testing.assert_allclose(out_b, out_a, atol=1e-5 * (1 + float(np.abs(out_a).max())))
  np.testing.assert_allclose(collect_attention_maps(state_b), collect_attention_maps(state_a),
                             atol=1e-6)


def test_build_models_and_config_key_pass_the_option():
  """pipeline.build_models (used by run_setup with config.model.attention_query_chunk)."""
  parts = (UNetConfig.from_diffusers(tiny_models.TINY_UNET),
           VAEConfig.from_diffusers(rl_fixtures.VAE),
           CLIPTextConfig.from_transformers(rl_fixtures.TEXT, projection_dim=32),
           shapes_config.get_config().model.scheduler)
  assert pipeline.build_models(*parts).unet.attention_query_chunk is None  # off by default
  models = pipeline.build_models(*parts, attention_query_chunk=32)
  assert models.unet.attention_query_chunk == 32


def test_benchmark_cli_flag():
  """benchmarks.run --attention_query_chunk builds our UNet with the option (no timing check)."""
  root = REPO_ROOT
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.run", "--config=tiny", "--cases=forward",
       "--batches=1", "--reps=1", "--skip_torch", "--attention_query_chunk=16"],
      cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "attention_query_chunk=16" in result.stdout
  assert any(line.startswith("| UNet forward | 1 |") for line in result.stdout.splitlines())


def test_cudnn_request_falls_back_to_xla_where_cudnn_refuses():
  pick = attention_ops.attention_implementation_for
  assert pick("cudnn", 4096, jnp.bfloat16) == "cudnn"
  assert pick("cudnn", 77, jnp.bfloat16) == "xla"  # CLIP's odd token count
  assert pick("cudnn", 64, jnp.float32) == "xla"  # cuDNN takes half precision only
  assert pick(None, 77, jnp.bfloat16) is None
  assert pick("xla", 64, jnp.bfloat16) == "xla"
  # A 'cudnn' layer over 77 keys runs (through XLA) on any backend and matches the default.
  q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key, shape in zip(
      jax.random.split(jax.random.PRNGKey(3), 3), [(1, 16, 8), (1, 77, 8), (1, 77, 8)]))
  np.testing.assert_array_equal(
      np.asarray(attention_ops.fused_attention(q, k, v, 2, implementation="cudnn"), np.float32),
      np.asarray(attention_ops.fused_attention(q, k, v, 2), np.float32))
