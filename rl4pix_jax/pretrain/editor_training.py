"""Stage 3: the InstructPix2Pix UNet on (source, instruction, target) shapes triples.

Training input per example: ``concat([noisy target latents, source latents], channel axis)``
where the target latents are a VAE posterior sample times ``scaling_factor`` noised with
``ddim.add_noise`` at a uniform random timestep, and the source latents are the VAE posterior
mode, unscaled (as ``sampling`` feeds them). The text condition is the frozen CLIP text tower's
last hidden state of the instruction. Conditioning dropout as InstructPix2Pix trains, with
one uniform draw u per example and rates t (text only), b (both), i (image only)::

  u < t          -> text replaced by the empty prompt's hidden states
  t <= u < t+b   -> both dropped
  t+b <= u < t+b+i -> image latents zeroed

so the text is dropped with rate t + b and the image with rate i + b. Loss: MSE to the
training target (the noise for epsilon prediction), optionally weighted per example by
min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"):
``min(SNR(t), gamma) / SNR(t)`` for epsilon targets, ``/ (SNR(t) + 1)`` for v targets.

Training examples: the first ``train_examples`` scenes of the train split's generator stream
(``shapes.make_example(split_seed(seed, "train"), i)``; the first ``data.train_size`` of them
are the tfds train split), rendered in memory: the generator is unlimited, so the editor sees
far more scenes than the VAE and CLIP stages need. VAE and text encodings are computed once
(both models are frozen; instructions repeat, so each distinct one is encoded once).

Weights: an exponential moving average of the online weights (decay ``ema_decay``, warmed up
as ``min(decay, (1 + n) / (10 + n))`` after n updates) is what the stage saves as its params
and what edits, as InstructPix2Pix and SD sample from EMA weights; the online weights and
AdamW moments live in the checkpoint's optimizer state, to resume.

Warm restart (``restart_at`` > 0): at update ``restart_at`` the online weights are replaced
by the EMA, the AdamW state is reset and a second warmup + cosine schedule of the remaining
``steps - restart_at`` updates starts at ``restart_learning_rate`` (SGDR-style, Loshchilov &
Hutter 2017, restarting from the averaged weights). The EMA and its update count carry on.
Because the restart keeps only the EMA, a stage whose params are all that is left (a shipped
stage) can be continued from there: ``start_from_params`` writes it as the checkpoint of
step ``restart_at``.
"""

from __future__ import annotations

import time
from typing import Any, Dict, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from rl4pix_jax import tokenizer as tokenizer_lib
from rl4pix_jax.data import shapes
from rl4pix_jax.data import shapes_edit_builder
from rl4pix_jax.diffusion import ddim
from rl4pix_jax.models import unet as unet_lib
from rl4pix_jax.models import vae as vae_lib
from rl4pix_jax.pretrain import clip_training
from rl4pix_jax.pretrain import data as data_lib
from rl4pix_jax.pretrain import training_loop
from rl4pix_jax.pretrain import vae_training
from rl4pix_jax.workdir import stages as ckpt


class FrozenEncoders(NamedTuple):
  """The frozen VAE and CLIP text tower of the editor, with their params."""
  vae: vae_lib.AutoencoderKL
  vae_params: Any
  scaling_factor: float
  text_model: Any
  text_params: Any


def load_frozen_encoders(workdir: str) -> FrozenEncoders:
  """VAE and CLIP text tower from the vae and clip stages of ``workdir``."""
  vae_params, vae_config = ckpt.latest_stage_params(workdir, "vae")
  vae_dict = vae_config["models"]["vae"]
  vae = vae_lib.AutoencoderKL(vae_lib.VAEConfig.from_dict(vae_dict))
  clip_params, clip_config = ckpt.latest_stage_params(workdir, "clip")
  text_model, _ = clip_training.make_clip(clip_config["models"]["clip"])
  return FrozenEncoders(vae, vae_params, float(vae_dict["scaling_factor"]), text_model,
                        clip_params["text"])


def make_unet(config_dict) -> unet_lib.UNet2DConditionModel:
  return unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.from_dict(dict(config_dict)))


