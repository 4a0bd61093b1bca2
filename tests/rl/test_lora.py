"""LoRA: targets, zero-up identity, merge equals the activation-side low-rank update, size."""

import re

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl4pix_jax.models import layers
from rl4pix_jax.rl import lora
from tests.helpers import tiny_models

DIM, CONTEXT, TOKENS, TEXT = 16, 8, 6, 5


@pytest.fixture(scope="module")
def unet_param_shapes():
  """The tiny UNet's param tree as ShapeDtypeStructs (no compile, no compute)."""
  model = tiny_models.tiny_unet()
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 8)),
                        jnp.zeros((1,), jnp.int32), jnp.zeros((1, tiny_models.TEXT_LEN, 32))
                        )["params"]


@pytest.fixture(scope="module")
def block():
  """A UNet transformer block (attn1 + attn2 + ff) with random params and inputs."""
  module = layers.BasicTransformerBlock(heads=2, head_dim=8)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, TOKENS, DIM)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((2, TEXT, CONTEXT)), jnp.float32)
  params = module.init(jax.random.PRNGKey(0), x, context)["params"]
  apply = jax.jit(lambda p: module.apply({"params": p}, x, context))
  return module, params, x, context, apply


def test_default_targets_are_the_unet_attention_projections(unet_param_shapes):
  params = unet_param_shapes
  paths = lora.lora_target_paths(params)
  # The tiny UNet has 4 transformer blocks (down 0, mid, up 1 x2), each 2 attentions x 4.
  assert len(paths) == 4 * 2 * 4
  assert all(re.search(r"attn[12]/to_(q|k|v|out_0)/kernel$", p) for p in paths)
  every_path = ["/".join(k) for k in traverse_util.flatten_dict(params)]
  expected = sorted(p for p in every_path if re.search(r"attn[12]/to_(q|k|v|out_0)/kernel$", p))
  assert paths == expected


def test_zero_up_keeps_outputs_identical(block):
  _, params, _, _, apply = block
  adapters = lora.init_lora(jax.random.PRNGKey(1), params, rank=2)
  down = adapters["attn1"]["to_q"]["kernel"]["down"]
  assert down.shape == (DIM, 2)
  np.testing.assert_allclose(np.std(down), 1 / 2, rtol=0.5)  # std 1/rank (16x2 draws)
  assert all(float(jnp.abs(leaf).max()) == 0 for path, leaf in
             jax.tree_util.tree_flatten_with_path(adapters)[0] if path[-1].key == "up")
  merged = lora.merge_lora(params, adapters, alpha=4.0)
  np.testing.assert_array_equal(apply(merged), apply(params))


def test_merged_params_equal_the_low_rank_update_applied_by_hand(block):
  module, params, x, context, apply = block
  rank, alpha = 2, 3.0
  adapters = lora.init_lora(jax.random.PRNGKey(1), params, rank=rank)
  adapters = jax.tree.map(  # non-zero up, so the update is visible
      lambda a: a + 0.3 * jax.random.normal(jax.random.PRNGKey(a.size), a.shape), adapters)
  merged_out = apply(jax.jit(lambda p, a: lora.merge_lora(p, a, alpha))(params, adapters))

  # Reference: leave the kernels alone and add (x @ down) @ up * alpha / r to each adapted
  # Dense layer's output, via a flax method interceptor.
  def add_low_rank(next_fun, args, kwargs, context_):
    out = next_fun(*args, **kwargs)
    module_path = context_.module.scope.path
    if context_.method_name != "__call__" or not isinstance(context_.module, nn.Dense):
      return out
    node = adapters
    for name in module_path + ("kernel",):
      node = node.get(name) if isinstance(node, dict) else None
      if node is None:
        return out
    return out + (args[0] @ node["down"]) @ node["up"] * (alpha / rank)

  with nn.intercept_methods(add_low_rank):
    reference = module.apply({"params": params}, x, context)
  assert not np.allclose(merged_out, apply(params), atol=1e-3)
  np.testing.assert_allclose(merged_out, reference, rtol=1e-5, atol=1e-5)


def test_trainable_tree_is_small(unet_param_shapes):
  params = unet_param_shapes
  rank = 4
  adapters = lora.init_lora(jax.random.PRNGKey(0), params, rank=rank)
  flat = traverse_util.flatten_dict(params)
  want = sum(rank * (flat[tuple(p.split("/"))].shape[0] + flat[tuple(p.split("/"))].shape[1])
             for p in lora.lora_target_paths(params))
  assert lora.param_count(adapters) == want
  assert lora.param_count(adapters) < 0.02 * lora.param_count(params)


def test_bad_targets_are_named(block):
  _, params, _, _, _ = block
  with pytest.raises(ValueError, match="matches no parameter"):
    lora.init_lora(jax.random.PRNGKey(0), params, 2, target_regex=r"nothing_here")
  with pytest.raises(ValueError, match="2-D Dense kernels"):
    lora.init_lora(jax.random.PRNGKey(0), params, 2, target_regex=r"bias$")
  with pytest.raises(ValueError, match="rank"):
    lora.init_lora(jax.random.PRNGKey(0), params, 0)
  with pytest.raises(ValueError, match="do not have"):
    lora.merge_lora({"other": params["ff"]},
                    lora.init_lora(jax.random.PRNGKey(0), params, 2), 1.0)
