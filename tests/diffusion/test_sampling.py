"""Trajectory sampler: shapes, re-scoring, compile reuse, and 1 vs 8 devices."""

import os
import subprocess
import sys

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from rl4pix_jax.diffusion import ddim
from rl4pix_jax.diffusion import sampling
from tests.helpers import tiny_models
from tests.helpers.paths import REPO_ROOT

B, SIDE, T = 2, 16, 3
CONFIG = sampling.SamplerConfig(num_steps=T, eta=1.0, capture_size=8)


def make_inputs(seed=0, batch=B):
  rng = np.random.default_rng(seed)
  cond = sampling.EditConditioning(
      text_embeds=jnp.asarray(rng.standard_normal((batch, tiny_models.TEXT_LEN, 32)), jnp.float32),
      uncond_text_embeds=jnp.asarray(rng.standard_normal((batch, tiny_models.TEXT_LEN, 32)),
                                     jnp.float32),
      image_latents=jnp.asarray(rng.standard_normal((batch, SIDE, SIDE, 4)), jnp.float32),
      token_index=jnp.tile(jnp.array([[2, 3, 0]], jnp.int32), (batch, 1)),
      token_mask=jnp.tile(jnp.array([[True, True, False]]), (batch, 1)))
  return cond


@pytest.fixture(scope="module")
def setup():
  unet = tiny_models.tiny_unet()
  params = tiny_models.tiny_unet_params()
  schedule = ddim.DDIMSchedule.from_config(ddim.default_scheduler_config())
  sampler = sampling.make_trajectory_sampler(unet, schedule, CONFIG)
  cond = make_inputs()
  traj = sampler(params, cond, jax.random.PRNGKey(7), sampling.Guidance())
  return unet, params, schedule, sampler, cond, traj


def test_trajectory_shapes_and_values(setup):
  _, _, schedule, _, _, traj = setup
  assert traj.latents.shape == (B, T + 1, SIDE, SIDE, 4)
  assert traj.log_probs.shape == (B, T)
  np.testing.assert_array_equal(traj.timesteps, schedule.timesteps(T))
  assert traj.attention_maps.shape == (B, T, 8, 8)
  assert traj.attention_map_mean.shape == (B, 8, 8)
  assert np.isfinite(np.asarray(traj.log_probs)).all()
  assert (np.asarray(traj.attention_maps) >= 0).all()
  np.testing.assert_allclose(traj.attention_map_mean, traj.attention_maps.mean(1), rtol=1e-6)
  np.testing.assert_array_equal(traj.final_latents, traj.latents[:, -1])


def test_rescoring_reproduces_sampled_log_probs(setup):
  unet, params, schedule, _, cond, traj = setup
  rescore = jax.jit(lambda p, x, nx, t, pt: sampling.rescore_step(
      unet, p, schedule, cond, sampling.Guidance(), x, nx, t, pt, CONFIG.eta))
  ratio = schedule.step_ratio(T)
  for i in range(T):
    t = traj.timesteps[i]
    log_prob = rescore(params, traj.latents[:, i], traj.latents[:, i + 1], t, t - ratio)
    np.testing.assert_allclose(log_prob, traj.log_probs[:, i], atol=1e-4)
    np.testing.assert_allclose(np.exp(log_prob - traj.log_probs[:, i]), 1.0, atol=1e-4)


def test_rescoring_with_maps_reproduces_the_recorded_maps(setup):
  unet, params, schedule, _, cond, traj = setup
  side = CONFIG.attention_side(SIDE)
  rescore = jax.jit(lambda p, x, nx, t, pt: sampling.rescore_step_with_maps(
      unet, p, schedule, cond, sampling.Guidance(), x, nx, t, pt, CONFIG.eta, side))
  i = T - 1
  t = traj.timesteps[i]
  log_prob, maps = rescore(params, traj.latents[:, i], traj.latents[:, i + 1], t,
                           t - schedule.step_ratio(T))
  np.testing.assert_allclose(log_prob, traj.log_probs[:, i], atol=1e-4)
  np.testing.assert_allclose(maps, traj.attention_maps[:, i], rtol=1e-4, atol=1e-6)
  _, no_maps = sampling.rescore_step_with_maps(
      unet, params, schedule, cond, sampling.Guidance(), traj.latents[:, i],
      traj.latents[:, i + 1], t, t - schedule.step_ratio(T), CONFIG.eta, None)
  assert no_maps is None


def test_same_key_same_trajectory_and_no_recompile(setup):
  _, params, _, sampler, cond, traj = setup
  again = sampler(params, cond, jax.random.PRNGKey(7), sampling.Guidance(7.5, 1.5))
  np.testing.assert_array_equal(again.latents, traj.latents)
  other = sampler(params, make_inputs(seed=1), jax.random.PRNGKey(8), sampling.Guidance(3.0, 1.0))
  assert not np.allclose(other.latents, traj.latents)
  # Same shapes, new values and guidance scales: one compiled executable.
  assert sampler._cache_size() == 1  # pylint: disable=protected-access