def text_hidden_states(text_model, text_params, ids: np.ndarray, batch_size: int = 256):
  """(N, L, D) float32 last hidden states of the text tower."""
  apply = jax.jit(lambda p, i: text_model.apply({"params": p}, i).last_hidden_state)
  return np.concatenate([np.asarray(apply(text_params, ids[i:i + batch_size]))
                         for i in range(0, len(ids), batch_size)])


def empty_prompt_states(text_model, text_params) -> np.ndarray:
  """(1, L, D) hidden states of the empty prompt ""."""
  ids = tokenizer_lib.tokenize(tokenizer_lib.load_clip_tokenizer(), [""])
  return text_hidden_states(text_model, text_params, ids)


def encode_split(encoders: FrozenEncoders, arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Everything the UNet step needs, precomputed for a split.

  Returns:
    dict of float32 arrays: ``target_mean``/``target_logvar`` (N, h, w, c) unscaled posterior
    of the targets, ``source_latents`` (N, h, w, c) posterior mode of the sources (unscaled),
    ``text`` (N, L, D) instruction hidden states.
  """
  target_mean, target_logvar = vae_training.encode_in_batches(
      encoders.vae, encoders.vae_params, arrays["target"])
  source_mean, _ = vae_training.encode_in_batches(encoders.vae, encoders.vae_params,
                                                  arrays["source"])
  return {"target_mean": target_mean, "target_logvar": target_logvar,
          "source_latents": source_mean,
          "text": text_hidden_states(encoders.text_model, encoders.text_params,
                                     arrays["input_ids"])}


def generated_train_examples(seed: int, count: int, resolution: int,
                             chunk: int = 4096):
  """The first ``count`` examples of the train split's scene stream, rendered in memory.

  Yields chunks (dicts) of at most ``chunk`` examples: ``source``/``target`` (n, R, R, 3)
  float32 in [-1, 1] (as ``data.loader`` decodes them) and ``instruction`` (list of str).
  """
  stream = shapes_edit_builder.split_seed(seed, "train")
  for start in range(0, count, chunk):
    examples = [shapes.make_example(stream, i, resolution)
                for i in range(start, min(start + chunk, count))]
    yield dict(example_images(examples), instruction=[e.instruction for e in examples])


def example_images(examples) -> Dict[str, np.ndarray]:
  """``source``/``target`` (n, R, R, 3) float32 in [-1, 1] of shapes examples (as ``data.loader``
  decodes them)."""
  return {key: np.stack([getattr(e, key) for e in examples]).astype(np.float32) / 127.5 - 1.0
          for key in ("source", "target")}


def encode_generated_examples(encoders: FrozenEncoders, seed: int, count: int,
                              resolution: int) -> Dict[str, np.ndarray]:
  """``generated_train_examples`` encoded for the UNet step.

  Returns:
    dict of arrays: ``target_mean``/``target_logvar``/``source_latents`` (N, h, w, c) float32
    as ``encode_split``, ``text_index`` (N,) int32 rows of ``text_states`` (U, L, D) float32,
    the hidden states of the U distinct instructions.
  """
  if count < 1:
    raise ValueError(f"pretrain.unet.train_examples must be >= 1, got {count}.")
  parts: Dict[str, list] = {"target_mean": [], "target_logvar": [], "source_latents": []}
  instructions = []
  for chunk in tqdm(generated_train_examples(seed, count, resolution),
                    total=-(-count // 4096), desc="unet data"):
    mean, logvar = vae_training.encode_in_batches(encoders.vae, encoders.vae_params,
                                                  chunk["target"])
    source, _ = vae_training.encode_in_batches(encoders.vae, encoders.vae_params,
                                               chunk["source"])
    parts["target_mean"].append(mean)
    parts["target_logvar"].append(logvar)
    parts["source_latents"].append(source)
    instructions.extend(chunk["instruction"])
  distinct, text_index = np.unique(np.asarray(instructions), return_inverse=True)
  ids = tokenizer_lib.tokenize(tokenizer_lib.load_clip_tokenizer(), list(distinct))
  encoded = {k: np.concatenate(v) for k, v in parts.items()}
  encoded["text_index"] = text_index.astype(np.int32)
  encoded["text_states"] = text_hidden_states(encoders.text_model, encoders.text_params, ids)
  return encoded


def example_batch(encoded: Dict[str, np.ndarray], indices: np.ndarray) -> Dict[str, np.ndarray]:
  """Rows ``indices`` of ``encode_generated_examples``'s arrays, with ``text`` (B, L, D)."""
  batch = {k: encoded[k][indices] for k in ("target_mean", "target_logvar", "source_latents")}
  batch["text"] = encoded["text_states"][encoded["text_index"][indices]]
  return batch


def min_snr_weights(schedule: ddim.DDIMSchedule, timesteps: jax.Array,
                    snr_gamma: float) -> jax.Array:
  """(B,) float32 min-SNR-gamma loss weights of ``timesteps``; all ones when gamma <= 0.

  SNR(t) = alpha_bar_t / (1 - alpha_bar_t). Epsilon targets get min(SNR, gamma) / SNR, v
  targets min(SNR, gamma) / (SNR + 1): both equal the x0-space weight min(SNR, gamma).
  """
  if snr_gamma <= 0:
    return jnp.ones(timesteps.shape, jnp.float32)
  alpha = schedule.alphas_cumprod[timesteps]
  snr = alpha / (1.0 - alpha)
  clipped = jnp.minimum(snr, snr_gamma)
  if schedule.prediction_type == "v_prediction":
    return clipped / (snr + 1.0)
  if schedule.prediction_type == "epsilon":
    return clipped / snr
  raise ValueError(f"min-SNR weighting supports epsilon and v_prediction targets, got "
                   f"prediction_type={schedule.prediction_type!r}.")


def ema_decay_at(decay: float, updates: jax.Array) -> jax.Array:
  """The EMA decay after ``updates`` optimizer updates: min(decay, (1 + n) / (10 + n))."""
  n = jnp.asarray(updates, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def initial_train_state(params, optimizer: optax.GradientTransformation) -> Dict[str, Any]:
  """The stage's optimizer state: online weights (a copy of ``params``, which start the EMA;
  the train step donates both), AdamW state, update count."""
  return {"online": jax.tree.map(jnp.copy, params), "optimizer": optimizer.init(params),
          "updates": jnp.zeros((), jnp.int32)}


def latest_online_params(workdir: str):
  """The online (non-EMA) UNet weights of the unet stage's newest checkpoint.

  Raises:
    ValueError: the checkpoint holds params only (e.g. a shipped stage).
  """
  manager = ckpt.checkpoint_manager(workdir, "unet")
  step = manager.latest_step()
  try:
    if step is None:
      raise ValueError(f"No unet checkpoint in {ckpt.stage_dir(workdir, 'unet')!r}.")
    try:
      state = manager.restore_items(step, {"opt_state": None})["opt_state"]
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"The unet checkpoint of step {step} in {workdir!r} holds no optimizer "
                       "state (a shipped stage keeps the EMA params only).") from e
  finally:
    manager.close()
  return state["online"]


def conditioning_dropout_masks(key: jax.Array, batch: int, text_dropout: float,
                               image_dropout: float, both_dropout: float):
  """(drop_text, drop_image), each (B,) bool (rates and layout: see the module docstring)."""
  if min(text_dropout, image_dropout, both_dropout) < 0 or (
      text_dropout + image_dropout + both_dropout > 1):
    raise ValueError("Conditioning dropout rates must be >= 0 and sum to <= 1; got text="
                     f"{text_dropout}, image={image_dropout}, both={both_dropout}.")
  u = jax.random.uniform(key, (batch,))
  drop_text = u < text_dropout + both_dropout
  drop_image = (u >= text_dropout) & (u < text_dropout + both_dropout + image_dropout)
  return drop_text, drop_image


def editor_training_input(noisy_target_latents: jax.Array, source_latents: jax.Array):
  """(B, h, w, 2c) UNet input: noisy scaled target latents, then the source latents."""
  return jnp.concatenate([noisy_target_latents, source_latents.astype(
      noisy_target_latents.dtype)], axis=-1)


def editor_batch_inputs(schedule: ddim.DDIMSchedule, batch: Dict[str, jax.Array],
                        empty_states: jax.Array, scaling_factor: float, key: jax.Array,
                        rates: Tuple[float, float, float]):
  """(unet_input, timesteps, text, target) of one training batch, dropout applied."""
  latent_key, noise_key, time_key, drop_key = jax.random.split(key, 4)
  size = batch["target_mean"].shape[0]
  clean = vae_lib.latent_sample(latent_key, batch["target_mean"],
                                batch["target_logvar"]) * scaling_factor
  noise = jax.random.normal(noise_key, clean.shape, jnp.float32)
  timesteps = jax.random.randint(time_key, (size,), 0, schedule.num_train_timesteps)
  noisy = ddim.add_noise(schedule, clean, noise, timesteps)
  drop_text, drop_image = conditioning_dropout_masks(drop_key, size, *rates)
  text = jnp.where(drop_text[:, None, None], empty_states, batch["text"])
  source = jnp.where(drop_image[:, None, None, None], 0.0, batch["source_latents"])
  target = ddim.training_target(schedule, clean, noise, timesteps)
  return editor_training_input(noisy, source), timesteps, text, target


def make_editor_train_step(unet, schedule, optimizer, empty_states, scaling_factor, rates,
                           ema_decay: float = 0.0, snr_gamma: float = 0.0):
  """Jitted ``(ema_params, state, batch, key) -> (ema_params, state, metrics)``.

  ``state`` is ``initial_train_state``'s dict; gradients are taken at ``state['online']``
  and the returned ``ema_params`` are the moving average after the update (equal to the
  online weights when ``ema_decay`` is 0). ``metrics``: ``loss`` (weighted, what is
  minimised) and ``mse`` (unweighted).
  """
  empty_states = jnp.asarray(empty_states)

  def step(ema_params, state, batch, key):
    unet_input, timesteps, text, target = editor_batch_inputs(
        schedule, batch, empty_states, scaling_factor, key, rates)
    weights = min_snr_weights(schedule, timesteps, snr_gamma)

    def loss_fn(p):
      prediction = unet.apply({"params": p}, unet_input, timesteps, text)
      per_example = jnp.mean((prediction - target) ** 2, axis=(1, 2, 3))
      return jnp.mean(weights * per_example), jnp.mean(per_example)

    (loss, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["online"])
    updates, opt_state = optimizer.update(grads, state["optimizer"], state["online"])
    online = optax.apply_updates(state["online"], updates)
    count = state["updates"] + 1
    decay = ema_decay_at(ema_decay, count) if ema_decay > 0 else jnp.float32(0.0)
    ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, online)
    new_state = {"online": online, "optimizer": opt_state, "updates": count}
    return ema_params, new_state, {"loss": loss, "mse": mse}

  return jax.jit(step, donate_argnums=(0, 1))


