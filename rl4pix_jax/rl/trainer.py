"""The RL loop: sample -> decode -> reward -> advantages -> PPO epochs -> log -> checkpoint.

One epoch draws ``train.num_sample_batches`` batches of ``train.sample_batch_size`` edits,
samples a guided trajectory for each with the current policy, scores the decoded edits,
normalises rewards per prompt (per dataset example), and runs ``ppo.num_inner_epochs``
passes of minibatch PPO updates over the stored trajectories. Every piece of state that
decides the next numbers (train state, epoch, per-prompt statistics, data-iterator
position) is checkpointed, and all randomness is derived from ``config.seed`` and the epoch,
so a killed run restarted with the same command continues to the same numbers.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from rl4pix_jax.rl import advantages as advantages_lib
from rl4pix_jax import parallel, pipeline, visualize
from rl4pix_jax.workdir import checkpointer as checkpointing
from rl4pix_jax.workdir import layout
from rl4pix_jax.workdir.metrics_log import MetricsLog
from rl4pix_jax.rl import ppo
from rl4pix_jax.diffusion import sampling
from rl4pix_jax.rewards import RewardInputs, make_reward_fn
from rl4pix_jax.rewards.reference import reference_attention_maps
from rl4pix_jax.tokenizer import tokenize


# Kernels with fewer elements stay replicated (config.mesh.fsdp_min_size overrides it).
DEFAULT_FSDP_MIN_SIZE = 2 ** 18


class TrainingError(RuntimeError):
  """The run cannot continue (inconsistent config, repeated non-finite updates, ...)."""


@dataclasses.dataclass
class RLSetup:
  """What the RL stage starts from.

  Attributes:
    models: the editor modules.
    params: the initial editor parameters (the UNet is the policy's starting point).
    tokenizer: the CLIP tokenizer of the text encoder.
    clip_text_model, clip_vision_model: CLIP towers with projections for the CLIP reward
      (None when the reward does not use CLIP).
    clip_params: {"text": ..., "vision": ...} or None.
  """
  models: pipeline.EditorModels
  params: pipeline.EditorParams
  tokenizer: Any
  clip_text_model: Any = None
  clip_vision_model: Any = None
  clip_params: Any = None


@dataclasses.dataclass(frozen=True)
class BatchArithmetic:
  """The per-epoch sizes, validated against the device and process counts."""
  sample_batch_size: int
  num_sample_batches: int
  samples_per_epoch: int
  train_batch_size: int
  minibatches_per_inner_epoch: int
  num_inner_epochs: int
  updates_per_epoch: int
  per_process_sample_batch: int
  batch_devices: int
  samples_per_prompt: int = 1

  def describe(self) -> str:
    return (f"{self.samples_per_epoch} samples per epoch = {self.num_sample_batches} sampling "
            f"calls x {self.sample_batch_size} (global; {self.per_process_sample_batch} per "
            f"process, split over {self.batch_devices} devices; {self.samples_per_prompt} "
            f"sample(s) per prompt); {self.num_inner_epochs} inner "
            f"epoch(s) x {self.minibatches_per_inner_epoch} minibatches of "
            f"{self.train_batch_size} = {self.updates_per_epoch} optimizer updates per epoch")


def batch_arithmetic(config: ml_collections.ConfigDict, batch_devices: int,
                     process_count: int) -> BatchArithmetic:
  """Checks that the batch sizes fit each other and the mesh; names the numbers if not."""
  t = config.train
  problems = []
  samples = t.sample_batch_size * t.num_sample_batches
  if t.sample_batch_size % batch_devices:
    problems.append(f"train.sample_batch_size={t.sample_batch_size} is not divisible by the "
                    f"{batch_devices} devices the batch is split over")
  if t.train_batch_size % batch_devices:
    problems.append(f"train.train_batch_size={t.train_batch_size} is not divisible by the "
                    f"{batch_devices} devices the batch is split over")
  if samples % t.train_batch_size:
    problems.append(f"samples per epoch = train.sample_batch_size x train.num_sample_batches "
                    f"= {t.sample_batch_size} x {t.num_sample_batches} = {samples} is not "
                    f"divisible by train.train_batch_size={t.train_batch_size}")
  if t.sample_batch_size % process_count:
    problems.append(f"train.sample_batch_size={t.sample_batch_size} is not divisible by the "
                    f"{process_count} processes")
  repeats = samples_per_prompt(config)
  if repeats < 1 or t.sample_batch_size % (repeats * process_count):
    problems.append(f"train.sample_batch_size={t.sample_batch_size} is not divisible by "
                    f"train.samples_per_prompt={repeats} x {process_count} processes (each "
                    "process draws sample_batch_size / samples_per_prompt examples per call)")
  if problems:
    raise TrainingError("Inconsistent batch sizes: " + "; ".join(problems) + ".")
  minibatches = samples // t.train_batch_size
  return BatchArithmetic(
      sample_batch_size=t.sample_batch_size, num_sample_batches=t.num_sample_batches,
      samples_per_epoch=samples, train_batch_size=t.train_batch_size,
      minibatches_per_inner_epoch=minibatches, num_inner_epochs=config.ppo.num_inner_epochs,
      updates_per_epoch=minibatches * config.ppo.num_inner_epochs,
      per_process_sample_batch=t.sample_batch_size // process_count,
      batch_devices=batch_devices, samples_per_prompt=repeats)


def samples_per_prompt(config: ml_collections.ConfigDict) -> int:
  """``train.samples_per_prompt`` (1 when the config predates it)."""
  return int(config.train.get("samples_per_prompt", 1))


def repeat_prompts(batch: Any, repeats: int) -> Any:
  """Each example of an ``EditBatch`` ``repeats`` times in a row (arrays and texts).

  The sampler draws independent noise per row, so the copies are different samples of the same
  prompt: DDPO's per-prompt advantages then compare samples of one prompt with each other.
  """
  if repeats == 1:
    return batch
  arrays = {k: np.repeat(v, repeats, axis=0) for k, v in batch.arrays.items()}
  texts = {k: [t for t in v for _ in range(repeats)] for k, v in batch.texts.items()}
  return dataclasses.replace(batch, arrays=arrays, texts=texts)


def sampler_config_from(config: ml_collections.ConfigDict) -> sampling.SamplerConfig:
  capture = config.sampler.get("capture_size", None)
  return sampling.SamplerConfig(num_steps=config.sampler.num_steps, eta=config.sampler.eta,
                                capture_size=capture if capture else None,
                                record_attention=True)


class _Preemption:
  """Turns SIGTERM (TPU maintenance, SLURM time limit) into a flag checked between epochs."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):  # pylint: disable=unused-argument
      logging.warning("SIGTERM received: checkpointing after this epoch, then stopping.")
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside some test runners)
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _host(x) -> np.ndarray:
  """A global array (possibly spanning processes) as a full numpy array on every host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


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


def train(config: ml_collections.ConfigDict, workdir: str, setup: RLSetup,
          data_iterator: Any, stop_after_epochs: Optional[int] = None,
          on_epoch_end: Optional[Callable[[int, Dict[str, float]], None]] = None
          ) -> List[dict]:
  """Runs (or resumes) the RL stage in ``workdir``.

  Args:
    config: the full run config (sections sampler, reward, ppo, train, mesh, seed).
    workdir: run folder: ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``, ``samples/``,
      ``config.json``.
    setup: models, initial params, tokenizer and reward CLIP.
    data_iterator: a ``loader.EditBatchIterator`` (or anything with ``__next__``,
      ``get_state`` and ``set_state``) yielding per-process batches of
      ``train.sample_batch_size / (train.samples_per_prompt x process_count)`` examples
      (``run_setup.make_train_iterator``); each is sampled ``samples_per_prompt`` times.
    stop_after_epochs: stop (with a checkpoint) after this many epochs of this call, for
      tests and staged runs; None runs to ``train.num_epochs``.
    on_epoch_end: optional callback(epoch, metrics).
  Returns:
    The metrics of every epoch logged so far (from metrics.jsonl).
  """
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  mesh = parallel.make_mesh_from_config(config.mesh)
  batch_devices = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
  sizes = batch_arithmetic(config, batch_devices, jax.process_count())
  logging.info("Batch arithmetic: %s", sizes.describe())
  if is_main:
    print(f"[rl4pix_jax] {sizes.describe()}", flush=True)
    with open(layout.run_config_path(workdir), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  models, tokenizer = setup.models, setup.tokenizer
  sampler_config = sampler_config_from(config)
  guidance = sampling.Guidance(jnp.float32(config.sampler.guidance_scale),
                               jnp.float32(config.sampler.image_guidance_scale))
  replicated = parallel.replicated(mesh)
  split = parallel.batch_sharding(mesh)

  # ---- state -----------------------------------------------------------------------------
  # The UNet, the train state (its params and AdamW moments) and the frozen LoRA base are
  # placed by the sharding rules: large kernels split over 'fsdp', the rest replicated.
  base_key = jax.random.PRNGKey(config.seed)
  replicate = lambda tree: parallel.shard_params(
      tree, jax.tree_util.tree_map(lambda _: replicated, tree))
  rules = parallel.default_sharding_rules(
      int(config.mesh.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE)))
  unet_shardings = parallel.param_shardings(setup.params.unet, mesh, rules)
  unet_params = parallel.shard_params(setup.params.unet, unet_shardings)
  init_key = replicate(jax.random.fold_in(base_key, 1))
  init_state = lambda key, unet: ppo.init_train_state(key, unet, config.ppo)[0]
  state_shardings = ppo.train_state_shardings(
      jax.eval_shape(init_state, init_key, unet_params), mesh, rules)
  state = jax.jit(init_state, out_shardings=state_shardings)(init_key, unet_params)
  # "lora": the frozen base is the sharded UNet; "full": no frozen params.
  frozen = unet_params if ppo.PPOConfig.from_config(config.ppo).trainable == "lora" else None
  frozen_shardings = unet_shardings if frozen is not None else None
  tracker = advantages_lib.PerPromptStatTracker(config.ppo.stat_buffer_size,
                                                config.ppo.stat_min_count)
  checkpointer = checkpointing.RunCheckpointer(layout.run_checkpoint_dir(workdir),
                                               keep=config.train.keep_checkpoints)
  start_epoch = 0
  if checkpointer.latest_epoch() is not None:
    state, host = checkpointer.restore(state)
    start_epoch = int(host["epoch"]) + 1
    tracker = advantages_lib.PerPromptStatTracker.from_state_dict(host["tracker"])
    data_iterator.set_state(host["data"])
    logging.info("Resumed from the checkpoint of epoch %d.", host["epoch"])
    if is_main:
      print(f"[rl4pix_jax] resumed after epoch {host['epoch']}", flush=True)
  log = MetricsLog(workdir, resume_from=start_epoch, enabled=is_main)

  # ---- compiled functions ----------------------------------------------------------------
  # Text encoder and VAE (the UNet is not needed there), replicated on the global mesh.
  frozen_params = replicate(setup.params.replace(unet={}))
  sampler = sampling.make_trajectory_sampler(models.unet, models.schedule, sampler_config, mesh,
                                             param_shardings=unet_shardings)
  step_config = ppo.PPOConfig.from_config(config.ppo)
  if step_config.pathwise and config.reward.attention_weight == 0:
    logging.warning("ppo.attention_pathwise_weight=%g is inactive: reward.attention_weight is "
                    "0, so there is no attention reward to differentiate.",
                    step_config.attention_pathwise_weight)
    step_config = dataclasses.replace(step_config, attention_pathwise_weight=0.0)
  train_step = ppo.make_train_step(models.unet, models.schedule, sampler_config, step_config,
                                   mesh, state_shardings=state_shardings,
                                   frozen_shardings=frozen_shardings)
  # reward_fn(clip_params, inputs) -> (reward, parts, map gradient or None)
  combined = make_reward_fn(config.reward, setup.clip_text_model, setup.clip_vision_model)
  reward_fn = jax.jit(reward_with_map_gradient(combined) if step_config.pathwise
                      else lambda clip_params, inputs: (*combined(clip_params, inputs), None))
  policy = jax.jit(lambda trainable, base: ppo.policy_params(trainable, base, config.ppo),
                   in_shardings=(state_shardings.params, frozen_shardings),
                   out_shardings=unet_shardings)
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
  clip_params = None if setup.clip_params is None else replicate(setup.clip_params)
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
  reference_cache: Dict[int, np.ndarray] = {}

  # ---- the loop --------------------------------------------------------------------------
  end_epoch = config.train.num_epochs
  if stop_after_epochs is not None:
    end_epoch = min(end_epoch, start_epoch + stop_after_epochs)
  progress = tqdm.tqdm(range(start_epoch, end_epoch), disable=not is_main, desc="RL epochs",
                       initial=start_epoch, total=config.train.num_epochs)
  with _Preemption() as preemption:
    for epoch in progress:
      epoch_start = time.perf_counter()
      epoch_key = jax.random.fold_in(base_key, 1000 + epoch)
      current_unet = (policy(state.params, frozen) if frozen is not None
                      else state.params)
      samples, rewards, components, example_ids, texts = [], [], {}, [], []
      map_gradients = []
      grid, pictured = None, False
      for i in range(sizes.num_sample_batches):
        batch = repeat_prompts(next(data_iterator), sizes.samples_per_prompt)
        arrays = parallel.global_batch_from_process_local(
            {k: batch.arrays[k] for k in ("source", "mask", "input_ids", "token_index",
                                          "token_mask", "caption_ids",
                                          "source_caption_ids", "example_index")}, mesh)
        cond = encode(frozen_params, arrays)
        trajectory = sampler(current_unet, cond, jax.random.fold_in(epoch_key, i), guidance)
        edited = decode(frozen_params, trajectory.final_latents)
        source_01 = (arrays["source"] + 1.0) / 2.0
        region = None
        ids = _host(arrays["example_index"])
        if use_reference:
          missing = [int(j) for j in ids if int(j) not in reference_cache]
          if missing:
            maps = _host(reference(unet_params, cond, jax.random.fold_in(base_key, 7)))
            for j, m in zip(ids, maps):
              reference_cache.setdefault(int(j), m)
          region = jax.device_put(np.stack([reference_cache[int(j)] for j in ids]), split)
        inputs = RewardInputs(
            edited_images=edited, source_images=source_01, mask=arrays["mask"],
            attention_maps=trajectory.attention_maps, reference_region=region,
            caption_ids=arrays["caption_ids"], source_caption_ids=arrays["source_caption_ids"],
            input_ids=arrays["input_ids"])
        reward, parts, map_gradient = reward_fn(clip_params, inputs)
        map_gradients.append(map_gradient)
        samples.append((cond, trajectory))
        rewards.append(_host(reward))
        for name, value in parts.items():
          components.setdefault(name, []).append(_host(value))
        example_ids.append(ids)
        texts.extend(batch.texts["instruction"])
        if not pictured and config.train.image_every and (
            epoch % config.train.image_every == 0 or epoch == end_epoch - 1):
          # _host is a collective across processes: every process gathers, process 0 draws.
          pictures = (_host(source_01), _host(edited), _host(trajectory.attention_map_mean))
          pictured = True
          if is_main:  # process 0's texts caption the first rows of the global batch
            texts_0 = list(batch.texts["instruction"])
            grid = visualize.sample_grid(*pictures, texts_0, epoch, limit=min(8, len(texts_0)))
      all_rewards = np.concatenate(rewards)
      keys = [str(int(j)) for j in np.concatenate(example_ids)]
      advantages = tracker.update(keys, all_rewards)

      # Stored trajectories of the epoch, in sampling order, as one global batch.
      cond_all = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs),
                                        *[c for c, _ in samples])
      latents = jnp.concatenate([t.latents for _, t in samples])
      log_probs = jnp.concatenate([t.log_probs for _, t in samples])
      timesteps = samples[0][1].timesteps
      adv = jax.device_put(advantages.astype(np.float32), split)
      map_cotangents = None
      if step_config.pathwise:  # in the advantages' unit: reward / (the epoch's reward std)
        map_cotangents = (jnp.concatenate(map_gradients)
                          / max(float(all_rewards.std()), 1e-6))
      step_metrics: List[Dict[str, float]] = []
      for inner in range(config.ppo.num_inner_epochs):
        perm = np.asarray(jax.random.permutation(
            jax.random.fold_in(epoch_key, 10_000 + inner), sizes.samples_per_epoch))
        for m in range(sizes.minibatches_per_inner_epoch):
          idx = perm[m * sizes.train_batch_size:(m + 1) * sizes.train_batch_size]
          take = lambda x, idx=idx: jax.device_put(jnp.take(x, idx, axis=0), split)
          minibatch = ppo.PPOBatch(
              cond=jax.tree_util.tree_map(take, cond_all), latents=take(latents),
              log_probs=take(log_probs), advantages=take(adv), timesteps=timesteps,
              guidance=guidance,
              map_cotangents=None if map_cotangents is None else take(map_cotangents))
          step_key = jax.random.fold_in(epoch_key, 20_000 + inner * 1000 + m)
          state, metrics = train_step(state, frozen, minibatch, step_key)
          metrics = {k: float(v) for k, v in metrics.items()}
          step_metrics.append(metrics)
          if metrics["nonfinite"]:
            logging.warning("Epoch %d minibatch %d: non-finite loss or gradient; update "
                            "skipped (%d in a row).", epoch, m, int(metrics["nonfinite_count"]))
          if metrics["nonfinite_count"] >= config.train.max_nonfinite_in_a_row:
            raise TrainingError(
                f"{int(metrics['nonfinite_count'])} non-finite updates in a row at epoch "
                f"{epoch}: stopping. The last good checkpoint is in {checkpointer.directory} "
                "(epoch {}); lower ppo.learning_rate or check the rewards.".format(
                    checkpointer.latest_epoch()))

      elapsed = time.perf_counter() - epoch_start
      record = {
          "reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std()),
          **{f"reward_{k}": float(np.concatenate(v).mean()) for k, v in components.items()},
          **{k: float(np.mean([s[k] for s in step_metrics])) for k in
             ("loss", "approx_kl", "clipfrac", "grad_norm")},
          "nonfinite_updates": float(sum(s["nonfinite"] for s in step_metrics)),
          "samples_per_s": sizes.samples_per_epoch / elapsed, "epoch_time_s": elapsed,
          "optimizer_steps": float(int(state.step)),
      }
      log.write(epoch, record)
      if is_main:
        progress.set_postfix(reward=f"{record['reward_mean']:.4f}",
                             kl=f"{record['approx_kl']:.2e}")
      if grid is not None:
        os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
        grid.save(os.path.join(workdir, "samples", f"epoch_{epoch:04d}.png"))
      if on_epoch_end is not None:
        on_epoch_end(epoch, record)
      last = epoch == end_epoch - 1
      if (epoch + 1) % config.train.checkpoint_every == 0 or last or preemption.requested:
        checkpointer.save(epoch, state, {
            "epoch": epoch, "tracker": tracker.state_dict(), "data": data_iterator.get_state(),
            "optimizer_steps": int(state.step), "seed": int(config.seed)})
      if preemption.requested:
        logging.warning("Stopped after epoch %d on SIGTERM; rerun the same command to resume.",
                        epoch)
        break
  progress.close()
  history = log.read()
  if is_main and history:
    curve = visualize.metric_curves(
        {k: [h.get(k, math.nan) for h in history] for k in history[-1]
         if k.startswith("reward_") and k != "reward_std"},
        steps=[h["epoch"] for h in history], title="RL rewards per epoch (sampling policy)")
    curve.save(os.path.join(workdir, "reward_curve.png"))
  log.close()
  checkpointer.close()
  return history


def restore_policy_params(config: ml_collections.ConfigDict, workdir: str,
                          initial_unet_params: Any, epoch: Optional[int] = None) -> Any:
  """The policy UNet params (LoRA merged) of an RL checkpoint, on the host's default device.

  Args:
    config: the run config saved beside the checkpoints.
    workdir: the run folder.
    initial_unet_params: the UNet params the run started from (the frozen base).
    epoch: which checkpoint (default: latest).
  """
  state, frozen = ppo.init_train_state(jax.random.PRNGKey(0), initial_unet_params, config.ppo)
  checkpointer = checkpointing.RunCheckpointer(layout.run_checkpoint_dir(workdir),
                                               keep=max(1, config.train.keep_checkpoints))
  if checkpointer.latest_epoch() is None:
    raise checkpointing.CheckpointError(
        f"No RL checkpoint in {layout.run_checkpoint_dir(workdir)!r}; run "
        f"`python -m launch.train --workdir={workdir}` first.")
  state, _ = checkpointer.restore(state, epoch)
  checkpointer.close()
  return ppo.policy_params(state.params, frozen, config.ppo)

