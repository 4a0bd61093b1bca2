"""DiffusionNFT's negative-aware loss in closed form, and its jitted train step on a tiny UNet.

The step's gradient at the sampling policy is checked against an independent reference
written out here: the advantage-signed denoising loss of the guided prediction, one visited
timestep at a time, with the forward-process noise drawn as the step draws it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl4pix_jax.diffusion import ddim
from rl4pix_jax.diffusion import sampling
from rl4pix_jax.rl import nft
from rl4pix_jax.rl import ppo
from tests.rl.test_ppo import (B, SAMPLER, T, host_copy, recording_sgd,  # the PPO tests' rollout
                               tiny_rollout)

NFT = ppo.PPOConfig(trainable="full", objective="nft", nft_beta=1.0, adv_clip_max=5.0,
                    kl_weight=0.0, timestep_fraction=0.5, attention_pathwise_weight=0.0)
K = ppo.num_trained_timesteps(T, 0.5)
SGD_LR = 1e-3


def test_optimality_probability_maps_advantages_to_zero_one():
  r = nft.optimality_probability(jnp.array([-9.0, -5.0, -2.5, 0.0, 1.0, 5.0, 7.0]), 5.0)
  np.testing.assert_allclose(r, [0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0], atol=1e-7)


def test_loss_equals_its_expansion_and_is_minimised_where_the_docstring_says():
  rng = np.random.default_rng(0)
  shape = (3, 4, 4, 2)
  prediction, old, target = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
  r = np.array([1.0, 0.25, 0.5], np.float32)
  beta = 0.7
  d, e = prediction - old, old - target
  per_sample = ((e ** 2).mean((1, 2, 3)) + beta ** 2 * (d ** 2).mean((1, 2, 3))
                + 2 * beta * (2 * r - 1) * (e * d).mean((1, 2, 3))) / beta
  np.testing.assert_allclose(nft.nft_loss(prediction, old, target, r, beta),
                             per_sample.mean(), rtol=1e-5)
  grad = jax.grad(nft.nft_loss)
  # At the sampling policy: the advantage-signed denoising loss, 2 (2r - 1)(old - target).
  size = np.prod(shape[1:])
  want = 2 * (2 * r - 1)[:, None, None, None] * e / (shape[0] * size)
  np.testing.assert_allclose(grad(jnp.asarray(old), old, target, r, beta), want, atol=1e-6)
  # Minimiser: old + (2r - 1)(target - old) / beta.
  best = old + (2 * r - 1)[:, None, None, None] * (target - old) / beta
  np.testing.assert_allclose(grad(jnp.asarray(best), old, target, r, beta), 0.0, atol=1e-6)


def test_bad_objective_and_beta_are_named():
  with pytest.raises(ValueError, match="objective='dpo'"):
    ppo.PPOConfig(objective="dpo")
  with pytest.raises(ValueError, match="nft_beta=0"):
    ppo.PPOConfig(nft_beta=0.0)


@pytest.fixture(scope="module")
def setup():
  unet, params, schedule, cond, guidance, traj, batch_with = tiny_rollout()
  tx = recording_sgd(SGD_LR)
  step = nft.make_nft_train_step(unet, schedule, SAMPLER, NFT, optimizer=tx)

  def fresh_state():
    return ppo.init_train_state(jax.random.PRNGKey(0), params, NFT, optimizer=tx)[0]

  return dict(unet=unet, params=host_copy(params), schedule=schedule, traj=traj, step=step,
              batch_with=batch_with, fresh_state=fresh_state, cond=cond, guidance=guidance)


def _visits(key, clean):
  """The (B, K) positions and (K, B, h, w, c) noise the step draws from ``key``."""
  order_key, noise_key = jax.random.split(key)
  order = np.asarray(ppo.shuffled_timestep_indices(order_key, B, T, K))
  return order, jax.random.normal(noise_key, (K,) + clean.shape, jnp.float32)


def signed_denoising_loss(setup, params, visits, advantages):
  """mean over the K visits of mean_b (2 r_b - 1) |guided eps(x_t) - e|^2, written out."""
  traj, schedule = setup["traj"], setup["schedule"]
  order, noise = visits
  clean = traj.latents[:, -1]
  weight = 2 * np.clip(0.5 + np.asarray(advantages) / (2 * NFT.adv_clip_max), 0, 1) - 1
  total = 0.0
  for k in range(K):
    t = traj.timesteps[order[:, k]]  # (B,): each sample at its own visited step
    x = ddim.add_noise(schedule, clean, noise[k], t)
    eps, _ = sampling.guided_noise_prediction(setup["unet"], params, x, t, setup["cond"],
                                              setup["guidance"], None)
    total = total + jnp.mean(weight * jnp.mean((eps - noise[k]) ** 2, axis=(1, 2, 3)))
  return total / K


def test_gradient_at_the_sampling_policy_is_the_signed_denoising_gradient(setup):
  key, advantages = jax.random.PRNGKey(7), [5.0, -2.5]
  params = jax.tree.map(jnp.asarray, setup["params"])
  state, metrics = setup["step"](setup["fresh_state"](), None, setup["batch_with"](advantages),
                                 key, params)
  visits = _visits(key, setup["traj"].latents[:, -1])
  want = jax.jit(jax.grad(lambda q: signed_denoising_loss(setup, q, visits, advantages)))(params)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want))
  for got, w in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, w, rtol=1e-3, atol=1e-4 * scale)
  assert float(metrics["approx_kl"]) < 1e-9  # the policy is the sampling policy
  assert float(metrics["positive_fraction"]) == 0.5 and float(metrics["nonfinite"]) == 0.0
  # One SGD step lowers the signed loss it descends: sample 0 (r = 1) fitted, sample 1
  # (r = 0.25) pushed away.
  loss = jax.jit(lambda q: signed_denoising_loss(setup, q, visits, advantages))
  before, after = float(loss(params)), float(loss(state.params))
  assert after < before, (before, after)


def test_no_advantage_at_the_sampling_policy_gives_no_gradient(setup):
  params = jax.tree.map(jnp.asarray, setup["params"])
  _, metrics = setup["step"](setup["fresh_state"](), None, setup["batch_with"]([0.0, 0.0]),
                             jax.random.PRNGKey(7), params)
  _, signed = setup["step"](setup["fresh_state"](), None, setup["batch_with"]([5.0, -5.0]),
                            jax.random.PRNGKey(7), params)
  assert float(metrics["grad_norm"]) < 1e-4 * float(signed["grad_norm"])
  assert float(metrics["positive_fraction"]) == 0.0


def test_kl_to_the_start_needs_the_reference_and_is_zero_there(setup):
  config = ppo.PPOConfig(trainable="full", objective="nft", kl_weight=0.5,
                         timestep_fraction=0.5, attention_pathwise_weight=0.0)
  step = nft.make_nft_train_step(setup["unet"], setup["schedule"], SAMPLER, config,
                                 optimizer=recording_sgd(SGD_LR))
  params = jax.tree.map(jnp.asarray, setup["params"])
  state = lambda p: ppo.init_train_state(jax.random.PRNGKey(0), p, config,
                                         optimizer=recording_sgd(SGD_LR))[0]
  batch = setup["batch_with"]([5.0, -5.0])
  with pytest.raises(ValueError, match="KL reference"):
    step(state(params), None, batch, jax.random.PRNGKey(1), params)
  _, at_start = step(state(params), params, batch, jax.random.PRNGKey(1), params)
  moved = jax.tree.map(lambda p: p * 1.05, params)
  _, away = step(state(moved), params, batch, jax.random.PRNGKey(1), moved)
  assert float(at_start["kl"]) < 1e-6 * float(away["kl"]) and float(away["kl"]) > 0
  # The policy moved from the start but not from the sampling policy: approx_kl stays 0.
  assert float(away["approx_kl"]) < 1e-9
