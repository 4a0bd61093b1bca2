"""The policy rollout: 3-way guided InstructPix2Pix sampling with per-step log-probs.

``sample_trajectory`` runs the whole T-step DDIM chain as one ``jax.lax.scan`` and records
what PPO and the rewards need: every latent of the chain, the log-prob of each step
(``ddim.ddim_step``'s DDPO convention) and the target-token cross-attention maps of the
conditional branch, reduced over heads, tokens and layers inside the scan so memory does
not grow with the number of layers.

Guidance follows diffusers' ``StableDiffusionInstructPix2PixPipeline``: one UNet call on a
3B batch ordered [text+image, image only, unconditional], with text embeddings
[instruction, "", ""], image latents [source, source, 0] concatenated after the noisy
latents on the channel axis, and
``eps = eps_uncond + s_T (eps_text - eps_image) + s_I (eps_image - eps_uncond)``.
The source latents are the VAE posterior mode, *not* multiplied by the scaling factor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from rl4pix_jax import parallel
from rl4pix_jax.diffusion import ddim
from rl4pix_jax.models import unet as unet_lib

Params = Any


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """Static sampling options (hashable: changing one recompiles).

  Attributes:
    num_steps: T, the number of DDIM steps.
    eta: DDIM eta; 1.0 gives the stochastic policy PPO needs, 0.0 a deterministic chain.
    capture_size: side (in latent-grid cells of that layer) of the cross-attention layers
      whose maps are recorded; None means latent side // 4, as Prompt-to-Prompt uses
      (16x16 maps for 64x64 latents).
    record_attention: record target-token maps (needs ``token_index`` in the conditioning).
  """
  num_steps: int = 20
  eta: float = 1.0
  capture_size: Optional[int] = None
  record_attention: bool = True

  def attention_side(self, latent_side: int) -> int:
    return self.capture_size if self.capture_size is not None else max(latent_side // 4, 1)


@flax.struct.dataclass
class Guidance:
  """Classifier-free guidance scales (traced: changing them does not recompile)."""
  text_scale: jnp.ndarray = 7.5
  image_scale: jnp.ndarray = 1.5


@flax.struct.dataclass
class EditConditioning:
  """What conditions one batch of edits.

  Attributes:
    text_embeds: (B, L, D) float, text-encoder hidden states of the instructions.
    uncond_text_embeds: (B, L, D) float, hidden states of the empty prompt "".
    image_latents: (B, h, w, c) float32, VAE posterior mode of the source images (unscaled).
    token_index: (B, K) int32 positions of the target-object tokens in the instruction.
    token_mask: (B, K) bool, which of the K positions are real (the rest is padding).
  """
  text_embeds: jnp.ndarray
  uncond_text_embeds: jnp.ndarray
  image_latents: jnp.ndarray
  token_index: Optional[jnp.ndarray] = None
  token_mask: Optional[jnp.ndarray] = None


@flax.struct.dataclass
class Trajectory:
  """One sampled chain per example.

  Attributes:
    latents: (B, T+1, h, w, c) float32, x_T (the initial noise) ... x_0; step i maps
      latents[:, i] to latents[:, i + 1].
    log_probs: (B, T) float32, log p(latents[:, i+1] | latents[:, i]) (mean over dims).
    timesteps: (T,) int32 diffusion timesteps, noisiest first.
    attention_maps: (B, T, r, r) float32 target-token cross-attention per step (or None).
    attention_map_mean: (B, r, r) float32, attention_maps averaged over steps (or None).
  """
  latents: jnp.ndarray
  log_probs: jnp.ndarray
  timesteps: jnp.ndarray
  attention_maps: Optional[jnp.ndarray] = None
  attention_map_mean: Optional[jnp.ndarray] = None

  @property
  def final_latents(self) -> jnp.ndarray:
    """(B, h, w, c) float32 x_0, in the scaled latent space of the VAE."""
    return self.latents[:, -1]


def reduce_token_maps(maps: jnp.ndarray, token_mask: jnp.ndarray) -> jnp.ndarray:
  """Averages per-token maps (B, r, r, K) over the valid tokens -> (B, r, r) float32."""
  weights = token_mask.astype(jnp.float32)
  total = jnp.einsum("bhwk,bk->bhw", maps.astype(jnp.float32), weights)
  return total / jnp.maximum(weights.sum(-1), 1.0)[:, None, None]


def cross_attention_sides(unet_config: Any, latent_side: int) -> Tuple[int, ...]:
  """Sides of the cross-attention layers of a UNet for a given latent side (largest first)."""
  sides = []
  for i, block in enumerate(unet_config.down_block_types):
    if block.startswith("CrossAttn"):
      sides.append(latent_side // 2**i)
  if unet_config.mid_block_type:
    sides.append(latent_side // 2**unet_config.num_downsamplers)
  return tuple(sorted(set(sides), reverse=True))


def guided_noise_prediction(
    unet: nn.Module,
    params: Params,
    latents: jnp.ndarray,
    timestep: jnp.ndarray,
    cond: EditConditioning,
    guidance: Guidance,
    capture_side: Optional[int] = None,
) -> Tuple[jnp.ndarray, Optional[jnp.ndarray]]:
  """3-way classifier-free guided UNet prediction for a batch of edits.

  Args:
    unet: the UNet module (8 input channels: noisy latents then image latents).
    params: its parameters (the ``params`` collection).
    latents: (B, h, w, c) scaled noisy latents x_t.
    timestep: () or (B,) int timestep (one per sample when re-scoring shuffled steps).
    cond: instruction/empty-prompt embeddings, source latents, target tokens.
    guidance: text and image guidance scales.
    capture_side: record target-token maps of the layers of this side (None: no maps).
  Returns:
    ``(eps, maps)``: guided prediction (B, h, w, c) float32, and the (B, r, r) map of the
    conditional branch (mean over heads, valid target tokens and recorded layers) or None.
  """
  batch = latents.shape[0]
  noisy = jnp.concatenate([latents] * 3, axis=0)
  image = jnp.concatenate(
      [cond.image_latents, cond.image_latents, jnp.zeros_like(cond.image_latents)], axis=0)
  unet_input = jnp.concatenate([noisy, image.astype(noisy.dtype)], axis=-1)
  text = jnp.concatenate([cond.text_embeds, cond.uncond_text_embeds, cond.uncond_text_embeds],
                         axis=0)
  t = jnp.broadcast_to(jnp.asarray(timestep), (batch,))
  t = jnp.concatenate([t, t, t], axis=0)  # per-sample timesteps allowed (PPO re-scoring)
  variables = {"params": params}
  if capture_side is None:
    out = unet.apply(variables, unet_input, t, text)
    maps = None
  else:
    if cond.token_index is None:
      raise ValueError("Attention maps were requested but the conditioning has no "
                       "token_index; pass the target-token positions or disable recording.")
    token_mask = (cond.token_mask if cond.token_mask is not None
                  else jnp.ones(cond.token_index.shape, bool))
    out, state = unet.apply(variables, unet_input, t, text,
                            token_index=jnp.concatenate([cond.token_index] * 3, axis=0),
                            token_mask=jnp.concatenate([token_mask] * 3, axis=0),
                            capture_size=capture_side, mutable=["attention_maps"])
    per_token = unet_lib.collect_attention_maps(state)[:batch]
    maps = reduce_token_maps(per_token, token_mask)
  out = out.astype(jnp.float32)
  eps_text, eps_image, eps_uncond = jnp.split(out, 3, axis=0)
  eps = (eps_uncond + guidance.text_scale * (eps_text - eps_image) +
         guidance.image_scale * (eps_image - eps_uncond))
  return eps, maps


def _latent_channels(unet: nn.Module, cond: EditConditioning) -> int:
  config = getattr(unet, "config", None)
  out_channels = getattr(config, "out_channels", None)
  return int(out_channels) if out_channels else cond.image_latents.shape[-1]


def sample_trajectory(
    unet: nn.Module,
    params: Params,
    schedule: ddim.DDIMSchedule,
    cond: EditConditioning,
    key: jax.Array,
    guidance: Guidance,
    config: SamplerConfig,
    initial_latents: Optional[jnp.ndarray] = None,
) -> Trajectory:
  """Samples a T-step guided DDIM chain for a batch of edits (wrap in ``jax.jit``).

  Args:
    unet, params: the editor UNet and its parameters.
    schedule: DDIM schedule.
    cond: conditioning of the B edits.
    key: PRNG key; split into the initial noise and one key per step.
    guidance: guidance scales.
    config: static sampler options.
    initial_latents: optional (B, h, w, c) x_T (e.g. to reproduce a given noise); drawn
      from N(0, I) with ``key`` when None.
  Returns:
    The ``Trajectory``.
  """
  batch, height, width = cond.image_latents.shape[:3]
  channels = _latent_channels(unet, cond)
  timesteps = jnp.asarray(schedule.timesteps(config.num_steps))
  prev_timesteps = timesteps - schedule.step_ratio(config.num_steps)
  init_key, steps_key = jax.random.split(key)
  if initial_latents is None:
    initial_latents = jax.random.normal(init_key, (batch, height, width, channels), jnp.float32)
  step_keys = jax.random.split(steps_key, config.num_steps)
  side = None
  if config.record_attention:
    side = config.attention_side(height)
    available = cross_attention_sides(unet.config, height)
    if side not in available:
      raise ValueError(f"SamplerConfig.capture_size={side} matches no cross-attention layer "
                       f"of this UNet for {height}x{width} latents; available sides: "
                       f"{available}.")

  def step(latents, xs):
    t, prev_t, step_key = xs
    eps, maps = guided_noise_prediction(unet, params, latents, t, cond, guidance, side)
    use_key = step_key if config.eta > 0 else None
    prev, log_prob = ddim.ddim_step(schedule, eps, t, prev_t, latents, config.eta, key=use_key)
    return prev, (prev, log_prob, maps)

  x_t = initial_latents.astype(jnp.float32)
  _, (chain, log_probs, maps) = jax.lax.scan(step, x_t, (timesteps, prev_timesteps, step_keys))
  latents = jnp.concatenate([x_t[:, None], jnp.swapaxes(chain, 0, 1)], axis=1)
  attention_maps = attention_mean = None
  if maps is not None:
    attention_maps = jnp.swapaxes(maps, 0, 1)
    attention_mean = attention_maps.mean(axis=1)
  return Trajectory(latents=latents, log_probs=jnp.swapaxes(log_probs, 0, 1),
                    timesteps=timesteps, attention_maps=attention_maps,
                    attention_map_mean=attention_mean)


def rescore_step(
    unet: nn.Module,
    params: Params,
    schedule: ddim.DDIMSchedule,
    cond: EditConditioning,
    guidance: Guidance,
    latents: jnp.ndarray,
    next_latents: jnp.ndarray,
    timestep: jnp.ndarray,
    prev_timestep: jnp.ndarray,
    eta: float,
) -> jnp.ndarray:
  """Log-prob (B,) of a stored step latents -> next_latents under the guided policy.

  The same ``guided_noise_prediction`` and ``ddim.ddim_step`` that sampled, in re-score
  mode: with unchanged params it returns the sampled log-probs (PPO ratio 1).
  """
  return rescore_step_with_maps(unet, params, schedule, cond, guidance, latents, next_latents,
                                timestep, prev_timestep, eta, None)[0]


def rescore_step_with_maps(
    unet: nn.Module,
    params: Params,
    schedule: ddim.DDIMSchedule,
    cond: EditConditioning,
    guidance: Guidance,
    latents: jnp.ndarray,
    next_latents: jnp.ndarray,
    timestep: jnp.ndarray,
    prev_timestep: jnp.ndarray,
    eta: float,
    capture_side: Optional[int],
) -> Tuple[jnp.ndarray, Optional[jnp.ndarray]]:
  """:func:`rescore_step` that also records the target-token maps of this forward pass.

  Returns ``(log_prob (B,), maps (B, r, r) float32 or None when capture_side is None)``,
  the maps as ``guided_noise_prediction`` records them while sampling.
  """
  log_prob, maps, _ = rescore_step_and_kl(unet, params, None, schedule, cond, guidance,
                                          latents, next_latents, timestep, prev_timestep, eta,
                                          capture_side)
  return log_prob, maps


def rescore_step_and_kl(
    unet: nn.Module,
    params: Params,
    reference_params: Optional[Params],
    schedule: ddim.DDIMSchedule,
    cond: EditConditioning,
    guidance: Guidance,
    latents: jnp.ndarray,
    next_latents: jnp.ndarray,
    timestep: jnp.ndarray,
    prev_timestep: jnp.ndarray,
    eta: float,
    capture_side: Optional[int],
) -> Tuple[jnp.ndarray, Optional[jnp.ndarray], Optional[jnp.ndarray]]:
  """:func:`rescore_step_with_maps` plus the step's KL to a reference policy.

  Returns ``(log_prob (B,), maps (B, r, r) or None, kl (B,) or None)``: ``kl`` is
  ``ddim.step_kl`` between this step's Gaussian under ``params`` and under
  ``reference_params`` (the same guidance; no gradient flows into the reference), None
  when ``reference_params`` is None.
  """
  eps, maps = guided_noise_prediction(unet, params, latents, timestep, cond, guidance,
                                      capture_side)
  _, log_prob = ddim.ddim_step(schedule, eps, timestep, prev_timestep, latents, eta,
                               prev_sample=next_latents)
  if reference_params is None:
    return log_prob, maps, None
  reference_eps, _ = guided_noise_prediction(
      unet, jax.lax.stop_gradient(reference_params), latents, timestep, cond, guidance, None)
  kl = ddim.step_kl(schedule, eps, jax.lax.stop_gradient(reference_eps), timestep,
                    prev_timestep, latents, eta)
  return log_prob, maps, kl


def make_trajectory_sampler(
    unet: nn.Module,
    schedule: ddim.DDIMSchedule,
    config: SamplerConfig,
    mesh: Optional[Mesh] = None,
    param_shardings: Any = None,
) -> Callable[..., Trajectory]:
  """Returns ``fn(params, cond, key, guidance, initial_latents=None) -> Trajectory``, jitted.

  With a mesh, the batch (conditioning, initial latents, every per-example output) is
  split over its batch axes (``parallel.batch_sharding``: 'data' and 'fsdp') and the params are placed as ``param_shardings`` says
  (replicated by default); the PRNG key and guidance scales are replicated. The same
  global batch and key give the same trajectory on any number of devices. With a mesh the
  returned function's ``jitted`` attribute is the jitted ``fn(params, cond, key, guidance,
  initial_latents)`` itself (initial latents required), for lowering without data.
  """

  def fn(params, cond, key, guidance, initial_latents=None):
    return sample_trajectory(unet, params, schedule, cond, key, guidance, config,
                             initial_latents)

  if mesh is None:
    return jax.jit(fn)
  replicated = parallel.replicated(mesh)
  batch = parallel.batch_sharding(mesh)
  params_sharding = replicated if param_shardings is None else param_shardings
  out = Trajectory(latents=batch, log_probs=batch, timesteps=replicated,
                   attention_maps=batch if config.record_attention else None,
                   attention_map_mean=batch if config.record_attention else None)
  jitted = jax.jit(fn, in_shardings=(params_sharding, batch, replicated, replicated, batch),
                   out_shardings=out)

  def call(params, cond, key, guidance, initial_latents=None):
    if initial_latents is None:
      # A concrete x_T keeps one compiled signature and the same noise on any mesh.
      init_key, _ = jax.random.split(key)
      shape = cond.image_latents.shape[:3] + (_latent_channels(unet, cond),)
      initial_latents = jax.random.normal(init_key, shape, jnp.float32)
    return jitted(params, cond, key, guidance, initial_latents)

  call.jitted = jitted  # lowered on abstract arguments by benchmarks/memory_plan.py
  return call
