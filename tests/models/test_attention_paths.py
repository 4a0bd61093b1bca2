"""The attention setting (``model.attention``) and the Pallas TPU flash-attention path.

``AttentionConfig`` / ``choose_attention``: which kernel each backend and layer shape gets.
``pallas_tpu_attention`` runs on this CPU in TPU interpret mode
(``jax.experimental.pallas.tpu.force_tpu_interpret_mode()``): its values and gradients
against XLA's attention (block sizes that do and do not divide the sequence, the padding of odd
lengths such as CLIP's 77 tokens), against diffusers' ``Attention`` (PyTorch), in the VAE
mid-block, and a whole tiny UNet forward + backward against 'xla'. Interpret mode is slow: the
shapes are tiny. Last, what lowering shows without an accelerator: an SD1.5-shaped UNet at
512 px (64x64 latents, reduced channels) with 'auto' holds no (B, 8, 4096, 4096) score array.
"""

import re

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from rl4pix_jax.models import attention_ops, layers
from rl4pix_jax.models.attention_ops import AttentionConfig
from rl4pix_jax.models.unet import UNet2DConditionModel, UNetConfig
from tests.helpers import tiny_models

AUTO = dict(flash_min_tokens=4096, chunk_queries=512, flash_block=512)


def pallas(block: int = 128) -> AttentionConfig:
  return AttentionConfig("pallas_tpu", flash_block=block)


def _qkv(seed, queries, keys, width, batch=1, dtype=jnp.float32):
  rng = np.random.RandomState(seed)
  q = rng.randn(batch, queries, width)
  k, v = (rng.randn(batch, keys, width) for _ in range(2))
  return tuple(jnp.asarray(t, dtype) for t in (q, k, v))


def test_attention_config_names_the_valid_values():
  with pytest.raises(ValueError, match="auto, xla, cudnn, pallas_tpu, chunked") as error:
    AttentionConfig("flash")
  assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match="chunk_queries"):
    AttentionConfig("chunked")
  with pytest.raises(ValueError, match="flash_min_tokens"):
    AttentionConfig("auto", chunk_queries=512, flash_block=512)
  with pytest.raises(ValueError, match="multiple of 128"):
    AttentionConfig("pallas_tpu", flash_block=100)
  with pytest.raises(ValueError, match="platform"):
    AttentionConfig("auto", platform="metal", **AUTO)
  with pytest.raises(ValueError, match="multiple of 128"):
    attention_ops.pallas_tpu_attention(*_qkv(0, 8, 8, 8), heads=1, block=64)
  assert AttentionConfig().kind == "xla"


@pytest.mark.parametrize("platform,queries,keys,head_dim,dtype,self_attention,path", [
    # TPU: the Pallas kernel for self-attention from flash_min_tokens on (SD1.5 at 512 px).
    ("tpu", 4096, 4096, 40, jnp.bfloat16, True, "pallas_tpu"),
    ("tpu", 1024, 1024, 80, jnp.bfloat16, True, "xla"),
    ("tpu", 4096, 77, 40, jnp.bfloat16, False, "xla"),
    # GPU: cuDNN where it takes the shape (half precision, even keys, head width).
    ("gpu", 4096, 4096, 40, jnp.bfloat16, True, "cudnn"),
    ("cuda", 64, 64, 80, jnp.float16, True, "cudnn"),
    ("gpu", 4096, 77, 40, jnp.bfloat16, False, "xla"),
    ("gpu", 4096, 4096, 40, jnp.float32, True, "xla"),
    # CPU: the blocked path where it splits the queries (more than chunk_queries), self- and
    # cross-attention alike; XLA for the default's 64-token layers (one block would be all).
    ("cpu", 1024, 1024, 8, jnp.float32, True, "chunked"),
    ("cpu", 1024, 77, 8, jnp.float32, False, "chunked"),
    ("cpu", 64, 64, 8, jnp.float32, True, "xla"),
    ("cpu", 64, 77, 8, jnp.float32, False, "xla"),
])
def test_auto_picks_per_backend_and_layer_shape(platform, queries, keys, head_dim, dtype,
                                                 self_attention, path):
  config = AttentionConfig("auto", platform=platform, **AUTO)
  assert attention_ops.choose_attention(config, queries, keys, head_dim, dtype,
                                        self_attention) == path


def test_explicit_kinds_are_taken_as_asked():
  for kind, path in (("xla", "xla"), ("chunked", "chunked"), ("pallas_tpu", "pallas_tpu")):
    config = AttentionConfig(kind, platform="tpu", **AUTO)
    assert attention_ops.choose_attention(config, 64, 77, 8, jnp.float32, False) == path
  # The threshold is the config value.
  low = AttentionConfig("auto", platform="tpu", **dict(AUTO, flash_min_tokens=256))
  assert attention_ops.choose_attention(low, 256, 256, 8, jnp.float32, True) == "pallas_tpu"