def test_guidance_is_instructpix2pix_three_way(setup):
  unet, params, _, _, cond, _ = setup
  x = jnp.asarray(np.random.default_rng(3).standard_normal((B, SIDE, SIDE, 4)), jnp.float32)
  guidance = sampling.Guidance(5.0, 2.0)
  eps, maps = sampling.guided_noise_prediction(unet, params, x, 501, cond, guidance, None)
  assert maps is None
  variables = {"params": params}
  t = jnp.full((B,), 501)
  run = lambda text, image: unet.apply(variables, jnp.concatenate([x, image], -1), t, text)
  e_text = run(cond.text_embeds, cond.image_latents)
  e_image = run(cond.uncond_text_embeds, cond.image_latents)
  e_uncond = run(cond.uncond_text_embeds, jnp.zeros_like(cond.image_latents))
  want = e_uncond + 5.0 * (e_text - e_image) + 2.0 * (e_image - e_uncond)
  np.testing.assert_allclose(eps, want, atol=1e-4)


def test_bad_capture_size_is_named(setup):
  unet, params, schedule, _, cond, _ = setup
  config = sampling.SamplerConfig(num_steps=2, capture_size=5)
  with pytest.raises(ValueError, match="capture_size=5"):
    sampling.sample_trajectory(unet, params, schedule, cond, jax.random.PRNGKey(0),
                               sampling.Guidance(), config)


def test_reduce_token_maps_masks_padding():
  maps = jnp.stack([jnp.full((1, 2, 2), 1.0), jnp.full((1, 2, 2), 3.0),
                    jnp.full((1, 2, 2), 100.0)], axis=-1)
  out = sampling.reduce_token_maps(maps, jnp.array([[True, True, False]]))
  np.testing.assert_allclose(out, np.full((1, 2, 2), 2.0))


EIGHT_DEVICE_SCRIPT = """
import sys, numpy as np, jax
from jax.sharding import Mesh
sys.path.insert(0, {root!r})
from rl4pix_jax.diffusion import ddim
from rl4pix_jax.diffusion import sampling
from tests.diffusion import test_sampling as ts
from tests.helpers import tiny_models
assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()).reshape(8, 1), ("data", "fsdp"))
schedule = ddim.DDIMSchedule.from_config(ddim.default_scheduler_config())
sampler = sampling.make_trajectory_sampler(tiny_models.tiny_unet(), schedule, ts.CONFIG, mesh)
traj = sampler(tiny_models.tiny_unet_params(), ts.make_inputs(batch=8), jax.random.PRNGKey(7),
               sampling.Guidance())
assert len(traj.latents.sharding.device_set) == 8
np.savez({out!r}, latents=traj.latents, log_probs=traj.log_probs, maps=traj.attention_maps)
"""


def test_one_device_equals_eight_devices(setup, tmp_path):
  unet, params, schedule, _, _, _ = setup
  root = REPO_ROOT
  out = str(tmp_path / "eight.npz")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
  subprocess.run([sys.executable, "-c", EIGHT_DEVICE_SCRIPT.format(root=root, out=out)],
                 check=True, env=env, cwd=root, timeout=600)
  eight = np.load(out)
  one = sampling.make_trajectory_sampler(unet, schedule, CONFIG)(
      params, make_inputs(batch=8), jax.random.PRNGKey(7), sampling.Guidance())
  # Not bitwise: XLA:CPU picks other convolution kernels for a per-device batch of 1 than
  # for 8, so float32 rounding differs, by how much depending on the host's kernels. An
  # element's error scales with the whole latent's size, not with that element: each step's
  # UNet rounding (~1e-6 of its output scale) is amplified by the three-way guidance (up to
  # 1 + 2 x 7.5 + 2 x 1.5 = 19x) and by pred_x0's sqrt(1 - alpha_t) / sqrt(alpha_t) (2.9 at
  # t = 667), over 3 steps: ~1e-4 of the largest |latent| (3.3e-3 here), on top of
  # rtol=1e-4. Measured 8.0e-5 at max |latent| 33 (AMD EPYC), at an element near 0 where
  # the old per-element atol=1e-4 left 1.7x headroom. A real bug (a shard's noise key or
  # guidance wrong, samples swapped across devices) moves latents by O(1).
  np.testing.assert_allclose(eight["latents"], one.latents, rtol=1e-4,
                             atol=1e-4 * float(np.abs(one.latents).max()))
  np.testing.assert_allclose(eight["log_probs"], one.log_probs, rtol=1e-4, atol=1e-3)
  np.testing.assert_allclose(eight["maps"], one.attention_maps, rtol=1e-4, atol=1e-5)
