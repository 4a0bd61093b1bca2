"""Flax UNet2DConditionModel vs PyTorch diffusers, attention-map capture, bf16 and remat."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.embeddings import get_timestep_embedding

from rl4pix_jax.models import attention_ops, layers
from rl4pix_jax.models.unet import UNet2DConditionModel, UNetConfig, collect_attention_maps
from rl4pix_jax.weights.diffusers_models import load_unet

BATCH, SIDE, TOKENS, CROSS_DIM = 2, 16, 7, 32

# Two resolutions (16 and 8): cross-attention in down_blocks_0, the mid block, up_blocks_1.
TINY_UNET = dict(
    sample_size=SIDE, in_channels=8, out_channels=4, block_out_channels=(32, 64),
    layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CROSS_DIM,
    attention_head_dim=4, norm_num_groups=8)
# Linear projections, several layers, per-block heads, upcast, other timestep embedding,
# centred input, mid-block scale, only_cross_attention in the first block.
TINY_UNET_LINEAR = dict(
    TINY_UNET, use_linear_projection=True, layers_per_block=2, transformer_layers_per_block=2,
    attention_head_dim=(2, 4), upcast_attention=True, flip_sin_to_cos=False, freq_shift=1,
    center_input_sample=True, mid_block_scale_factor=0.7, norm_eps=1e-6,
    only_cross_attention=(True, False))


def tolerance(reference: np.ndarray, rel: float = 1e-4) -> float:
  """The parity threshold: rel * (1 + max |reference|)."""
  return rel * (1.0 + float(np.abs(reference).max()))


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Overwrites every parameter with seeded noise (norm scales around 1), in place."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in module.named_parameters():
      noise = torch.randn(param.shape, generator=gen)
      is_norm_scale = "norm" in name and name.endswith("weight") and param.ndim == 1
      param.copy_(1.0 + 0.2 * noise if is_norm_scale else 0.1 * noise)
  return module.eval()


def build_torch_unet(seed: int = 0, **config) -> TorchUNet:
  """A tiny randomised diffusers UNet (TINY_UNET overridden by ``config``)."""
  return randomize_(TorchUNet(**{**TINY_UNET, **config}), seed)


def unet_inputs(seed: int = 0, in_channels: int = 8):
  """NHWC sample (B, 16, 16, 8), int timesteps (B,), text states (B, 7, 32), numpy."""
  rng = np.random.RandomState(seed)
  sample = rng.randn(BATCH, SIDE, SIDE, in_channels).astype(np.float32)
  timesteps = np.array([3, 901], dtype=np.int32)[:BATCH]
  context = rng.randn(BATCH, TOKENS, CROSS_DIM).astype(np.float32)
  return sample, timesteps, context


def torch_forward(model: TorchUNet, sample, timesteps, context) -> np.ndarray:
  """Runs diffusers on NHWC numpy inputs; returns NHWC numpy."""
  with torch.no_grad():
    out = model(torch.from_numpy(sample.transpose(0, 3, 1, 2)),
                torch.from_numpy(timesteps).long(), torch.from_numpy(context)).sample
  return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(torch model, our config, our params, jitted float32 forward)."""
  torch_model = build_torch_unet()
  folder = str(tmp_path_factory.mktemp("unet"))
  torch_model.save_pretrained(folder)
  config, params = load_unet(folder)
  model = UNet2DConditionModel(config)
  return torch_model, config, params, jax.jit(model.apply)


@pytest.fixture(scope="module")
def captured(tiny):
  """Forward with all L tokens captured in every layer, plus the norm2 outputs (attn2 inputs)."""
  _, config, params, _ = tiny
  model = UNet2DConditionModel(config)
  sample, timesteps, context = unet_inputs()
  token_index = np.tile(np.arange(TOKENS, dtype=np.int32), (BATCH, 1))
  token_mask = np.ones((BATCH, TOKENS), bool)
  token_mask[1, [0, 4]] = False

  @jax.jit
  def run(params, sample, timesteps, context, token_index, token_mask):
    return model.apply(params, sample, timesteps, context, token_index, token_mask,
                       capture_intermediates=lambda mdl, _: mdl.name == "norm2",
                       mutable=["attention_maps", "intermediates"])
  out, state = run(params, sample, timesteps, context, token_index, token_mask)
  return dict(out=out, state=jax.device_get(state), token_mask=token_mask, context=context)