def _value_and_vjp(fn, q, k, v, weights):
  """(fn(q, k, v), d/d(q, k, v) of sum(sin(fn) * weights)), one compile (interpret mode
  compiles slowly, so forward and backward share it)."""
  def run(q, k, v):
    out, pullback = jax.vjp(fn, q, k, v)
    return out, pullback(jnp.cos(out) * weights)
  return jax.jit(run)(q, k, v)


# (queries, keys, heads, head_dim, block): a block that divides the sequence (256 = 2 x 128:
# no padding, no segment ids); one that does not, with the padding SD's shapes need: 200
# queries padded to 256 (2 blocks), CLIP's odd 77 keys padded to 128 and masked, and a head
# wider than 128 (160, as at SD1.5's 1280-channel level) zero-padded to 256.
PALLAS_CASES = [(256, 256, 1, 8, 128), (200, 77, 1, 160, 128)]


@pytest.mark.parametrize("queries,keys,heads,head_dim,block", PALLAS_CASES)
def test_pallas_matches_xla_values_and_gradients(queries, keys, heads, head_dim, block):
  q, k, v = _qkv(queries + keys, queries, keys, heads * head_dim)
  weights = jnp.asarray(np.random.RandomState(1).randn(1, queries, heads * head_dim),
                        jnp.float32)
  flash = lambda q, k, v: attention_ops.pallas_tpu_attention(q, k, v, heads, block)
  xla = lambda q, k, v: attention_ops.fused_attention(q, k, v, heads, implementation="xla")
  with pltpu.force_tpu_interpret_mode():
    out, grads = _value_and_vjp(flash, q, k, v, weights)
  ref, ref_grads = _value_and_vjp(xla, q, k, v, weights)
  assert out.shape == ref.shape and out.dtype == jnp.float32
  np.testing.assert_allclose(out, ref, atol=1e-5 * (1 + float(np.abs(ref).max())))
  for name, a, b in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(a, b, atol=1e-5 * (1 + float(np.abs(b).max())), err_msg=name)


def test_pallas_cross_attention_layer_matches_diffusers():
  """layers.Attention on the Pallas path (45 queries, CLIP's 77 keys: both padded) against
  diffusers' Attention (PyTorch) with the same weights."""
  import torch  # pylint: disable=import-outside-toplevel
  from diffusers.models.attention_processor import Attention as TorchAttention  # pylint: disable=import-outside-toplevel
  from tests.helpers.torch_parity import assert_close, randomise  # pylint: disable=import-outside-toplevel
  rng = np.random.RandomState(7)
  x = rng.randn(2, 45, 16).astype(np.float32)
  text = rng.randn(2, 77, 24).astype(np.float32)
  torch_layer = randomise(TorchAttention(16, cross_attention_dim=24, heads=2, dim_head=8,
                                         bias=False, out_bias=True), seed=5)
  linear = lambda m: {"kernel": jnp.asarray(m.weight.detach().numpy().T)}
  params = {"params": {
      "to_q": linear(torch_layer.to_q), "to_k": linear(torch_layer.to_k),
      "to_v": linear(torch_layer.to_v),
      "to_out_0": dict(linear(torch_layer.to_out[0]),
                       bias=jnp.asarray(torch_layer.to_out[0].bias.detach().numpy()))}}
  module = layers.Attention(2, 8, 16, attention=pallas())
  with pltpu.force_tpu_interpret_mode():
    out = jax.jit(module.apply)(params, jnp.asarray(x), jnp.asarray(text))
  with torch.no_grad():
    ref = torch_layer(torch.from_numpy(x), torch.from_numpy(text)).numpy()
  assert_close(out, ref, "Pallas cross-attention (45 x 77) vs diffusers")


def test_vae_mid_block_attention_takes_the_setting():
  """SpatialSelfAttention (one head, float32) on the chunked path equals XLA's, and 'auto'
  sends its 4096-token (512 px) shape to the Pallas kernel on TPU."""
  x = jnp.asarray(np.random.RandomState(2).randn(1, 6, 7, 16), jnp.float32)  # 42 tokens
  module = layers.SpatialSelfAttention(head_dim=16, groups=4)
  params = module.init(jax.random.PRNGKey(0), x)
  ref = module.apply(params, x)
  chunked = layers.SpatialSelfAttention(16, 4, attention=AttentionConfig("chunked",
                                                                          chunk_queries=16))
  out = jax.jit(chunked.apply)(params, x)
  np.testing.assert_allclose(out, ref, atol=1e-5 * (1 + float(np.abs(ref).max())))
  assert not np.allclose(out, x)
  tpu = AttentionConfig("auto", platform="tpu", **AUTO)
  assert attention_ops.choose_attention(tpu, 4096, 4096, 512, jnp.float32, True) == "pallas_tpu"


