"""The RL loop: sample -> decode -> reward -> advantages -> PPO epochs -> log -> checkpoint.

One epoch draws ``train.num_sample_batches`` batches of ``train.sample_batch_size`` edits,
samples a guided trajectory for each with the current policy, scores the decoded edits,
normalises rewards per prompt (per dataset example), and runs ``ppo.num_inner_epochs``
passes of minibatch PPO updates over the stored trajectories. Every piece of state that
decides the next numbers (train state, epoch, per-prompt statistics, data-iterator
position) is checkpointed, and all randomness is derived from ``config.seed`` and the epoch,
so a killed run restarted with the same command continues to the same numbers.

The state's placement is in ``train_state.py``, the jitted functions in ``compiled.py``; this
module is the epoch loop.
"""

from __future__ import annotations

import math
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from rl4pix_jax import parallel, visualize
from rl4pix_jax.data import shapes_check
from rl4pix_jax.diffusion import sampling
from rl4pix_jax.rewards import RewardInputs
from rl4pix_jax.rl import advantages as advantages_lib
from rl4pix_jax.rl import ppo
from rl4pix_jax.rl import validation
from rl4pix_jax.rl.batching import TrainingError, batch_arithmetic, repeat_prompts
from rl4pix_jax.rl.compiled import compile_epoch_functions, sampler_config_from
from rl4pix_jax.rl.run_setup import RLSetup
from rl4pix_jax.rl.train_state import place_policy
from rl4pix_jax.workdir import checkpointer as checkpointing
from rl4pix_jax.workdir import files, layout
from rl4pix_jax.workdir import wandb_log
from rl4pix_jax.workdir.metrics_log import MetricsLog

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


def _check_keys(arrays: Dict[str, Any]) -> tuple:
  """The shapes check's target keys present in a batch (none for other datasets)."""
  return tuple(k for k in shapes_check.CHECK_TARGET_KEYS if k in arrays)


