"""The chunked (memory-efficient) attention path: same function as the fused path.

``attention_ops.chunked_attention`` and ``UNet2DConditionModel(attention=AttentionConfig('chunked',
...))`` against ``attention_ops.fused_attention`` (values and gradients) and against diffusers
PyTorch; the cuDNN shape rule. No timing here: the speed figures are in benchmarks/README.md
("Profile"), from benchmarks/profile_unet.py. The Pallas TPU path and the setting's choices per
backend are in test_attention_paths.py.
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
from rl4pix_jax.models.attention_ops import AttentionConfig
from rl4pix_jax.models.clip import CLIPTextConfig
from rl4pix_jax.models.unet import UNet2DConditionModel, UNetConfig, collect_attention_maps
from rl4pix_jax.models.vae import VAEConfig
from rl4pix_jax.weights.diffusers_models import load_unet
from tests.helpers import rl_fixtures
from tests.helpers import tiny_models
from tests.models.test_unet import (BATCH, SIDE, TOKENS, build_torch_unet, tolerance, torch_forward,
                             unet_inputs)
from tests.helpers.paths import REPO_ROOT


def chunked(queries: int) -> AttentionConfig:
  return AttentionConfig("chunked", chunk_queries=queries)


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
  """attention 'chunked': the blocked path for every chunk (smaller, equal, larger than N)."""
  x = jnp.asarray(np.random.RandomState(4).randn(2, 24, 16).astype(np.float32))
  module = layers.Attention(heads=2, head_dim=8, out_features=16)
  params = module.init(jax.random.PRNGKey(0), x)
  ref = module.apply(params, x)
  for chunk in (8, 24, 100):
    out = layers.Attention(2, 8, 16, attention=chunked(chunk)).apply(params, x)
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
  model = UNet2DConditionModel(config, attention=chunked(48))
  out = np.asarray(jax.jit(model.apply)(params, sample, timesteps, context))
  diff = np.abs(out - ref).max()
  print(f"UNet attention=chunked, 48 queries vs diffusers: max abs diff {diff:.3g}, "
        f"max |ref| {np.abs(ref).max():.3g}")
  assert diff <= tolerance(ref)
  np.testing.assert_allclose(out, default, atol=1e-5 * (1 + np.abs(default).max()))


def test_unet_query_chunk_gradients_match_default(tiny_chunked):
  _, config, params = tiny_chunked
  sample, timesteps, context = unet_inputs(seed=3)

  def loss_and_grad(chunk):
    model = UNet2DConditionModel(config, attention=chunked(chunk) if chunk else AttentionConfig())
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
    model = UNet2DConditionModel(config, attention=chunked(chunk) if chunk else AttentionConfig())
    return jax.jit(lambda p: model.apply(p, sample, timesteps, context, token_index,
                                         capture_size=SIDE, mutable=["attention_maps"]))(params)

  (out_a, state_a), (out_b, state_b) = run(None), run(32)
  np.testing.assert_allclose(out_b, out_a, atol=1e-5 * (1 + float(np.abs(out_a).max())))
  np.testing.assert_allclose(collect_attention_maps(state_b), collect_attention_maps(state_a),
                             atol=1e-6)


def test_build_models_and_config_key_pass_the_option():
  """pipeline.build_models and pipeline.attention_config (run_setup passes one to the other)."""
  parts = (UNetConfig.from_diffusers(tiny_models.TINY_UNET),
           VAEConfig.from_diffusers(rl_fixtures.VAE),
           CLIPTextConfig.from_transformers(rl_fixtures.TEXT, projection_dim=32),
           shapes_config.get_config().model.scheduler)
  default = pipeline.build_models(*parts)
  assert default.unet.attention.kind == default.vae.attention.kind == "xla"  # the library's
  run_config = shapes_config.get_config()
  setting = pipeline.attention_config(run_config)
  assert setting == AttentionConfig(
      "auto", flash_min_tokens=run_config.model.attention_flash_min_tokens,
      chunk_queries=run_config.model.attention_chunk_queries,
      flash_block=run_config.model.attention_flash_block)
  models = pipeline.build_models(*parts, attention=setting)
  assert models.unet.attention is setting and models.vae.attention is setting


def test_benchmark_cli_flag():
  """benchmarks.run --attention / --attention_chunk_queries build our UNet (no timing check)."""
  root = REPO_ROOT
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.run", "--config=tiny", "--cases=forward",
       "--batches=1", "--reps=1", "--skip_torch", "--attention=chunked",
       "--attention_chunk_queries=16"],
      cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "attention=chunked chunk_queries=16" in result.stdout
  assert any(line.startswith("| UNet forward | 1 |") for line in result.stdout.splitlines())


def test_cudnn_request_falls_back_to_xla_where_cudnn_refuses():
  accepts = attention_ops.cudnn_accepts
  assert accepts(4096, 40, jnp.bfloat16) and accepts(4096, 80, jnp.float16)
  assert not accepts(77, 40, jnp.bfloat16)  # CLIP's odd token count
  assert not accepts(64, 40, jnp.float32)  # cuDNN takes half precision only
  assert not accepts(64, 12, jnp.bfloat16)  # head width not a multiple of 8
  assert not accepts(64, 160, jnp.bfloat16) and accepts(64, 160, jnp.bfloat16, 256)  # Hopper
  assert attention_ops.cudnn_max_head_dim("cpu") == 128
  pick = lambda keys, dtype: attention_ops.choose_attention(
      AttentionConfig("cudnn"), 64, keys, 8, dtype, self_attention=False)
  assert pick(4096, jnp.bfloat16) == "cudnn"
  assert pick(77, jnp.bfloat16) == "xla" and pick(64, jnp.float32) == "xla"
  # A 'cudnn' layer over 77 keys runs (through XLA) on any backend and matches the default.
  q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key, shape in zip(
      jax.random.split(jax.random.PRNGKey(3), 3), [(1, 16, 8), (1, 77, 8), (1, 77, 8)]))
  np.testing.assert_array_equal(
      np.asarray(attention_ops.attention(q, k, v, 2, AttentionConfig("cudnn"),
                                         self_attention=False), np.float32),
      np.asarray(attention_ops.fused_attention(q, k, v, 2), np.float32))
