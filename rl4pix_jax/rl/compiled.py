"""The jitted functions of an RL epoch: encode, sample, decode, reward, policy merge, PPO step.

``compile_epoch_functions`` builds them once per run, with the shardings of the placed policy
(``train_state.place_policy``); the epoch loop (``trainer.train``) only calls them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from rl4pix_jax import parallel, pipeline
from rl4pix_jax.diffusion import sampling
from rl4pix_jax.rewards import RewardInputs, make_reward_fn
from rl4pix_jax.rewards.reference import reference_attention_maps
from rl4pix_jax.rl import nft, ppo
from rl4pix_jax.rl.run_setup import RLSetup
from rl4pix_jax.rl.train_state import PlacedPolicy, replicate
from rl4pix_jax.tokenizer import tokenize


def sampler_config_from(config: ml_collections.ConfigDict) -> sampling.SamplerConfig:
  capture = config.sampler.capture_size
  return sampling.SamplerConfig(num_steps=config.sampler.num_steps, eta=config.sampler.eta,
                                capture_size=capture if capture else None,
                                record_attention=True)


def reward_with_map_gradient(reward_fn: Callable) -> Callable:
  """``reward_fn(clip_params, inputs) -> (reward, parts)`` -> a function that also returns
  d(sum of rewards) / d(inputs.attention_maps), (B, T, r, r) float32: the cotangents of
  ``ppo.attention_pathwise_weight``."""

  def fn(clip_params, inputs: RewardInputs):
    def total(maps):
      reward, parts = reward_fn(clip_params, inputs.replace(attention_maps=maps))
      return jnp.sum(reward), (reward, parts)
    gradient, (reward, parts) = jax.grad(total, has_aux=True)(inputs.attention_maps)
    return reward, parts, gradient

  return fn


def ppo_step_config(config: ml_collections.ConfigDict) -> ppo.PPOConfig:
  """The train step's ``PPOConfig``: ``config.ppo``, with the pathwise term switched off (and
  a warning) when there is no attention reward to differentiate or the objective is "nft"
  (its loss has no per-step maps of the sampled chain to differentiate)."""
  step_config = ppo.PPOConfig.from_config(config.ppo)
  if step_config.pathwise and step_config.objective == "nft":
    logging.warning("ppo.attention_pathwise_weight=%g is inactive with ppo.objective='nft' "
                    "(the attention reward enters through the advantages only).",
                    step_config.attention_pathwise_weight)
    step_config = dataclasses.replace(step_config, attention_pathwise_weight=0.0)
  if step_config.pathwise and config.reward.attention_weight == 0:
    logging.warning("ppo.attention_pathwise_weight=%g is inactive: reward.attention_weight is "
                    "0, so there is no attention reward to differentiate.",
                    step_config.attention_pathwise_weight)
    step_config = dataclasses.replace(step_config, attention_pathwise_weight=0.0)
  return step_config


@dataclasses.dataclass
class EpochFunctions:
  """What an epoch calls.

  Attributes:
    frozen_params: text encoder and VAE params, replicated (the UNet is not needed there).
    clip_params: the reward CLIP's params, replicated, or None.
    encode: (frozen_params, arrays) -> ``sampling.EditConditioning``, split like the batch.
    sampler: (unet params, cond, key, guidance) -> trajectory.
    decode: (frozen_params, latents) -> images in [0, 1], split like the batch.
    reward_fn: (clip_params, inputs) -> (reward, parts, map gradient or None).
    policy: (trainable, frozen base) -> the policy UNet params (LoRA merged).
    train_step: (state, frozen, minibatch, key) -> (state, metrics) for ppo.objective "ppo";
      (state, frozen, minibatch, key, old trainable params) for "nft".
    step_config: the ``ppo.PPOConfig`` the step was built with.
    reference: (initial unet, cond, key) -> reference attention maps, or None when the reward
      does not use the "reference" attention region.
  """
  frozen_params: Any
  clip_params: Any
  encode: Callable
  sampler: Callable
  decode: Callable
  reward_fn: Callable
  policy: Callable
  train_step: Callable
  step_config: ppo.PPOConfig
  reference: Optional[Callable]


def compile_epoch_functions(config: ml_collections.ConfigDict, setup: RLSetup,
                            mesh: jax.sharding.Mesh, placed: PlacedPolicy,
                            sampler_config: sampling.SamplerConfig,
                            guidance: sampling.Guidance) -> EpochFunctions:
  """Builds the jitted functions of an epoch (see ``EpochFunctions``)."""
  models, tokenizer = setup.models, setup.tokenizer
  split = parallel.batch_sharding(mesh)
  # Text encoder and VAE (the UNet is not needed there), replicated on the global mesh.
  frozen_params = replicate(setup.params.replace(unet={}), mesh)
  sampler = sampling.make_trajectory_sampler(models.unet, models.schedule, sampler_config, mesh,
                                             param_shardings=placed.unet_shardings)
  step_config = ppo_step_config(config)
  make_step = nft.make_nft_train_step if step_config.objective == "nft" else ppo.make_train_step
  train_step = make_step(models.unet, models.schedule, sampler_config, step_config, mesh,
                         state_shardings=placed.state_shardings,
                         frozen_shardings=placed.frozen_shardings)
  # reward_fn(clip_params, inputs) -> (reward, parts, map gradient or None)
  combined = make_reward_fn(config.reward, setup.clip_text_model, setup.clip_vision_model)
  reward_fn = jax.jit(reward_with_map_gradient(combined) if step_config.pathwise
                      else lambda clip_params, inputs: (*combined(clip_params, inputs), None))
  policy = jax.jit(lambda trainable, base: ppo.policy_params(trainable, base, config.ppo),
                   in_shardings=(placed.state_shardings.params, placed.frozen_shardings),
                   out_shardings=placed.unet_shardings)
  uncond_ids = jnp.asarray(tokenize(tokenizer, [""]))

  def encode_fn(params, arrays):
    batch = arrays["input_ids"].shape[0]
    uncond = pipeline.encode_text(models, params, uncond_ids)
    return sampling.EditConditioning(
        text_embeds=pipeline.encode_text(models, params, arrays["input_ids"]),
        uncond_text_embeds=jnp.broadcast_to(uncond, (batch,) + uncond.shape[1:]),
        image_latents=pipeline.encode_images(models, params, arrays["source"]),
        token_index=arrays["token_index"], token_mask=arrays["token_mask"])

  # Per-example outputs split like the batch (the sampler's in_shardings expect that).
  encode = jax.jit(encode_fn, out_shardings=split)
  clip_params = None if setup.clip_params is None else replicate(setup.clip_params, mesh)
  decode = jax.jit(lambda params, latents: pipeline.decode_latents(models, params, latents),
                   out_shardings=split)
  use_reference = (config.reward.attention_weight != 0
                   and config.reward.attention_region == "reference")
  reference = None
  if use_reference:
    # The initial UNet is an argument (the placed unet_params), not a closed-over constant:
    # a closure would embed every weight in the compiled program.
    reference = jax.jit(lambda unet, cond, key: reference_attention_maps(
        models.unet, unet, models.schedule, cond, key, sampler_config, guidance,
        scaling_factor=models.vae_scaling_factor,
        last_steps=config.reward.attention_last_steps))
  return EpochFunctions(frozen_params=frozen_params, clip_params=clip_params, encode=encode,
                        sampler=sampler, decode=decode, reward_fn=reward_fn, policy=policy,
                        train_step=train_step, step_config=step_config, reference=reference)