def test_timestep_embedding_matches_diffusers():
  t = np.array([0, 1, 17, 999], np.int64)
  for dim, flip, shift in ((32, True, 0), (33, False, 1)):
    ours = layers.timestep_embedding(jnp.asarray(t), dim, flip, shift)
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip, shift).numpy()
    # Angles t * freq reach 999 rad, where one float32 ulp is 6.1e-5, and sin/cos pass an
    # angle's absolute error through: our exp() and torch's may differ by an ulp of freq
    # (x 999: up to 6e-5), or of its exponent (up to 999 x max_a a e^-a x 1.2e-7 = 4.4e-5),
    # and the product t * freq may round the other way (one more ulp, 6.1e-5): 3 ulps of
    # the largest angle, 1.8e-4 (the old 1e-4 was under that). Measured 2.8e-5 (AMD EPYC). A
    # real bug (a wrong shift, flip or period, an off-by-one i) moves angles by O(1) at t=999.
    np.testing.assert_allclose(np.asarray(ours), ref,
                               atol=3 * float(np.spacing(np.float32(t.max()))))


def test_config_from_diffusers_reads_heads_and_round_trips(tiny):
  torch_model, config, _, _ = tiny
  assert config.num_attention_heads == (4, 4)  # attention_head_dim=4 means 4 heads
  assert config.layers_per_block == (1, 1) and config.in_channels == 8
  assert UNetConfig.from_diffusers(config.to_diffusers()) == config
  assert UNetConfig.from_diffusers(dict(torch_model.config)) == config


def test_config_from_ml_collections_dict():
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(TINY_UNET, down_block_types=list(
      TINY_UNET["down_block_types"])))
  config = UNetConfig.from_dict(cfg)
  assert config.block_out_channels == (32, 64) and config.cross_attention_dim == (32, 32)


@pytest.mark.parametrize("field,value", [("addition_embed_type", "text_time"),
                                         ("class_embed_type", "timestep"),
                                         ("encoder_hid_dim", 16),
                                         ("time_cond_proj_dim", 8),
                                         ("dual_cross_attention", True)])
def test_unsupported_config_field_is_named(field, value):
  with pytest.raises(ValueError, match=f"{field}.*{value}.*not supported"):
    UNetConfig.from_diffusers(dict(TINY_UNET, **{field: value}))


def test_unknown_block_type_and_field_are_named():
  with pytest.raises(ValueError, match="SimpleCrossAttnDownBlock2D"):
    UNetConfig.from_diffusers(dict(TINY_UNET, down_block_types=(
        "SimpleCrossAttnDownBlock2D", "DownBlock2D")))
  with pytest.raises(ValueError, match="block_out_chanels"):
    UNetConfig.from_diffusers(dict(TINY_UNET, block_out_chanels=(32, 64)))


def test_float32_parity(tiny):
  torch_model, _, params, forward = tiny
  sample, timesteps, context = unet_inputs()
  ref = torch_forward(torch_model, sample, timesteps, context)
  out = np.asarray(forward(params, sample, timesteps, context))
  diff = np.abs(out - ref).max()
  print(f"UNet float32 parity: max abs diff {diff:.3g}, max |ref| {np.abs(ref).max():.3g}")
  assert out.shape == (BATCH, SIDE, SIDE, 4) and out.dtype == np.float32
  assert diff <= tolerance(ref)


def test_float32_parity_linear_projection(tmp_path):
  torch_model = build_torch_unet(seed=3, **TINY_UNET_LINEAR)
  torch_model.save_pretrained(str(tmp_path))
  config, params = load_unet(str(tmp_path))
  assert config.use_linear_projection and config.num_attention_heads == (2, 4)
  sample, timesteps, context = unet_inputs(seed=5)
  ref = torch_forward(torch_model, sample, timesteps, context)
  out = np.asarray(jax.jit(UNet2DConditionModel(config).apply)(params, sample, timesteps,
                                                                context))
  diff = np.abs(out - ref).max()
  print(f"UNet (linear proj) parity: max abs diff {diff:.3g}, max |ref| {np.abs(ref).max():.3g}")
  assert diff <= tolerance(ref)


def test_scalar_timestep_broadcasts(tiny):
  _, _, params, forward = tiny
  sample, _, context = unet_inputs()
  both = forward(params, sample, jnp.array([7, 7]), context)
  scalar = forward(params, sample, jnp.float32(7.0), context)
  np.testing.assert_allclose(np.asarray(scalar), np.asarray(both), atol=1e-6)


def test_bad_sample_shape_is_named(tiny):
  _, config, params, _ = tiny
  model = UNet2DConditionModel(config)
  with pytest.raises(ValueError, match=r"expected \(B, H, W, 8\) NHWC"):
    model.apply(params, jnp.zeros((1, 8, 16, 16)), jnp.zeros((1,)), jnp.zeros((1, 3, 32)))
  with pytest.raises(ValueError, match="divisible by 2"):
    model.apply(params, jnp.zeros((1, 15, 16, 8)), jnp.zeros((1,)), jnp.zeros((1, 3, 32)))