def restart_schedule(settings) -> Tuple[int, Dict[str, Any]]:
  """``(restart_at, second-cycle settings)`` of the stage; restart_at 0 means no restart.

  A restart at or after the last step (e.g. a smoke run with ``steps=10``) is dropped with a
  warning, as ``stage_optimizer`` shortens a warmup longer than half the stage.

  Raises:
    ValueError: a negative restart_at or a non-positive restart_learning_rate.
  """
  restart_at, steps = int(settings["restart_at"]), int(settings["steps"])
  if restart_at < 0:
    raise ValueError(f"pretrain.unet.restart_at={restart_at} must be 0 (no restart) or in "
                     f"(0, steps={steps}).")
  if restart_at >= steps:
    logging.warning("pretrain.unet.restart_at=%d is not before steps=%d: no warm restart.",
                    restart_at, steps)
    restart_at = 0
  if restart_at and not float(settings["restart_learning_rate"]) > 0:
    raise ValueError("pretrain.unet.restart_learning_rate must be > 0, got "
                     f"{settings['restart_learning_rate']}.")
  return restart_at, dict(settings, learning_rate=settings["restart_learning_rate"])


def with_warm_restart(first_step, second_step, second_optimizer, restart_at: int):
  """The stage's step function: ``first_step`` for updates < ``restart_at``, then the
  restart (online := EMA copy, fresh ``second_optimizer`` state, update count kept) and
  ``second_step``. Deterministic in the state, so a run resumed at ``restart_at`` restarts
  the same way."""
  if not restart_at:
    return first_step

  def step(ema_params, state, batch, key):
    updates = int(state["updates"])
    if updates < restart_at:
      return first_step(ema_params, state, batch, key)
    if updates == restart_at:
      state = dict(initial_train_state(ema_params, second_optimizer), updates=state["updates"])
    return second_step(ema_params, state, batch, key)

  return step


