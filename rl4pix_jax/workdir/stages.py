"""Checkpoints of the supervised stages: params (+ optimizer state) and model_config.json.

Layout (``workdir.layout``; the RL stage and the evaluation read it)::

  <workdir>/data/                 shapes_edit tfds data (when config.data.data_dir is empty)
  <workdir>/vae/                  Orbax CheckpointManager directory of the VAE stage:
      <step>/params               Flax param tree of AutoencoderKL (float32)
      <step>/opt_state            optax state (only to resume an interrupted stage)
      <step>/progress             JSON {"step": int}
      model_config.json           {"stage", "models": {"vae": diffusers AutoencoderKL config
                                  with the measured scaling_factor}, "metadata": {...}}
      metrics.jsonl               one JSON line of training metrics every log_every steps
  <workdir>/clip/                 same, params {"text", "vision", "logit_scale"};
                                  models {"clip": transformers CLIPConfig dict with
                                  text_config, vision_config, projection_dim}
  <workdir>/unet/                 same, params of UNet2DConditionModel (8 input channels);
                                  models {"unet": diffusers config, "scheduler": DDIM config}

``metadata`` holds ``num_steps`` (the stage's configured length), ``complete`` (True once the
final step is written) and stage-specific measurements (e.g. ``latent_std``).
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional, Tuple

import numpy as np

from rl4pix_jax.workdir import files
from rl4pix_jax.workdir.checkpointer import Checkpointer
from rl4pix_jax.workdir.layout import MODEL_CONFIG_FILE, stage_command, stage_dir

class StageNotFoundError(FileNotFoundError):
  """A stage folder without a checkpoint; ``folder`` and ``stage`` say what was looked for."""

  def __init__(self, message: str, stage: str, folder: str):
    super().__init__(message)
    self.stage, self.folder = stage, folder


def checkpoint_manager(workdir: str, stage: str, max_to_keep: int = 2) -> Checkpointer:
  """The stage's checkpointer (creates the directory)."""
  return Checkpointer(stage_dir(workdir, stage), keep=max_to_keep,
                      cleanup_tmp_directories=False)


def read_model_config(workdir: str, stage: str) -> Optional[Dict[str, Any]]:
  """The stage's model_config.json as a dict, or None when absent."""
  path = files.join(stage_dir(workdir, stage), MODEL_CONFIG_FILE)
  if not files.exists(path):
    return None
  return json.loads(files.read_text(path))


def write_model_config(workdir: str, stage: str, models: Dict[str, Any],
                       metadata: Dict[str, Any]) -> str:
  """Writes model_config.json atomically; returns its path."""
  path = files.join(stage_dir(workdir, stage), MODEL_CONFIG_FILE)
  files.write_text(path, json.dumps({"stage": stage, "models": models, "metadata": metadata},
                                    indent=2, default=_json_default))
  return path


def _json_default(value):
  if isinstance(value, (np.generic, np.ndarray)):
    return value.tolist()
  if isinstance(value, tuple):
    return list(value)
  raise TypeError(f"Not JSON serialisable: {type(value).__name__}")


def save_stage(manager: Checkpointer, workdir: str, stage: str, step: int, params: Any,
               opt_state: Any, models: Dict[str, Any], metadata: Dict[str, Any]) -> None:
  """Saves params, optimizer state and step at ``step``, and model_config.json beside them.

  Args:
    manager: from ``checkpoint_manager(workdir, stage)``.
    workdir, stage: where.
    step: number of optimizer steps done.
    params, opt_state: pytrees of arrays.
    models: model name -> diffusers/transformers-style config dict.
    metadata: must hold ``num_steps``; ``complete`` is set to ``step >= num_steps``.
  """
  if "num_steps" not in metadata:
    raise ValueError("save_stage: metadata needs 'num_steps' (the stage's configured length).")
  manager.save_items(step, {"params": params, "opt_state": opt_state},
                     {"progress": {"step": int(step)}})
  metadata = dict(metadata, step=int(step), complete=bool(step >= metadata["num_steps"]))
  write_model_config(workdir, stage, models, metadata)


def restore_training_state(manager: Checkpointer, params_like: Any,
                           opt_state_like: Any) -> Optional[Tuple[Any, Any, int]]:
  """(params, opt_state, step) of the latest checkpoint, or None when there is none."""
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore_items(step, {"params": params_like, "opt_state": opt_state_like},
                                   ("progress",))
  return restored["params"], restored["opt_state"], int(restored["progress"]["step"])


def stage_complete(workdir: str, stage: str) -> bool:
  """True when the stage's final step is written (checkpoint and model_config.json)."""
  config = read_model_config(workdir, stage)
  if not config or not config.get("metadata", {}).get("complete"):
    return False
  manager = checkpoint_manager(workdir, stage)
  step = manager.latest_step()
  manager.close()
  return step is not None and step >= config["metadata"]["num_steps"]


def latest_stage_params(workdir: str, stage: str) -> Tuple[Any, Dict[str, Any]]:
  """Params of the stage's latest checkpoint and its model_config.json dict.

  Returns:
    ``(params, model_config)``: params as nested dicts of float32 jax arrays; model_config
    with keys ``stage``, ``models``, ``metadata`` (see the module docstring).
  Raises:
    StageNotFoundError (a FileNotFoundError) naming the folder and the command that creates
    it.
  """
  folder = stage_dir(workdir, stage)
  config = read_model_config(workdir, stage)
  step = None
  if config is not None:
    manager = checkpoint_manager(workdir, stage)
    step = manager.latest_step()
  if config is None or step is None:
    raise StageNotFoundError(f"No {stage} checkpoint in {folder!r}: run "
                             f"`{stage_command(stage, workdir)}` first.", stage, folder)
  restored = manager.restore_items(step, {"params": None})
  manager.close()
  return restored["params"], config