def _numpy_token_maps(x, context, attn_params, heads, token_mask):
  """Independent reference: softmax(q k^T / sqrt(d)) from the layer's params, head mean."""
  q = x.astype(np.float64) @ np.asarray(attn_params["to_q"]["kernel"], np.float64)
  k = context.astype(np.float64) @ np.asarray(attn_params["to_k"]["kernel"], np.float64)
  b, n, inner = q.shape
  d = inner // heads
  q = q.reshape(b, n, heads, d)
  k = k.reshape(b, -1, heads, d)
  scores = np.einsum("bnhd,blhd->bhnl", q, k) / np.sqrt(d)
  scores -= scores.max(-1, keepdims=True)
  probs = np.exp(scores)
  probs /= probs.sum(-1, keepdims=True)
  maps = probs.mean(1) * token_mask[:, None, :]
  side = int(round(np.sqrt(n)))
  return maps.reshape(b, side, side, -1)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_captured_maps_match_independent_softmax(tiny, captured):
  _, config, params, _ = tiny
  maps = captured["state"]["attention_maps"]
  norms = captured["state"]["intermediates"]
  paths = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(maps)[0]:
    keys = [p.key if hasattr(p, "key") else p.idx for p in path]  # sow appends to a tuple
    assert keys[-3:-1] == ["attn2", "probs"], keys
    paths.append(keys)
    block_path = keys[:-3]
    x = _get(norms, block_path + ["norm2", "__call__"])[0]
    attn_params = _get(params["params"], block_path + ["attn2"])
    heads = 4
    ref = _numpy_token_maps(np.asarray(x), captured["context"], attn_params, heads,
                            captured["token_mask"])
    assert leaf.shape == ref.shape and leaf.dtype == np.float32
    np.testing.assert_allclose(leaf, ref, atol=1e-5)
  top = sorted({p[0] for p in paths})
  assert top == ["down_blocks_0", "mid_block", "up_blocks_1"], top


def test_captured_maps_shapes_and_sum_to_one(captured):
  leaves = jax.tree_util.tree_leaves(captured["state"]["attention_maps"])
  assert sorted(leaf.shape for leaf in leaves) == [
      (BATCH, 8, 8, TOKENS)] + [(BATCH, SIDE, SIDE, TOKENS)] * 3  # down 1, mid 1, up 2
  for leaf in leaves:
    np.testing.assert_allclose(leaf[0].sum(-1), 1.0, atol=1e-5)  # all tokens, unmasked
    assert np.all(leaf[1][..., [0, 4]] == 0.0)  # masked tokens are zeroed


def test_capture_does_not_change_output(tiny, captured):
  _, _, params, forward = tiny
  sample, timesteps, context = unet_inputs()
  plain = np.asarray(forward(params, sample, timesteps, context))
  np.testing.assert_allclose(np.asarray(captured["out"]), plain, atol=1e-5)


@pytest.mark.parametrize("capture_size,expected_blocks,side", [
    (8, ["mid_block"], 8), (16, ["down_blocks_0", "up_blocks_1"], 16)])
def test_capture_size_selects_layers(tiny, capture_size, expected_blocks, side):
  _, config, params, _ = tiny
  model = UNet2DConditionModel(config)
  sample, timesteps, context = unet_inputs()
  token_index = jnp.array([[1, 2], [3, 3]], jnp.int32)
  fn = jax.jit(lambda p, s, t, c, i: model.apply(p, s, t, c, i, capture_size=capture_size,
                                                 mutable=["attention_maps"]))
  _, state = fn(params, sample, timesteps, context, token_index)
  assert sorted(state["attention_maps"]) == expected_blocks
  leaves = jax.tree_util.tree_leaves(state)
  assert all(leaf.shape == (BATCH, side, side, 2) for leaf in leaves)
  mean = collect_attention_maps(state)
  np.testing.assert_allclose(mean, np.mean(np.stack(leaves), 0), atol=1e-7)


def test_no_token_index_sows_nothing(tiny):
  _, config, params, _ = tiny
  model = UNet2DConditionModel(config)
  sample, timesteps, context = unet_inputs()
  fn = jax.jit(lambda p, s, t, c: model.apply(p, s, t, c, mutable=["attention_maps"]))
  _, state = fn(params, sample, timesteps, context)
  assert jax.tree_util.tree_leaves(state) == []
  with pytest.raises(ValueError, match="No attention maps"):
    collect_attention_maps(state)


def test_collect_attention_maps_rejects_mixed_shapes(captured):
  with pytest.raises(ValueError, match="different shapes"):
    collect_attention_maps(captured["state"])


