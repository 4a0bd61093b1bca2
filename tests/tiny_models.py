"""Tiny model configs and deterministic random parameters shared by the tests."""

import jax
import jax.numpy as jnp

from rl4pix_jax.models import unet as unet_lib

# Two cross-attention sides (16 and the 8x8 mid block for 16x16 latents), 8 input channels.
TINY_UNET = dict(
    in_channels=8, out_channels=4, sample_size=16,
    block_out_channels=[32, 64], layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
TEXT_LEN = 8


def tiny_unet(dtype=jnp.float32):
  return unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.from_diffusers(TINY_UNET), dtype=dtype)


def tiny_unet_params(seed: int = 0, batch: int = 1, side: int = 16):
  """Random params (flax default init, perturbed so that no output layer is zero)."""
  model = tiny_unet()
  variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((batch, side, side, 8)),
                         jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, TEXT_LEN, 32)))
  leaves, treedef = jax.tree_util.tree_flatten(variables["params"])
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  leaves = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, leaves)
