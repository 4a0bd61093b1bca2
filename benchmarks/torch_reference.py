"""The PyTorch side of the benchmarks: diffusers' UNet, a plain DDIM sampling loop, DDPO.

The UNet is diffusers' ``UNet2DConditionModel`` loaded from the folder that
``rl4pix_jax.weights.diffusers_models.export_unet`` wrote from our random-initialised params,
so both sides run the same weights. Tensors are NCHW here, NHWC on our side.

The PPO update is the loop ddpo-pytorch runs: for each stored timestep, one 3-way CFG
forward/backward of the minibatch, the clipped PPO loss on the DDIM log-prob ratio, gradients
accumulated over all timesteps, then global-norm clipping and one AdamW step.
"""

import math
from typing import Callable, Dict

import numpy as np
import torch


def load_unet(folder: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
  """diffusers UNet2DConditionModel from an exported folder, on ``device`` in ``dtype``."""
  from diffusers import UNet2DConditionModel  # pylint: disable=import-outside-toplevel
  return UNet2DConditionModel.from_pretrained(folder).to(device=device, dtype=dtype)


def guided_eps(unet: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
               text: torch.Tensor, uncond: torch.Tensor, image: torch.Tensor,
               text_scale: float = 7.5, image_scale: float = 1.5) -> torch.Tensor:
  """3-way InstructPix2Pix guidance. latents, image: (B, 4, h, w); text, uncond: (B, L, D).

  Branches (text+image, image only, neither), as diffusers' InstructPix2Pix pipeline.
  Returns (B, 4, h, w) float32.
  """
  noisy = torch.cat([latents] * 3)
  image3 = torch.cat([image, image, torch.zeros_like(image)])
  states = torch.cat([text, uncond, uncond])
  t = timestep.expand(noisy.shape[0]) if timestep.ndim == 0 else timestep.repeat(3)
  out = unet(torch.cat([noisy, image3], dim=1), t, states).sample.float()
  e_text, e_image, e_uncond = out.chunk(3)
  return e_uncond + text_scale * (e_text - e_image) + image_scale * (e_image - e_uncond)


def make_scheduler(scheduler_config: Dict, num_steps: int):
  """diffusers DDIMScheduler with ``num_steps`` inference steps set."""
  from diffusers import DDIMScheduler  # pylint: disable=import-outside-toplevel
  scheduler = DDIMScheduler(**scheduler_config)
  scheduler.set_timesteps(num_steps)
  return scheduler


@torch.no_grad()
def sample_trajectory(unet, scheduler, text, uncond, image, generator) -> torch.Tensor:
  """T DDIM steps (eta=1) with 3-way CFG from fresh noise; returns (B, T+1, 4, h, w)."""
  latents = torch.randn(image.shape, generator=generator, device=image.device,
                        dtype=image.dtype)
  chain = [latents]
  for t in scheduler.timesteps:
    eps = guided_eps(unet, latents, t.to(image.device), text, uncond, image)
    latents = scheduler.step(eps, t, latents, eta=1.0, generator=generator).prev_sample
    latents = latents.to(image.dtype)
    chain.append(latents)
  return torch.stack(chain, dim=1)


def ddim_log_prob(scheduler, eps: torch.Tensor, timestep: int, latents: torch.Tensor,
                  prev_latents: torch.Tensor, eta: float = 1.0) -> torch.Tensor:
  """DDPO's per-sample mean Gaussian log-density of ``prev_latents`` under the DDIM step.

  eps, latents, prev_latents: (B, 4, h, w); returns (B,) float32.
  """
  step_ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
  prev_t = timestep - step_ratio
  alphas = scheduler.alphas_cumprod
  a_t = alphas[timestep].to(latents.device)
  a_prev = alphas[prev_t].to(latents.device) if prev_t >= 0 else scheduler.final_alpha_cumprod
  variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
  std = eta * variance.sqrt()
  x0 = (latents - (1 - a_t).sqrt() * eps) / a_t.sqrt()
  mean = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).sqrt() * eps
  log_prob = (-((prev_latents.float() - mean) ** 2) / (2 * std ** 2) - std.log()
              - math.log(math.sqrt(2 * math.pi)))
  return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def make_ppo_update(unet, scheduler, learning_rate: float = 3e-4, clip_range: float = 1e-4,
                    adv_clip_max: float = 5.0, max_grad_norm: float = 1.0
                    ) -> Callable[..., float]:
  """``update(latents, log_probs, advantages, text, uncond, image) -> mean loss``.

  latents (B, T+1, 4, h, w), log_probs (B, T), advantages (B,): one minibatch update over all
  T timesteps (per-sample shuffled order, as ddpo-pytorch), AdamW over every UNet param.
  """
  optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=1e-4)
  timesteps = scheduler.timesteps

  def update(latents, log_probs, advantages, text, uncond, image) -> float:
    batch, num_steps = log_probs.shape
    order = torch.stack([torch.randperm(num_steps) for _ in range(batch)])
    rows = torch.arange(batch)
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    total = 0.0
    unet.train()
    for j in range(num_steps):
      index = order[:, j]
      x, x_prev = latents[rows, index], latents[rows, index + 1]
      # One timestep per sample in DDPO; the permutation is per sample, so step sample-wise.
      t = timesteps[index].to(x.device)
      eps = guided_eps(unet, x, t, text, uncond, image)
      new = torch.stack([ddim_log_prob(scheduler, eps[i:i + 1], int(t[i]), x[i:i + 1],
                                       x_prev[i:i + 1])[0] for i in range(batch)])
      ratio = torch.exp(new - log_probs[rows, index])
      loss = torch.mean(torch.maximum(
          -advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)))
      (loss / num_steps).backward()
      total += float(loss)
    torch.nn.utils.clip_grad_norm_(unet.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / num_steps

  return update


def to_torch(array: np.ndarray, device: str, dtype: torch.dtype,
             nhwc: bool = False) -> torch.Tensor:
  """numpy -> torch; ``nhwc`` moves the trailing channel axis in front of the spatial axes."""
  if nhwc:
    array = np.moveaxis(array, -1, -3)
  return torch.from_numpy(np.ascontiguousarray(array)).to(device=device, dtype=dtype)
