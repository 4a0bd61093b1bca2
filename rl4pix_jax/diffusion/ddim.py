"""DDIM noise schedule and the stochastic DDIM step with its log-probability.

The schedule follows diffusers' ``DDIMScheduler`` field for field (it is built from the same
``scheduler_config.json``), so a sampled chain with eta=0 reproduces diffusers exactly.

The log-probability convention is DDPO's: the Gaussian log-density of ``prev_sample`` under
the policy N(mean, sigma_t^2 I), *averaged* (not summed) over all non-batch dimensions. A
sum over a 64x64x4 latent is ~16k times larger; the PPO ratio exp(logp_new - logp_old) of
such sums overflows or saturates the clip range after the smallest parameter change, so the
PPO clip range (1e-4 in DDPO) is expressed in the averaged unit.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SUPPORTED_SPACINGS = ("leading", "trailing", "linspace")
# Floor of the DDIM std in the log-density: eta=0 gives sigma_t=0 (a deterministic step).
MIN_LOG_PROB_STD = 1e-6


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Betas of the Glide cosine schedule ('squaredcos_cap_v2')."""
  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  n = num_train_timesteps
  return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta)
                   for i in range(n)], dtype=np.float32)


def _betas(config: Mapping) -> np.ndarray:
  n = int(config.get("num_train_timesteps", 1000))
  start = float(config.get("beta_start", 0.0001))
  end = float(config.get("beta_end", 0.02))
  schedule = config.get("beta_schedule", "linear")
  if config.get("trained_betas") is not None:
    return np.asarray(config["trained_betas"], np.float32)
  if schedule == "linear":
    return np.linspace(start, end, n, dtype=np.float32)
  if schedule == "scaled_linear":
    return np.linspace(start**0.5, end**0.5, n, dtype=np.float32)**2
  if schedule == "squaredcos_cap_v2":
    return _cosine_betas(n)
  raise ValueError(f"beta_schedule={schedule!r} is not supported; use 'linear', "
                   "'scaled_linear' or 'squaredcos_cap_v2'.")


