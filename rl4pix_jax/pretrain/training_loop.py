"""The loop every supervised stage shares: resume, jitted steps, logging, checkpoints.

Checkpoints, metrics and folders come from ``workdir/`` (shared with the RL stage).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

import jax
import optax
from absl import logging
from tqdm import tqdm

from rl4pix_jax.workdir import stages as ckpt
from rl4pix_jax.workdir.layout import stage_dir
from rl4pix_jax.workdir.metrics_log import MetricsLog


def stage_optimizer(settings, num_steps: int) -> optax.GradientTransformation:
  """AdamW (no weight decay) with global-norm clipping and a warmup + cosine schedule.

  Args:
    settings: the stage's config dict: ``learning_rate`` (peak), and optionally
      ``warmup_steps`` (linear from 0, default 0; at most half the stage, so a smoke run with
      a couple of steps still trains), ``final_lr_fraction`` (the cosine ends at peak x this,
      default 1.0 = constant after warmup) and ``max_grad_norm`` (default 1.0).
    num_steps: the stage's total number of steps (the cosine's length).
  """
  peak = float(settings["learning_rate"])
  final = float(settings.get("final_lr_fraction", 1.0))
  requested = int(settings.get("warmup_steps", 0))
  if requested < 0 or not 0.0 <= final <= 1.0 or num_steps < 1:
    raise ValueError(f"Learning-rate schedule: warmup_steps={requested} must be >= 0, "
                     f"final_lr_fraction={final} in [0, 1] and steps={num_steps} >= 1.")
  warmup = min(requested, num_steps // 2)
  if warmup < requested:
    logging.warning("warmup_steps=%d is more than half of steps=%d: warming up for %d.",
                    requested, num_steps, warmup)
  if warmup == 0 and final == 1.0:
    schedule = optax.constant_schedule(peak)
  else:
    schedule = optax.warmup_cosine_decay_schedule(0.0 if warmup else peak, peak, warmup,
                                                  max(num_steps, warmup + 1), peak * final)
  return optax.chain(optax.clip_by_global_norm(float(settings.get("max_grad_norm", 1.0))),
                     optax.adamw(schedule, weight_decay=0.0))


def completed_stage(workdir: str, stage: str) -> Optional[Dict[str, Any]]:
  """The model_config.json dict of ``stage`` when it is complete in ``workdir`` (and says it
  skips it), else None: every stage's ``train_*`` starts with this."""
  if not ckpt.stage_complete(workdir, stage):
    return None
  logging.info("%s: final checkpoint exists in %s, skipping.", stage, stage_dir(workdir, stage))
  print(f"{stage}: complete in {stage_dir(workdir, stage)}, skipping.")
  return ckpt.read_model_config(workdir, stage)


def run_training(workdir: str, stage: str, num_steps: int, params: Any, opt_state: Any,
                 train_step: Callable, make_batch: Callable[[int], Any], seed: int,
                 log_every: int, checkpoint_every: int, models: Dict[str, Any],
                 metadata: Dict[str, Any]):
  """Trains from the latest checkpoint (or the given init) up to ``num_steps``.

  Args:
    train_step: jitted ``(params, opt_state, batch, key) -> (params, opt_state, metrics)``.
    make_batch: step -> batch (deterministic in the step, so resuming sees the same data).
    seed: the step key is ``fold_in(PRNGKey(seed), step)``.
    models, metadata: written to model_config.json at every checkpoint (see
      ``workdir.stages.save_stage``); ``num_steps`` is added to metadata.
  Returns:
    ``(params, opt_state, last_metrics)`` after the last step; the final checkpoint is
    written by the caller (``save_stage``) once stage-specific metadata is known.
  """
  manager = ckpt.checkpoint_manager(workdir, stage)
  metadata = dict(metadata, num_steps=num_steps)
  start = 0
  restored = ckpt.restore_training_state(manager, params, opt_state)
  if restored is not None:
    params, opt_state, start = restored
    logging.info("%s: resuming from step %d of %d.", stage, start, num_steps)
  base_key = jax.random.PRNGKey(seed)
  log = MetricsLog(stage_dir(workdir, stage), step_key="step", tensorboard=False)
  metrics: Dict[str, float] = {}
  started = time.time()
  for step in tqdm(range(start, num_steps), desc=stage, initial=start, total=num_steps):
    batch = make_batch(step)
    params, opt_state, step_metrics = train_step(params, opt_state, batch,
                                                 jax.random.fold_in(base_key, step))
    done = step + 1
    if done % log_every == 0 or done == num_steps:
      metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      record = dict(metrics, step=done, elapsed_s=round(time.time() - started, 2))
      logging.info("%s step %d: %s", stage, done, record)
      print(f"{stage} step {done}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
            flush=True)
      log.write(done, dict(metrics, elapsed_s=record["elapsed_s"]))
    if done % checkpoint_every == 0 and done < num_steps:
      ckpt.save_stage(manager, workdir, stage, done, params, opt_state, models, metadata)
  return params, opt_state, metrics, manager


def finish_stage(manager, workdir: str, stage: str, num_steps: int, params: Any,
                 opt_state: Any, models: Dict[str, Any], metadata: Dict[str, Any]) -> None:
  """Writes the final checkpoint (marks the stage complete) and closes the manager."""
  ckpt.save_stage(manager, workdir, stage, num_steps, params, opt_state, models,
                  dict(metadata, num_steps=num_steps))
  manager.close()