def start_from_params(config, workdir: str, params_dir: str) -> int:
  """Writes ``params_dir``'s UNet params (e.g. a shipped stage: params only) as this
  workdir's unet checkpoint of step ``pretrain.unet.restart_at``, where the warm restart
  needs nothing else; returns that step.

  Raises:
    ValueError: no restart configured, or the workdir already has unet checkpoints.
  """
  settings = config.pretrain.unet
  restart_at, _ = restart_schedule(settings)
  if not restart_at:
    raise ValueError("Starting from params needs a warm restart: set "
                     "--config.pretrain.unet.restart_at (and steps beyond it).")
  manager = ckpt.checkpoint_manager(workdir, "unet")
  try:
    if manager.latest_step() is not None:
      raise ValueError(f"{ckpt.stage_dir(workdir, 'unet')!r} already has checkpoints "
                       f"(step {manager.latest_step()}); rerun without --start_from to resume.")
    params, source_config = ckpt.latest_stage_params(params_dir, "unet")
    optimizer = training_loop.stage_optimizer(settings, restart_at)
    state = dict(initial_train_state(params, optimizer),
                 updates=jnp.asarray(restart_at, jnp.int32))
    metadata = {"started_from": {"params_dir": params_dir,
                                 "step": source_config["metadata"].get("step")},
                "settings": dict(settings), "num_steps": int(settings["steps"])}
    ckpt.save_stage(manager, workdir, "unet", restart_at, params, state,
                    source_config["models"], metadata)
  finally:
    manager.close()
  return restart_at