@flax.struct.dataclass
class DDIMSchedule:
  """A DDIM schedule: the training noise levels plus the static scheduler options.

  Attributes:
    alphas_cumprod: (num_train_timesteps,) float32, alpha-bar_t of the forward process.
    final_alpha_cumprod: () float32, alpha-bar used after the last step (1 or alpha-bar_0).
  """
  alphas_cumprod: jnp.ndarray
  final_alpha_cumprod: jnp.ndarray
  num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)
  steps_offset: int = flax.struct.field(pytree_node=False, default=0)
  timestep_spacing: str = flax.struct.field(pytree_node=False, default="leading")
  prediction_type: str = flax.struct.field(pytree_node=False, default="epsilon")
  clip_sample: bool = flax.struct.field(pytree_node=False, default=False)
  clip_sample_range: float = flax.struct.field(pytree_node=False, default=1.0)

  @classmethod
  def from_config(cls, config: Mapping) -> "DDIMSchedule":
    """Builds the schedule from a diffusers ``scheduler_config.json`` dict.

    Any diffusers scheduler config of the SD family works (PNDM, Euler, DDIM...): the noise
    levels, prediction type, spacing and offset are read, and sampling is always DDIM. DDIM's
    own options take diffusers' DDIMScheduler defaults when absent, except ``clip_sample``,
    which is off for another class's config (``_clips_by_default``).
    """
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in SUPPORTED_PREDICTION_TYPES:
      raise ValueError(f"prediction_type={prediction_type!r} in the scheduler config is not "
                       f"supported; expected one of {SUPPORTED_PREDICTION_TYPES}.")
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in SUPPORTED_SPACINGS:
      raise ValueError(f"timestep_spacing={spacing!r} is not supported; expected one of "
                       f"{SUPPORTED_SPACINGS}.")
    if config.get("thresholding", False):
      raise ValueError("thresholding=True (dynamic thresholding) is not supported; set it to "
                       "false in the scheduler config.")
    if config.get("rescale_betas_zero_snr", False):
      raise ValueError("rescale_betas_zero_snr=True is not supported; set it to false.")
    alphas_cumprod = np.cumprod(1.0 - _betas(config).astype(np.float32), dtype=np.float32)
    final = 1.0 if config.get("set_alpha_to_one", True) else float(alphas_cumprod[0])
    return cls(
        alphas_cumprod=jnp.asarray(alphas_cumprod, jnp.float32),
        final_alpha_cumprod=jnp.asarray(final, jnp.float32),
        num_train_timesteps=len(alphas_cumprod),
        steps_offset=int(config.get("steps_offset", 0)),
        timestep_spacing=spacing,
        prediction_type=prediction_type,
        clip_sample=bool(config.get("clip_sample", _clips_by_default(config))),
        clip_sample_range=float(config.get("clip_sample_range", 1.0)),
    )

  def timesteps(self, num_inference_steps: int) -> np.ndarray:
    """The (T,) int32 timesteps of a T-step chain, noisiest first (as diffusers' set_timesteps)."""
    n, t = self.num_train_timesteps, int(num_inference_steps)
    if not 1 <= t <= n:
      raise ValueError(f"num_inference_steps={t} must be between 1 and num_train_timesteps={n}.")
    if self.timestep_spacing == "linspace":
      steps = np.linspace(0, n - 1, t).round()[::-1]
    elif self.timestep_spacing == "leading":
      steps = (np.arange(0, t) * (n // t)).round()[::-1] + self.steps_offset
    else:
      steps = np.round(np.arange(n, 0, -n / t)) - 1
    return np.ascontiguousarray(steps).astype(np.int32)

  def step_ratio(self, num_inference_steps: int) -> int:
    """Distance between consecutive timesteps (diffusers: num_train_timesteps // T)."""
    return self.num_train_timesteps // int(num_inference_steps)


def _clips_by_default(config: Mapping) -> bool:
  """DDIM's x0 clipping when ``clip_sample`` is absent: on for a DDIM config (or one that
  names no class), as diffusers' DDIMScheduler; off for another class's config (PNDM,
  Euler...), which says nothing about DDIM's clipping. diffusers' ``DDIMScheduler.from_config``
  of such a config would clip the latent-space x0 of SD (std ~1, values beyond +-3) to [-1, 1]."""
  return config.get("_class_name", "DDIMScheduler") == "DDIMScheduler"


def is_stochastic(schedule: DDIMSchedule, timestep, prev_timestep, eta) -> jnp.ndarray:
  """Whether the step x_t -> x_{t-1} samples (sigma_t > MIN_LOG_PROB_STD), bool, shaped as
  ``timestep``. A step with sigma_t = 0 (eta = 0, or the last step when the schedule ends at
  alpha_prev = 1, ``set_alpha_to_one``) is deterministic: its log-density is a delta, so a PPO
  ratio or KL there only measures the floor dividing float rounding."""
  return ddim_std(schedule, timestep, prev_timestep, eta) > MIN_LOG_PROB_STD


def _alpha_prev(schedule: DDIMSchedule, prev_timestep: jnp.ndarray) -> jnp.ndarray:
  safe = jnp.clip(prev_timestep, 0, schedule.num_train_timesteps - 1)
  return jnp.where(prev_timestep >= 0, schedule.alphas_cumprod[safe],
                   schedule.final_alpha_cumprod)


def _per_sample(x: jnp.ndarray, ndim: int) -> jnp.ndarray:
  """Broadcasts a scalar or (B,) array against a (B, ...) array of rank ndim."""
  x = jnp.asarray(x, jnp.float32)
  return x.reshape(x.shape + (1,) * (ndim - x.ndim)) if x.ndim else x


def ddim_std(schedule: DDIMSchedule, timestep, prev_timestep, eta) -> jnp.ndarray:
  """sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev), float32."""
  alpha = schedule.alphas_cumprod[jnp.asarray(timestep)]
  alpha_prev = _alpha_prev(schedule, jnp.asarray(prev_timestep))
  variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
  return jnp.asarray(eta, jnp.float32) * jnp.sqrt(variance)


def step_mean(
    schedule: DDIMSchedule,
    model_output: jnp.ndarray,
    timestep: jnp.ndarray,
    prev_timestep: jnp.ndarray,
    sample: jnp.ndarray,
    eta: float | jnp.ndarray,
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """The Gaussian of one DDIM step x_t -> x_{t-1}: ``(mean (B, h, w, c), std)`` float32,
  std broadcastable to the mean (sigma_t of :func:`ddim_std`, not floored). Arguments as
  :func:`ddim_step`."""
  ndim = sample.ndim
  sample = sample.astype(jnp.float32)
  model_output = model_output.astype(jnp.float32)
  timestep = jnp.asarray(timestep)
  prev_timestep = jnp.asarray(prev_timestep)
  alpha = _per_sample(schedule.alphas_cumprod[timestep], ndim)
  alpha_prev = _per_sample(_alpha_prev(schedule, prev_timestep), ndim)
  beta = 1 - alpha
  if schedule.prediction_type == "epsilon":
    pred_x0 = (sample - jnp.sqrt(beta) * model_output) / jnp.sqrt(alpha)
    pred_eps = model_output
  elif schedule.prediction_type == "v_prediction":
    pred_x0 = jnp.sqrt(alpha) * sample - jnp.sqrt(beta) * model_output
    pred_eps = jnp.sqrt(alpha) * model_output + jnp.sqrt(beta) * sample
  else:  # "sample"
    pred_x0 = model_output
    pred_eps = (sample - jnp.sqrt(alpha) * pred_x0) / jnp.sqrt(beta)
  if schedule.clip_sample:
    pred_x0 = jnp.clip(pred_x0, -schedule.clip_sample_range, schedule.clip_sample_range)
  std = _per_sample(ddim_std(schedule, timestep, prev_timestep, eta), ndim)
  direction = jnp.sqrt(jnp.maximum(1 - alpha_prev - std**2, 0.0)) * pred_eps
  mean = jnp.sqrt(alpha_prev) * pred_x0 + direction
  return mean, std


def ddim_step(
    schedule: DDIMSchedule,
    model_output: jnp.ndarray,
    timestep: jnp.ndarray,
    prev_timestep: jnp.ndarray,
    sample: jnp.ndarray,
    eta: float | jnp.ndarray,
    key: Optional[jax.Array] = None,
    prev_sample: Optional[jnp.ndarray] = None,
) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """One DDIM step x_t -> x_{t-1}, sampling it (``key``) or re-scoring a given one.

  Args:
    schedule: the noise schedule.
    model_output: (B, h, w, c) float, the (guided) network prediction at ``timestep``.
    timestep: () or (B,) int, t.
    prev_timestep: () or (B,) int, the next (less noisy) timestep; < 0 after the last step.
    sample: (B, h, w, c) float, x_t.
    eta: DDIM eta (0 deterministic, 1 DDPM-like variance).
    key: PRNG key for the step noise; used when ``prev_sample`` is None and eta > 0.
    prev_sample: (B, h, w, c), a stored x_{t-1} to score instead of sampling.
  Returns:
    ``(prev_sample, log_prob)``: x_{t-1} (B, h, w, c) float32 and its log-density under
    N(mean_t, sigma_t^2) averaged over the non-batch dimensions, (B,) float32 (see the
    module docstring for why the mean). sigma_t is floored at MIN_LOG_PROB_STD there.
  """
  ndim = sample.ndim
  sample = sample.astype(jnp.float32)
  mean, std = step_mean(schedule, model_output, timestep, prev_timestep, sample, eta)
  if prev_sample is None:
    if key is None:
      prev_sample = mean
    else:
      prev_sample = mean + std * jax.random.normal(key, sample.shape, jnp.float32)
  prev_sample = jnp.asarray(prev_sample, jnp.float32)
  std_floor = jnp.maximum(std, MIN_LOG_PROB_STD)
  log_density = (-(prev_sample - mean)**2 / (2 * std_floor**2) - jnp.log(std_floor) -
                 0.5 * jnp.log(2 * jnp.pi))
  log_prob = jnp.mean(log_density, axis=tuple(range(1, ndim)))
  return prev_sample, log_prob


def step_kl(schedule: DDIMSchedule, model_output: jnp.ndarray, reference_output: jnp.ndarray,
            timestep: jnp.ndarray, prev_timestep: jnp.ndarray, sample: jnp.ndarray,
            eta: float | jnp.ndarray) -> jnp.ndarray:
  """KL(policy step || reference step) at x_t, averaged over the non-batch dimensions, (B,).

  Both steps are Gaussians with the same sigma_t (floored at MIN_LOG_PROB_STD, as the
  log-probs), so per dimension KL = (mean - mean_ref)^2 / (2 sigma_t^2); the mean over
  dimensions is in the unit of the per-dimension mean log-probs (module docstring).
  """
  mean, std = step_mean(schedule, model_output, timestep, prev_timestep, sample, eta)
  reference, _ = step_mean(schedule, reference_output, timestep, prev_timestep, sample, eta)
  std_floor = jnp.maximum(std, MIN_LOG_PROB_STD)
  kl = (mean - reference) ** 2 / (2 * std_floor ** 2)
  return jnp.mean(kl, axis=tuple(range(1, sample.ndim)))


def add_noise(schedule: DDIMSchedule, clean: jnp.ndarray, noise: jnp.ndarray,
              timesteps: jnp.ndarray) -> jnp.ndarray:
  """Forward process q(x_t | x_0): sqrt(a_t) x_0 + sqrt(1 - a_t) noise; timesteps (B,) int."""
  alpha = _per_sample(schedule.alphas_cumprod[timesteps], clean.ndim)
  return jnp.sqrt(alpha) * clean + jnp.sqrt(1 - alpha) * noise


def training_target(schedule: DDIMSchedule, clean: jnp.ndarray, noise: jnp.ndarray,
                    timesteps: jnp.ndarray) -> jnp.ndarray:
  """What the network should predict for ``prediction_type`` (noise, v, or x_0)."""
  if schedule.prediction_type == "epsilon":
    return noise
  if schedule.prediction_type == "v_prediction":
    alpha = _per_sample(schedule.alphas_cumprod[timesteps], clean.ndim)
    return jnp.sqrt(alpha) * noise - jnp.sqrt(1 - alpha) * clean
  return clean


def default_scheduler_config() -> dict:
  """The scheduler config of Stable Diffusion 1.x / InstructPix2Pix (as a diffusers dict)."""
  return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
              steps_offset=1, prediction_type="epsilon", timestep_spacing="leading")

