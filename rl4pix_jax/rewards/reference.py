"""Reference regions: the attention of a frozen copy of the initial editor on the source image.

The "reference" target region needs no mask: it is where the *initial* model looks for the
object tokens when it sees the source image. The paper does not say how it is computed; our
choice (deterministic for a given key):

  1. x_0 = source latents * scaling_factor (``cond.image_latents`` is the unscaled VAE
     posterior mode, as everywhere in ``sampling``);
  2. for each of the sampler's timesteps t_i (the last k only if ``last_steps`` = k > 0, to
     match the steps the attention reward counts), x_{t_i} = ``ddim.add_noise``(x_0, n_i, t_i)
     with n_i ~ N(0, I) drawn from ``key`` as one (S, B, h, w, c) array (so the noise of an
     example depends on the key *and* the batch size);
  3. one ``sampling.guided_noise_prediction`` per step (the same 3-way call the sampler makes)
     with ``capture_side`` = the sampler's attention side; the maps of the conditional
     branch, averaged over the S steps, are the region (B, r, r).

The guidance scales do not change the maps (they are read from the text+image branch before
guidance); ``guidance`` is passed only because the call computes the guided prediction too.
The trainer computes this once per example and caches it by example index.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from rl4pix_jax.diffusion import ddim
from rl4pix_jax.diffusion import sampling


def reference_attention_maps(
    unet: Any,
    frozen_params: Any,
    schedule: ddim.DDIMSchedule,
    cond: sampling.EditConditioning,
    key: jax.Array,
    sampler_config: sampling.SamplerConfig,
    guidance: sampling.Guidance,
    *,
    scaling_factor: float,
    last_steps: int = 0,
) -> jnp.ndarray:
  """Reference attention region of the target tokens on the (noised) source image.

  Args:
    unet: the editor UNet module.
    frozen_params: the parameters of the *initial* model (never the trained ones).
    schedule: the DDIM schedule.
    cond: conditioning of the B edits; ``token_index`` (and ``token_mask``) are required.
    key: PRNG key of the forward-process noise.
    sampler_config: the policy's sampler options (steps and attention side are read).
    guidance: guidance scales (no effect on the maps; see the module docstring).
    scaling_factor: the VAE's latent scaling factor (``VAEConfig.scaling_factor``).
    last_steps: 0 uses every sampler timestep, k the last k (``c.reward.attention_last_steps``).
  Returns:
    (B, r, r) float32 mean target-token attention, r = ``sampler_config.attention_side(h)``.
  Raises:
    ValueError: no ``token_index``, an attention side that matches no cross-attention layer,
      or ``last_steps`` outside 0..T.
  """
  if cond.token_index is None:
    raise ValueError("reference_attention_maps needs cond.token_index (the target-object "
                     "token positions in the instruction).")
  batch, height, width, channels = cond.image_latents.shape
  side = sampler_config.attention_side(height)
  available = sampling.cross_attention_sides(unet.config, height)
  if side not in available:
    raise ValueError(f"SamplerConfig.capture_size={side} matches no cross-attention layer of "
                     f"this UNet for {height}x{width} latents; available sides: {available}.")
  timesteps = schedule.timesteps(sampler_config.num_steps)
  last_steps = int(last_steps)
  if not 0 <= last_steps <= len(timesteps):
    raise ValueError(f"last_steps={last_steps} must be between 0 (all) and the number of "
                     f"sampler steps {len(timesteps)}.")
  if last_steps:
    timesteps = timesteps[len(timesteps) - last_steps:]
  timesteps = jnp.asarray(timesteps)
  noise = jax.random.normal(key, (len(timesteps), batch, height, width, channels), jnp.float32)
  clean = cond.image_latents.astype(jnp.float32) * scaling_factor

  def step(total, xs):
    t, step_noise = xs
    noisy = ddim.add_noise(schedule, clean, step_noise, jnp.full((batch,), t))
    _, maps = sampling.guided_noise_prediction(unet, frozen_params, noisy, t, cond, guidance,
                                               side)
    return total + maps, None

  total, _ = jax.lax.scan(step, jnp.zeros((batch, side, side), jnp.float32),
                          (timesteps, noise))
  return total / len(timesteps)