def train_editor(config, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes, or skips) the UNet stage; returns its model_config.json dict."""
  stage = "unet"
  completed = training_loop.completed_stage(workdir, stage)
  if completed is not None:
    return completed
  started = time.time()
  settings = config.pretrain.unet
  dataset_dir = data_lib.ensure_shapes_dataset(config, workdir)
  encoders = load_frozen_encoders(workdir)
  count = int(settings["train_examples"])
  print(f"unet: encoding {count} training scenes of the train split's stream", flush=True)
  encoded = encode_generated_examples(encoders, config.seed, count, config.resolution)
  empty_states = empty_prompt_states(encoders.text_model, encoders.text_params)
  unet = make_unet(config.model.unet)
  side = encoded["source_latents"].shape[1]
  params = unet.init(jax.random.PRNGKey(config.seed + 3),
                     jnp.zeros((1, side, side, unet.config.in_channels)),
                     jnp.zeros((1,), jnp.int32), jnp.asarray(encoded["text_states"][:1]))["params"]
  restart_at, second_settings = restart_schedule(settings)
  optimizer = training_loop.stage_optimizer(settings, restart_at or settings["steps"])
  state = initial_train_state(params, optimizer)
  scheduler_config = dict(config.model.scheduler)
  schedule = ddim.DDIMSchedule.from_config(scheduler_config)
  rates = (settings["text_dropout"], settings["image_dropout"], settings["both_dropout"])
  make_step = lambda opt: make_editor_train_step(
      unet, schedule, opt, empty_states, encoders.scaling_factor, rates,
      float(settings["ema_decay"]), float(settings["snr_gamma"]))
  train_step = make_step(optimizer)
  if restart_at:
    second_optimizer = training_loop.stage_optimizer(second_settings,
                                                     settings["steps"] - restart_at)
    train_step = with_warm_restart(train_step, make_step(second_optimizer), second_optimizer,
                                   restart_at)
  make_batch = lambda step: example_batch(encoded, data_lib.batch_indices(
      config.seed, step, count, settings["batch_size"]))
  models = {"unet": unet.config.to_diffusers(), "scheduler": scheduler_config}
  metadata = {"dataset_dir": dataset_dir, "settings": dict(settings),
              "scaling_factor": encoders.scaling_factor}
  params, state, metrics, manager = training_loop.run_training(
      workdir, stage, settings["steps"], params, state, train_step, make_batch,
      config.seed, settings["log_every"], settings["checkpoint_every"], models, metadata)
  metadata.update(final_metrics=metrics, wall_time_s=time.time() - started)
  training_loop.finish_stage(manager, workdir, stage, settings["steps"], params, state,
                             models, metadata)
  print(f"unet: done, {metadata['wall_time_s']:.0f} s")
  return ckpt.read_model_config(workdir, stage)
