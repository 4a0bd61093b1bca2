"""Negative-aware fine-tuning (DiffusionNFT, arXiv 2509.16117): RL in the denoising loss.

The likelihood-free alternative to the PPO step (``ppo.objective = "nft"``). It needs no
per-step log-probs, only each sample's clean final latents x_0 and its advantage:

1. The advantage becomes an optimality probability r = 1/2 + A / (2 adv_clip_max), clipped
   to [0, 1] (:func:`optimality_probability`): r = 1 for the best samples of a group, 0 for
   the worst, 1/2 for a zero advantage (a group without reward spread).
2. x_0 is noised by the forward process at a trained timestep t: x_t = sqrt(a_t) x_0 +
   sqrt(1 - a_t) e, and the guided prediction of the current policy ``p`` and of the
   sampling policy ``p_old`` (the params of the epoch start, no gradient) are evaluated on it,
   with the same 3-way guidance that sampled.
3. Two implicit policies share the weights: positive p+ = (1 - beta) p_old + beta p,
   negative p- = (1 + beta) p_old - beta p. The loss is
   ``mean_b [r_b |p+ - target|^2 + (1 - r_b) |p- - target|^2] / beta``, per-dimension means,
   with the training target of the schedule (e for epsilon-prediction).

Expanding it, with d = p - p_old and e = p_old - target, the loss is
``(|e|^2 + beta^2 |d|^2 + 2 beta (2r - 1) <e, d>) / beta`` (per dimension). At p = p_old its
gradient with respect to p is 2 (2r - 1) (p_old - target): the denoising loss of the sample,
signed by its advantage, so better samples are fitted and worse ones pushed away; its
minimiser is p = p_old + (2r - 1)(target - p_old) / beta, so beta sets how far one epoch may
move the policy (the trust region; beta = 1 in the paper's runs). Within a group the signed
weights sum to about 0, so the part of the denoising error all samples of a prompt share
cancels: only what tells the better samples from the worse ones is learnt.

The visited timesteps are those of the sampler's schedule, drawn per sample as in the PPO step
(``ppo.train_window``, ``timestep_fraction``), and the gradients are accumulated in one
``lax.scan`` and applied in one optax update (``ppo.apply_gradients``: non-finite updates are
skipped). With ``kl_weight`` > 0 the loss adds ``kl_weight x`` the closed-form KL between the
DDIM step of the policy and of the starting policy at (x_t, t) (``ddim.step_kl``, the PPO
step's unit), deterministic steps excluded.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from rl4pix_jax.diffusion import ddim
from rl4pix_jax.diffusion import sampling
from rl4pix_jax.rl import ppo

Params = Any
METRICS = ("loss", "approx_kl", "kl", "positive_fraction")


def optimality_probability(advantages: jnp.ndarray, adv_clip_max: float) -> jnp.ndarray:
  """r = clip(1/2 + A / (2 adv_clip_max), 0, 1), float32, the shape of ``advantages``."""
  adv = jnp.asarray(advantages, jnp.float32)
  return jnp.clip(0.5 + adv / (2.0 * adv_clip_max), 0.0, 1.0)


def nft_loss(prediction: jnp.ndarray, old_prediction: jnp.ndarray, target: jnp.ndarray,
             optimality: jnp.ndarray, beta: float) -> jnp.ndarray:
  """The negative-aware loss of a batch (module docstring), a float32 scalar.

  Args:
    prediction: (B, ...) float, the current policy's (guided) prediction at x_t.
    old_prediction: (B, ...) float, the sampling policy's at the same x_t (held constant).
    target: (B, ...) float, the training target at x_t (the noise, for epsilon-prediction).
    optimality: (B,) float in [0, 1], r of each sample (:func:`optimality_probability`).
    beta: > 0, the weight of the current policy in the implicit positive policy.
  """
  prediction = jnp.asarray(prediction, jnp.float32)
  old = jax.lax.stop_gradient(jnp.asarray(old_prediction, jnp.float32))
  target = jnp.asarray(target, jnp.float32)
  axes = tuple(range(1, prediction.ndim))
  positive = (1.0 - beta) * old + beta * prediction
  negative = (1.0 + beta) * old - beta * prediction
  positive_error = jnp.mean((positive - target) ** 2, axis=axes)
  negative_error = jnp.mean((negative - target) ** 2, axis=axes)
  r = jnp.asarray(optimality, jnp.float32)
  return jnp.mean(r * positive_error + (1.0 - r) * negative_error) / beta


def nft_gradients(unet: Any, schedule: ddim.DDIMSchedule, sampler_config: sampling.SamplerConfig,
                  ppo_config: Any, trainable_params: Params, frozen_params: Optional[Params],
                  old_params: Params, batch: ppo.PPOBatch, key: jax.Array
                  ) -> Tuple[Params, Dict[str, jnp.ndarray]]:
  """Mean NFT gradient over a minibatch's visited timesteps, in one ``lax.scan`` (jit it).

  Args:
    unet, schedule, sampler_config: as ``ppo.ppo_gradients``.
    ppo_config: ``PPOConfig`` (``nft_beta``, ``adv_clip_max``, ``kl_weight``, the window).
    trainable_params: the trainable tree ("full": UNet params; "lora": LoRA tree).
    frozen_params: the LoRA base ("lora") or None ("full"); with kl_weight > 0 the KL
      reference (for "full": the initial UNet).
    old_params: the trainable tree of the sampling policy (the epoch's start).
    batch: a ``ppo.PPOBatch``; only ``latents[:, -1]`` (x_0), ``advantages``, ``cond``,
      ``timesteps`` and ``guidance`` are read.
    key: PRNG key: the per-sample timestep permutations and the forward-process noise.

  Returns:
    ``(grads, metrics)``: float32 grads of the loss averaged over the K visited positions;
    metrics ``loss``, ``approx_kl`` (mean DDIM-step KL of the policy to the sampling policy
    at the noised latents), ``kl`` (to the starting policy; 0 when kl_weight is 0) and
    ``positive_fraction`` (share of samples with r > 1/2), float32 scalars.
  """
  c = ppo.PPOConfig.from_config(ppo_config)
  batch_size, num_steps = batch.log_probs.shape
  step_ratio = schedule.step_ratio(num_steps)
  order_key, noise_key = jax.random.split(key)
  order = ppo.visited_positions(order_key, c, batch_size, num_steps)  # (B, K)
  if c.kl_weight > 0 and frozen_params is None:
    raise ValueError("ppo.kl_weight > 0 needs the reference UNet params as frozen_params.")
  clean = batch.latents[:, -1]
  optimality = optimality_probability(batch.advantages, c.adv_clip_max)
  old_unet = jax.lax.stop_gradient(ppo.policy_params(old_params, frozen_params, c))
  # The starting policy: the LoRA base, or the initial UNet for "full".
  reference_unet = None if c.kl_weight == 0 else jax.lax.stop_gradient(frozen_params)

  def predict(unet_params, noisy, timestep):
    return sampling.guided_noise_prediction(unet, unet_params, noisy, timestep, batch.cond,
                                            batch.guidance, None)[0]

  def loss_at(params, inputs):
    index, noise = inputs
    timestep = batch.timesteps[index]  # (B,)
    noisy = ddim.add_noise(schedule, clean, noise, timestep)
    target = ddim.training_target(schedule, clean, noise, timestep)
    prediction = predict(ppo.policy_params(params, frozen_params, c), noisy, timestep)
    old = jax.lax.stop_gradient(predict(old_unet, noisy, timestep))
    loss = nft_loss(prediction, old, target, optimality, c.nft_beta)
    stochastic = ddim.is_stochastic(schedule, timestep, timestep - step_ratio,
                                    sampler_config.eta)
    step_kl = lambda other: jnp.where(stochastic, ddim.step_kl(
        schedule, prediction, other, timestep, timestep - step_ratio, noisy,
        sampler_config.eta), 0.0)
    metrics = {"approx_kl": jax.lax.stop_gradient(jnp.mean(step_kl(old))),
               "kl": jnp.zeros((), jnp.float32),
               "positive_fraction": jnp.mean((optimality > 0.5).astype(jnp.float32))}
    if reference_unet is not None:
      kl = jnp.mean(step_kl(jax.lax.stop_gradient(predict(reference_unet, noisy, timestep))))
      metrics["kl"] = jax.lax.stop_gradient(kl)
      loss = loss + c.kl_weight * kl
    metrics["loss"] = jax.lax.stop_gradient(loss)
    return loss, metrics

  noise = jax.random.normal(noise_key, (order.shape[1],) + clean.shape, jnp.float32)
  return ppo.mean_gradient_over_visits(loss_at, trainable_params, (order.T, noise), METRICS)


def make_nft_train_step(
    unet: Any,
    schedule: ddim.DDIMSchedule,
    sampler_config: sampling.SamplerConfig,
    ppo_config: Any,
    mesh: Optional[Mesh] = None,
    state_shardings: Optional[ppo.TrainState] = None,
    frozen_shardings: Any = None,
    optimizer: Optional[optax.GradientTransformation] = None,
) -> Callable[..., Tuple[ppo.TrainState, Dict[str, jnp.ndarray]]]:
  """The jitted ``train_step(state, frozen, batch, key, old_params) -> (state, metrics)``.

  One call = one NFT minibatch update; the arguments are those of ``ppo.make_train_step``
  plus ``old_params``, the trainable tree of the sampling policy (placed like
  ``state.params``; copy it at the epoch's start, as the state is donated). Metrics:
  :data:`METRICS` and ``grad_norm``, ``nonfinite``, ``nonfinite_count``.
  """
  c = ppo.PPOConfig.from_config(ppo_config)
  tx = ppo.make_optimizer(c) if optimizer is None else optimizer

  def train_step(state, frozen_unet_params, batch, key, old_params):
    ppo.check_frozen_given(c, frozen_unet_params)
    grads, metrics = nft_gradients(unet, schedule, sampler_config, c, state.params,
                                   frozen_unet_params, old_params, batch, key)
    return ppo.update(state, grads, metrics, batch, tx)

  return ppo.jit_train_step(train_step, mesh, state_shardings, frozen_shardings, False,
                            extra_state_args=1)