# The tiny UNet with attention only where it cannot be left out, the mid block (8x8 = 64
# self-attention tokens, 8 text tokens): two layers, both on the kernel (each kernel costs
# tens of seconds of compile in interpret mode).
PALLAS_UNET = dict(tiny_models.TINY_UNET, down_block_types=["DownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "UpBlock2D"])


def test_tiny_unet_forward_and_backward_pallas_matches_xla():
  """attention='pallas_tpu': every attention layer of a tiny UNet on the Pallas kernel; the
  output and every parameter gradient equal those with 'xla'."""
  config = UNetConfig.from_diffusers(PALLAS_UNET)
  rng = np.random.RandomState(0)
  sample = jnp.asarray(rng.randn(1, 16, 16, 8), jnp.float32)
  timesteps = jnp.asarray([500], jnp.int32)
  context = jnp.asarray(rng.randn(1, tiny_models.TEXT_LEN, 32), jnp.float32)
  params = UNet2DConditionModel(config).init(jax.random.PRNGKey(3), sample, timesteps,
                                             context)["params"]
  leaves, treedef = jax.tree_util.tree_flatten(params)  # perturbed: no zero output layer
  keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
  params = jax.tree_util.tree_unflatten(
      treedef, [x + 0.05 * jax.random.normal(key, x.shape) for x, key in zip(leaves, keys)])

  def value_and_grad(attention):
    model = UNet2DConditionModel(config, attention=attention)
    loss = lambda p: jnp.mean(model.apply({"params": p}, sample, timesteps, context) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  loss_xla, grad_xla = value_and_grad(AttentionConfig("xla"))
  with pltpu.force_tpu_interpret_mode():
    loss_flash, grad_flash = value_and_grad(pallas())
  assert float(loss_xla) > 0
  np.testing.assert_allclose(loss_flash, loss_xla, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(grad_flash), jax.tree_util.tree_leaves(grad_xla)):
    np.testing.assert_allclose(a, b, atol=1e-5 * (1 + float(np.abs(b).max())))


# SD1.5's top level at 512 px (64x64 latents, 8 heads, CLIP's 77 tokens) with reduced channels
# and no level below (so the mid block attends over 4096 tokens too): only the 4096-token
# self-attention matters here, and the compile stays short.
SD15_SHAPED = dict(in_channels=8, out_channels=4, sample_size=64, block_out_channels=[32],
                   layers_per_block=1, down_block_types=["CrossAttnDownBlock2D"],
                   up_block_types=["CrossAttnUpBlock2D"], cross_attention_dim=32,
                   attention_head_dim=8, norm_num_groups=8)
SCORES = re.compile(r"\b(?:f32|bf16)\[1,8,4096,4096\]")  # (B, heads, N, N) scores, B = 1


def _sd15_shaped_forward(attention: AttentionConfig):
  config = UNetConfig.from_diffusers(SD15_SHAPED)
  model = UNet2DConditionModel(config, attention=attention)
  sd = jax.ShapeDtypeStruct
  args = (sd((1, 64, 64, 8), jnp.float32), sd((1,), jnp.int32), sd((1, 77, 32), jnp.float32))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), *args)
  return jax.jit(model.apply).trace(params, *args)


def test_auto_on_cpu_compiles_no_4096_square_score_array():
  """'auto' on CPU (the chunked path): the compiled SD1.5-shaped UNet at 512 px has no
  (1, 8, 4096, 4096) array; 'xla' has one (so the pattern does see it)."""
  auto = AttentionConfig("auto", platform="cpu", **AUTO)
  compiled = _sd15_shaped_forward(auto).lower().compile().as_text()
  assert "[1,8,4096,4096]" not in compiled and not SCORES.search(compiled)
  assert "4096,4096" not in compiled
  lowered_xla = _sd15_shaped_forward(AttentionConfig("xla")).lower().as_text()
  assert "1x8x4096x4096xf32" in lowered_xla


def test_auto_for_tpu_lowers_on_this_cpu_to_the_pallas_kernel():
  """Lowering for TPU needs no TPU: the 64x64 self-attention becomes a Mosaic custom call and
  the lowered program has no 4096x4096 score array (compiling it needs the TPU)."""
  auto = AttentionConfig("auto", platform="tpu", **AUTO)
  lowered = _sd15_shaped_forward(auto).lower(lowering_platforms=("tpu",)).as_text()
  assert "tpu_custom_call" in lowered
  assert "4096x4096" not in lowered