def test_bfloat16_close_to_float32(tiny, captured):
  _, config, params, forward = tiny
  sample, timesteps, context = unet_inputs()
  ref = np.asarray(forward(params, sample, timesteps, context))
  model = UNet2DConditionModel(config, dtype=jnp.bfloat16)
  token_index = np.tile(np.arange(TOKENS, dtype=np.int32), (BATCH, 1))
  fn = jax.jit(lambda p, s, t, c, i, m: model.apply(p, s, t, c, i, m, capture_size=8,
                                                    mutable=["attention_maps"]))
  out, state = fn(params, sample, timesteps, context, token_index, captured["token_mask"])
  assert out.dtype == jnp.float32
  diff = np.abs(np.asarray(out) - ref).max()
  print(f"UNet bfloat16 vs float32: max abs diff {diff:.3g}, max |ref| {np.abs(ref).max():.3g}")
  assert diff <= tolerance(ref, rel=3e-2)
  maps = collect_attention_maps(state)
  ref_maps = jax.tree_util.tree_leaves(captured["state"]["attention_maps"]["mid_block"])[0]
  maps_diff = np.abs(np.asarray(maps) - ref_maps).max()
  print(f"UNet bfloat16 attention maps: max abs diff {maps_diff:.3g}")
  assert maps.dtype == jnp.float32 and maps_diff <= 2e-2


def test_remat_same_output_and_gradients(tiny):
  _, config, params, _ = tiny
  sample, timesteps, context = unet_inputs()

  def loss_and_grad(remat):
    model = UNet2DConditionModel(config, remat=remat)
    loss = lambda p: jnp.mean(model.apply(p, sample, timesteps, context) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  start = time.time()
  (loss_a, grad_a), (loss_b, grad_b) = loss_and_grad(False), loss_and_grad(True)
  print(f"remat grad test took {time.time() - start:.1f} s")
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grad_a), jax.tree_util.tree_leaves(grad_b)):
    np.testing.assert_allclose(a, b, atol=1e-6 * (1 + float(np.abs(a).max())))


def test_remat_keeps_attention_capture(tiny, captured):
  _, config, params, _ = tiny
  model = UNet2DConditionModel(config, remat=True)
  sample, timesteps, context = unet_inputs()
  token_index = np.tile(np.arange(TOKENS, dtype=np.int32), (BATCH, 1))
  fn = jax.jit(lambda p, s, t, c, i, m: model.apply(p, s, t, c, i, m,
                                                    mutable=["attention_maps"]))
  out, state = fn(params, sample, timesteps, context, token_index, captured["token_mask"])
  np.testing.assert_allclose(np.asarray(out), np.asarray(captured["out"]), atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(state),
                  jax.tree_util.tree_leaves(captured["state"]["attention_maps"])):
    np.testing.assert_allclose(np.asarray(a), b, atol=1e-6)


def test_attention_helpers_agree():
  rng = np.random.RandomState(9)
  q, k, v = (jnp.asarray(rng.randn(2, n, 12).astype(np.float32)) for n in (6, 5, 5))
  out, probs = attention_ops.explicit_attention(q, k, v, heads=3)
  assert out.shape == (2, 6, 12) and probs.shape == (2, 3, 6, 5)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(out, attention_ops.fused_attention(q, k, v, heads=3), atol=1e-5)
  np.testing.assert_allclose(out, attention_ops.fused_attention(q, k, v, heads=3, upcast=True),
                             atol=1e-5)


def test_token_attention_maps_selects_masks_and_averages_heads():
  rng = np.random.RandomState(2)
  probs = rng.rand(2, 3, 6, 5).astype(np.float32)  # (B, heads, N = 2 x 3, L)
  index = np.array([[4, 0], [1, 1]], np.int32)
  mask = np.array([[True, False], [True, True]])
  maps = np.asarray(attention_ops.token_attention_maps(jnp.asarray(probs), jnp.asarray(index),
                                                jnp.asarray(mask), (2, 3)))
  expected = np.stack([probs[b].mean(0)[:, index[b]] * mask[b] for b in range(2)])
  # A 3-head mean of values <= 1 in JAX and in numpy: two adds and a division each side, so
  # up to 6 roundings of 6e-8 relative (3.6e-7). Measured 6.0e-8 (1 ulp at 0.73; AMD EPYC),
  # which the old atol=1e-7 (< 2 ulps there) only just allowed. A real bug (a wrong token
  # or head, the mask not applied) is O(0.1).
  np.testing.assert_allclose(maps, expected.reshape(2, 2, 3, 2), rtol=1e-6, atol=0)
  with pytest.raises(ValueError, match="does not match 6 query positions"):
    attention_ops.token_attention_maps(jnp.asarray(probs), jnp.asarray(index), None, (3, 3))


def test_unsupported_activation_is_named():
  with pytest.raises(ValueError, match="act_fn='gelu' is not supported"):
    layers.activation("gelu")