def train(config: ml_collections.ConfigDict, workdir: str, setup: RLSetup,
          data_iterator: Any, stop_after_epochs: Optional[int] = None,
          on_epoch_end: Optional[Callable[[int, Dict[str, float]], None]] = None,
          validation_examples: Optional[Sequence[dict]] = None) -> List[dict]:
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
    validation_examples: the examples of the validation passes (``validation.py``;
      ``evaluation.decode_examples``); default: the first ``train.eval_examples`` of
      ``train.eval_split`` of the run's dataset. Unused when ``train.eval_every`` is 0.
  Returns:
    The metrics of every epoch logged so far (from metrics.jsonl).
  """
  # Nothing is written in ``workdir`` until the config and the checkpoint to resume from
  # have been validated: a bad override or an unreadable run leaves the folder as it was.
  from rl4pix_jax import config_validation  # pylint: disable=import-outside-toplevel
  config_validation.validate_run_config(config)
  is_main = jax.process_index() == 0
  mesh = parallel.make_mesh_from_config(config.mesh)
  batch_devices = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
  sizes = config_validation.checked_batch_arithmetic(config, batch_devices, jax.process_count())
  logging.info("Batch arithmetic: %s", sizes.describe())

  sampler_config = sampler_config_from(config)
  guidance = sampling.Guidance(jnp.float32(config.sampler.guidance_scale),
                               jnp.float32(config.sampler.image_guidance_scale))
  split = parallel.batch_sharding(mesh)

  # ---- state (train_state.py) ------------------------------------------------------------
  base_key = jax.random.PRNGKey(config.seed)
  placed = place_policy(config, setup.params.unet, mesh, base_key)
  state, frozen = placed.state, placed.frozen
  placement = (f"Mesh {dict(mesh.shape)} over {mesh.size} devices. Train state: "
               f"{parallel.describe_placement(state)}. Frozen UNet: "
               f"{'none' if frozen is None else parallel.describe_placement(frozen)}.")
  tracker = advantages_lib.PerPromptStatTracker(config.ppo.stat_buffer_size,
                                                config.ppo.stat_min_count)
  start_epoch, host, unreadable = 0, None, []
  directory = layout.run_checkpoint_dir(workdir)
  exists = files.isdir(directory)
  if jax.process_count() > 1:
    # One answer for every process, taken before any of them writes: otherwise a process that
    # looks after another created the folder opens a reader the others do not (and Orbax's
    # directory barrier then pairs mismatched names).
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
  if exists:
    reader = checkpointing.RunCheckpointer(directory, keep=config.train.keep_checkpoints,
                                           read_only=True)
    try:
      if reader.latest_epoch() is not None:
        state, host = reader.restore(state)  # the newest readable one (warns otherwise)
        unreadable = reader.unreadable
    finally:
      reader.close()
  if host is not None:
    start_epoch = int(host["epoch"]) + 1
    if start_epoch >= config.train.num_epochs:
      if is_main:
        print(f"[rl4pix_jax] {workdir} already has {start_epoch} epochs (checkpoint of epoch "
              f"{host['epoch']}); --config.train.num_epochs={config.train.num_epochs} asks for "
              "no more, so nothing was trained or written. Pass a larger "
              "--config.train.num_epochs to continue.", flush=True)
      return MetricsLog(workdir, enabled=False).read()
    tracker = advantages_lib.PerPromptStatTracker.from_state_dict(host["tracker"])
    data_iterator.set_state(host["data"])

  # ---- validation during RL (validation.py): examples loaded before anything is written ---
  validator = None
  if validation.enabled(config):
    validator = validation.Validator(
        config, setup, validation_examples if validation_examples is not None
        else validation.load_examples(config, workdir))
  best = validation.Best.from_host(host, validation.best_metric(config.data.dataset))

  # ---- validated: from here on the run folder is written ---------------------------------
  files.makedirs(workdir)  # local or gs:// (workdir.files)
  if is_main:
    print(f"[rl4pix_jax] {sizes.describe()}", flush=True)
    print(f"[rl4pix_jax] {placement}", flush=True)
    # Where the stages, data and base model are, so the folder can be moved (layout.py).
    files.write_text(layout.run_config_path(workdir), layout.portable_run_config(
        config, workdir).to_json_best_effort(indent=2, sort_keys=True))
  checkpointer = checkpointing.RunCheckpointer(directory, keep=config.train.keep_checkpoints)
  if unreadable:
    if is_main:
      aside = checkpointer.move_aside(unreadable)
      print(f"[rl4pix_jax] moved the unreadable checkpoint(s) of epoch "
            f"{', '.join(map(str, unreadable))} to {aside}", flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("rl4pix_jax: unreadable checkpoints moved")
    checkpointer.reload()
  if host is not None:
    logging.info("Resumed from the checkpoint of epoch %d.", host["epoch"])
    if is_main:
      print(f"[rl4pix_jax] resumed after epoch {host['epoch']}", flush=True)
  # A fresh start drops every old line, the starting policy's validation (epoch -1) too.
  # W&B (config.logging.wandb): a resumed run continues the W&B run its folder recorded.
  log = MetricsLog(workdir, resume_from=start_epoch or validation.BEFORE_FIRST_EPOCH,
                   enabled=is_main, wandb=wandb_log.from_config(
                       config, workdir, resume=host is not None, enabled=is_main))

  # ---- compiled functions (compiled.py) --------------------------------------------------
  fns = compile_epoch_functions(config, setup, mesh, placed, sampler_config, guidance)
  step_config = fns.step_config
  reference_cache: Dict[int, np.ndarray] = {}

  if validator is not None and start_epoch == 0:  # the starting policy: the curve's first point
    record = validator.run(ppo.policy_params(state.params, frozen, config.ppo), 0)
    best.start = record[validation.PREFIX + best.metric] if best.metric in validator.keys \
        else None
    log.write(validation.BEFORE_FIRST_EPOCH, record)

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
      current_unet = (fns.policy(state.params, frozen) if frozen is not None
                      else state.params)
      samples, rewards, components, example_ids, texts = [], [], {}, [], []
      map_gradients = []
      grid, pictured = None, False
      for i in range(sizes.num_sample_batches):
        batch = repeat_prompts(next(data_iterator), sizes.samples_per_prompt)
        arrays = parallel.global_batch_from_process_local(
            {k: batch.arrays[k] for k in ("source", "mask", "input_ids", "token_index",
                                          "token_mask", "caption_ids",
                                          "source_caption_ids", "example_index")
             + _check_keys(batch.arrays)}, mesh)
        cond = fns.encode(fns.frozen_params, arrays)
        trajectory = fns.sampler(current_unet, cond, jax.random.fold_in(epoch_key, i), guidance)
        edited = fns.decode(fns.frozen_params, trajectory.final_latents)
        source_01 = (arrays["source"] + 1.0) / 2.0
        region = None
        ids = _host(arrays["example_index"])
        if fns.reference is not None:
          missing = [int(j) for j in ids if int(j) not in reference_cache]
          if missing:
            maps = _host(fns.reference(placed.unet_params, cond, jax.random.fold_in(base_key, 7)))
            for j, m in zip(ids, maps):
              reference_cache.setdefault(int(j), m)
          region = jax.device_put(np.stack([reference_cache[int(j)] for j in ids]), split)
        inputs = RewardInputs(
            edited_images=edited, source_images=source_01, mask=arrays["mask"],
            attention_maps=trajectory.attention_maps, reference_region=region,
            caption_ids=arrays["caption_ids"], source_caption_ids=arrays["source_caption_ids"],
            input_ids=arrays["input_ids"],
            shapes_check={k: arrays[k] for k in _check_keys(arrays)} or None)
        reward, parts, map_gradient = fns.reward_fn(fns.clip_params, inputs)
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
      if step_config.advantage_mode == "group":
        advantages = advantages_lib.group_advantages(keys, all_rewards,
                                                     step_config.advantage_std,
                                                     step_config.skip_zero_spread)
      else:
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
      # NFT contrasts the policy with the one that sampled: a copy (the state is donated).
      old_params = ((jax.tree.map(jnp.copy, state.params),)
                    if step_config.objective == "nft" else ())
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
          state, metrics = fns.train_step(state, frozen, minibatch, step_key, *old_params)
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
          **{k: float(np.mean([s[k] for s in step_metrics])) for k in step_metrics[0]
             if k not in ("nonfinite", "nonfinite_count")},
          "zero_advantage_fraction": float(np.mean(advantages == 0)),
          "nonfinite_updates": float(sum(s["nonfinite"] for s in step_metrics)),
          "samples_per_s": sizes.samples_per_epoch / elapsed, "epoch_time_s": elapsed,
          "optimizer_steps": float(int(state.step)),
      }
      new_best = False
      if validator is not None and validator.due(epoch):  # the policy checkpoint `epoch` holds
        record.update(validator.run(
            ppo.policy_params(state.params, frozen, config.ppo),
            validation.samples_seen(epoch + 1, sizes.samples_per_epoch)))
        key = validation.PREFIX + best.metric
        new_best = key in record and best.update(epoch, record[key])
      log.write(epoch, record)
      if is_main:
        progress.set_postfix(reward=f"{record['reward_mean']:.4f}",
                             kl=f"{record['approx_kl']:.2e}")
      if grid is not None:
        files.save_image(grid, files.join(workdir, "samples", f"epoch_{epoch:04d}.png"))
        log.image("samples", epoch, grid)
      if on_epoch_end is not None:
        on_epoch_end(epoch, record)
      last = epoch == end_epoch - 1
      host_state = {
          "epoch": epoch, "tracker": tracker.state_dict(), "data": data_iterator.get_state(),
          "optimizer_steps": int(state.step), "seed": int(config.seed)}
      if validator is not None:
        host_state["validation"] = best.state_dict()
        if new_best and validator.keep_best:
          validation.save_best(workdir, epoch, state, host_state)
      if (epoch + 1) % config.train.checkpoint_every == 0 or last or preemption.requested:
        checkpointer.save(epoch, state, host_state)
      if preemption.requested:
        logging.warning("Stopped after epoch %d on SIGTERM; rerun the same command to resume.",
                        epoch)
        break
  progress.close()
  history = log.read()
  epochs = [h for h in history if "reward_mean" in h]  # not the starting policy's validation
  if is_main and epochs:
    curve = visualize.metric_curves(
        {k: [h.get(k, math.nan) for h in epochs] for k in epochs[-1]
         if k.startswith("reward_") and k != "reward_std"},
        steps=[h["epoch"] for h in epochs], title="RL rewards per epoch (sampling policy)")
    files.save_image(curve, files.join(workdir, "reward_curve.png"))
    log.image("reward_curve", epochs[-1]["epoch"], curve)
  if is_main and validator is not None:
    curve_path = validation.write_curve(workdir, history)
    if curve_path is not None and log.wandb is not None:
      log.image("validation_curve", history[-1]["epoch"], files.read_image(curve_path))
    print(f"[rl4pix_jax] {validation.describe_best(best)}", flush=True)
  log.close()
  checkpointer.close()
  return history
