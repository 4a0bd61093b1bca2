"""Stage 1: the tiny AutoencoderKL on shapes images (L1 reconstruction + small KL).

After training, the latent std over training images (posterior samples, unscaled) is measured
and ``scaling_factor = 1 / std`` is stored in the stage's model_config.json, as Stable
Diffusion's 0.18215 was chosen.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rl4pix_jax.data import shapes_check
from rl4pix_jax.models import vae as vae_lib
from rl4pix_jax.pretrain import data as data_lib
from rl4pix_jax.pretrain import training_loop
from rl4pix_jax.workdir import stages as ckpt


def make_vae(config) -> vae_lib.AutoencoderKL:
  """The AutoencoderKL of ``config.model.vae`` (float32 compute)."""
  return vae_lib.AutoencoderKL(vae_lib.VAEConfig.from_dict(dict(config.model.vae)))


def init_vae_params(model: vae_lib.AutoencoderKL, key: jax.Array, resolution: int):
  return model.init(key, jnp.zeros((1, resolution, resolution, 3)))["params"]


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """(B,) KL(N(mean, exp(logvar)) || N(0, I)) summed over latent dims (nats)."""
  per_dim = 0.5 * (mean**2 + jnp.exp(logvar) - 1.0 - logvar)
  return per_dim.reshape(per_dim.shape[0], -1).sum(-1)


def vae_loss(model, params, images: jax.Array, key: jax.Array, kl_weight: float,
             mse_weight: float = 0.0) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """L1 + mse_weight * MSE of decode(posterior sample) vs images (means over pixels), plus
  kl_weight * mean KL (nats per example).

  The MSE term punishes a wrong colour on a small object far more than L1 alone: with L1 only,
  the tiny default VAE spent its first ~600 steps drawing every object in the palette's mean
  colour (orange blobs).

  Args:
    images: (B, R, R, 3) float32 in [-1, 1].
  """
  mean, logvar = model.apply({"params": params}, images, method=model.encode)
  latents = vae_lib.latent_sample(key, mean, logvar)
  recon = model.apply({"params": params}, latents, method=model.decode)
  l1 = jnp.abs(recon - images).mean()
  mse = jnp.mean((recon - images) ** 2)
  kl = kl_divergence(mean, logvar).mean()
  loss = l1 + mse_weight * mse + kl_weight * kl
  return loss, {"loss": loss, "l1": l1, "mse": mse, "kl": kl}


def make_vae_train_step(model, optimizer: optax.GradientTransformation, kl_weight: float,
                        mse_weight: float = 0.0):
  """Jitted ``(params, opt_state, images, key) -> (params, opt_state, metrics)``."""

  def step(params, opt_state, images, key):
    grads, metrics = jax.grad(
        lambda p: vae_loss(model, p, images, key, kl_weight, mse_weight), has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1))


def encode_in_batches(model, params, images: np.ndarray, batch_size: int = 128):
  """(mean, logvar) of all images, each (N, h, w, C) float32 numpy."""
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
  means, logvars = [], []
  for i in range(0, len(images), batch_size):
    mean, logvar = encode(params, images[i:i + batch_size])
    means.append(np.asarray(mean))
    logvars.append(np.asarray(logvar))
  return np.concatenate(means), np.concatenate(logvars)


def measure_latent_std(model, params, images: np.ndarray, key: jax.Array) -> float:
  """Std of posterior samples (unscaled latents) over ``images`` (N, R, R, 3)."""
  mean, logvar = encode_in_batches(model, params, images)
  sample = vae_lib.latent_sample(key, jnp.asarray(mean), jnp.asarray(logvar))
  return float(jnp.std(sample))


def reconstruct(model, params, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
  """(N, R, R, 3) float32 decode(posterior mode) of ``images``, clipped to [-1, 1]."""
  recon = jax.jit(lambda p, x: model.apply({"params": p}, x))
  return np.concatenate([np.clip(np.asarray(recon(params, images[i:i + batch_size])), -1, 1)
                         for i in range(0, len(images), batch_size)])


def reconstruction_l1(model, params, images: np.ndarray, batch_size: int = 128) -> float:
  """Mean |decode(posterior mode) - image| over ``images`` in [-1, 1] units."""
  return float(np.abs(reconstruct(model, params, images, batch_size) - images).mean())


def edit_ceiling(model, params, dataset_dir: str, resolution: int,
                 max_examples: int = 200) -> Dict[str, float]:
  """What a perfect editor could score through this VAE: ``shapes_check`` on VAE(target).

  Every edit is decoded by the VAE, so no editor beats its reconstruction of the ground-truth
  target; a low ceiling means the VAE, not the UNet, is what to fix.

  Returns:
    dict with the validation mean ``success``, ``edit_ok``, ``preserved_ok`` and
    ``outside_change`` (grey levels) of the reconstructed targets.
  """
  split = data_lib.load_split(dataset_dir, "validation", resolution, max_examples)
  examples = data_lib.load_examples(dataset_dir, "validation", len(split.arrays["target"]))
  rebuilt = reconstruct(model, params, split.arrays["target"])
  checks = [shapes_check.check_edit(image, example) for image, example in zip(rebuilt, examples)]
  return {key: float(np.mean([c[key] for c in checks]))
          for key in ("success", "edit_ok", "preserved_ok", "outside_change")}


def train_vae(config, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes, or skips) the VAE stage; returns its model_config.json dict."""
  stage = "vae"
  completed = training_loop.completed_stage(workdir, stage)
  if completed is not None:
    return completed
  started = time.time()
  settings = config.pretrain.vae
  dataset_dir = data_lib.ensure_shapes_dataset(config, workdir)
  train = data_lib.load_split(dataset_dir, "train", config.resolution)
  validation = data_lib.load_split(dataset_dir, "validation", config.resolution)
  images = np.concatenate([train.arrays["source"], train.arrays["target"]])
  model = make_vae(config)
  params = init_vae_params(model, jax.random.PRNGKey(config.seed), config.resolution)
  optimizer = training_loop.stage_optimizer(settings, settings["steps"])
  opt_state = optimizer.init(params)
  train_step = make_vae_train_step(model, optimizer, settings["kl_weight"],
                                   settings["mse_weight"])
  make_batch = lambda step: images[data_lib.batch_indices(
      config.seed, step, len(images), settings["batch_size"])]
  models = {"vae": model.config.to_diffusers()}
  metadata = {"dataset_dir": dataset_dir, "settings": dict(settings)}
  params, opt_state, metrics, manager = training_loop.run_training(
      workdir, stage, settings["steps"], params, opt_state, train_step, make_batch,
      config.seed, settings["log_every"], settings["checkpoint_every"], models, metadata)
  latent_std = measure_latent_std(model, params, images[:1024], jax.random.PRNGKey(1))
  models["vae"]["scaling_factor"] = 1.0 / latent_std
  val_images = np.concatenate([validation.arrays["source"], validation.arrays["target"]])
  metadata.update(latent_std=latent_std, scaling_factor=1.0 / latent_std,
                  validation_l1=reconstruction_l1(model, params, val_images),
                  edit_ceiling=edit_ceiling(model, params, dataset_dir, config.resolution),
                  final_metrics=metrics, wall_time_s=time.time() - started)
  training_loop.finish_stage(manager, workdir, stage, settings["steps"], params, opt_state,
                             models, metadata)
  print(f"vae: latent std {latent_std:.4f}, validation L1 {metadata['validation_l1']:.4f}, "
        f"edit ceiling (shapes check of VAE(target)) {metadata['edit_ceiling']}, "
        f"{metadata['wall_time_s']:.0f} s")
  return ckpt.read_model_config(workdir, stage)
