"""Restores a run's editor for inference: config.json + supervised/pretrained base + RL policy.

A run folder (``launch.train``'s workdir) holds ``config.json`` and ``checkpoints/``. The
editor is the run's starting point (``run_setup.rl_setup_from_config``) with its UNet
replaced by the policy (LoRA merged) of the latest or a chosen RL checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Union

import ml_collections
from absl import logging

from rl4pix_jax import editing, export, pipeline
from rl4pix_jax.rl import train_state
from rl4pix_jax.rl.run_setup import RLSetup
from rl4pix_jax.workdir import checkpointer as checkpointing
from rl4pix_jax.workdir import files, layout



class RunLoadingError(ValueError):
  """The run folder lacks what is needed (names what was looked for)."""


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The ConfigDict saved by ``trainer.train`` in ``<workdir>/config.json``, its recorded
  locations (stages, data, base model) resolved for where the folder is now."""
  path = layout.run_config_path(workdir)
  if not files.exists(path):
    raise RunLoadingError(f"No run config at {path!r}: --workdir must be a folder written by "
                          "`python -m launch.train` (it holds config.json and checkpoints/).")
  config = upgrade_attention_keys(ml_collections.ConfigDict(json.loads(files.read_text(path))))
  return layout.resolve_run_config(config, workdir)


def upgrade_attention_keys(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A run config saved before ``model.attention`` existed, given the setting it ran with.

  Such runs recorded ``model.attention_query_chunk``: None meant XLA's attention in every
  layer, an int n the chunked path with n queries per block. They become ``attention='xla'``
  or ``'chunked'`` with ``attention_chunk_queries=n`` (the flash numbers unset: neither kind
  reads them), so an old run edits and evaluates with the program it was trained with.
  Configs that have ``model.attention`` are returned unchanged.
  """
  model = config.get("model")
  if model is None or "attention" in model:
    return config
  chunk = model.get("attention_query_chunk")
  model.attention = "xla" if chunk is None else "chunked"
  model.attention_chunk_queries = chunk
  model.attention_flash_min_tokens = None
  model.attention_flash_block = None
  if "attention_query_chunk" in model:
    del model["attention_query_chunk"]
  return config


def checkpoint_epochs(workdir: str, keep: int = 1) -> list:
  """Epochs with a complete RL checkpoint in ``<workdir>/checkpoints`` (sorted)."""
  directory = layout.run_checkpoint_dir(workdir)
  if not files.isdir(directory):
    return []
  checkpointer = checkpointing.RunCheckpointer(directory, keep=max(1, keep), read_only=True)
  epochs = checkpointer.all_epochs()
  checkpointer.close()
  return sorted(epochs)


@dataclasses.dataclass
class LoadedRun:
  """A restored run.

  Attributes:
    config: the run config (``config.json``).
    setup: the run's starting point (models, initial params, tokenizer, reward CLIP).
    editor: the editor to use (the RL policy, or the starting editor when ``epoch`` is None).
    epoch: the RL checkpoint epoch restored, or None (no RL).
  """
  config: ml_collections.ConfigDict
  setup: RLSetup
  editor: editing.Editor
  epoch: Optional[int]

  def starting_editor(self) -> editing.Editor:
    """The editor before RL (supervised or pretrained), sharing models and tokenizer."""
    return editing.Editor(self.setup.models, self.setup.params, self.setup.tokenizer,
                          self.editor.max_object_tokens, self.editor.capture_size,
                          self.editor.resolution, self.editor.sampler_defaults)


def load_run(workdir: str, step: Optional[Union[int, str]] = None,
             use_rl: Optional[bool] = None) -> LoadedRun:
  """Restores a run.

  Args:
    workdir: the run folder.
    step: RL checkpoint epoch (default: the latest), or "best": the checkpoint of the best
      validation success (``<workdir>/checkpoints_best``, ``rl/validation.py``).
    use_rl: True: the RL policy (error if no checkpoint); False: the run's starting editor
      (supervised or pretrained, no RL); None: the RL policy if a checkpoint exists, else the
      starting editor with a log line saying so.
  Raises:
    RunLoadingError: no config.json, or no (or not that) checkpoint where one is needed.
    CheckpointError: no checkpoint can be read (an unreadable newest one falls back to the
      newest readable one, with a warning).
  """
  config = read_run_config(workdir)
  epochs = checkpoint_epochs(workdir, config.train.keep_checkpoints)
  checkpoints = layout.run_checkpoint_dir(workdir)
  directory = None
  if step == "best":
    from rl4pix_jax.rl import validation  # pylint: disable=import-outside-toplevel
    if use_rl is False:
      raise RunLoadingError("--step=best names an RL checkpoint; leave out --no_rl.")
    try:
      step = validation.best_epoch(workdir, config)
    except ValueError as e:
      raise RunLoadingError(str(e)) from e
    directory = checkpoints = layout.run_best_checkpoint_dir(workdir)
    epochs = [step]
  elif step is not None and not isinstance(step, int):
    raise RunLoadingError(f"--step={step}: pass an RL checkpoint epoch (an integer) or 'best'.")
  if step is not None and step not in epochs:
    raise RunLoadingError(f"No RL checkpoint for --step={step} in {checkpoints!r}; it has "
                          f"epochs {epochs}.")
  if use_rl and not epochs:
    raise RunLoadingError(f"No RL checkpoint in {checkpoints!r}; train with `python -m "
                          f"launch.train --workdir={workdir}` or pass --no_rl.")
  from rl4pix_jax.rl import run_setup  # pylint: disable=import-outside-toplevel
  setup = run_setup.rl_setup_from_config(config, workdir)
  params, epoch = setup.params, None
  if use_rl is False:
    logging.info("Using the run's starting editor (no RL), as asked.")
  elif not epochs:
    logging.warning("No RL checkpoint in %r: using the run's starting editor (supervised or "
                    "pretrained, no RL).", checkpoints)
  else:
    unet, epoch = train_state.restore_policy(config, workdir, params.unet, step, directory)
    params = pipeline.EditorParams(unet=unet, vae=params.vae, text_encoder=params.text_encoder)
    logging.info("Restored the RL policy of epoch %d from %r.", epoch, checkpoints)
  # A run of the embedded default's own tiny editor knows one image size (the supervised
  # stages' config.resolution); a pretrained (Stable Diffusion) editor edits any multiple.
  resolution = None if config.model.pretrained else config.resolution
  editor = editing.Editor(setup.models, params, setup.tokenizer,
                          max_object_tokens=config.data.max_object_tokens,
                          capture_size=config.sampler.capture_size or None,
                          resolution=resolution,
                          sampler_defaults=export.sampler_settings(config.sampler))
  return LoadedRun(config=config, setup=setup, editor=editor, epoch=epoch)


def load_run_editor(workdir: str, step: Optional[Union[int, str]] = None,
                    use_rl: Optional[bool] = None) -> editing.Editor:
  """The editor of ``load_run`` (same arguments)."""
  return load_run(workdir, step, use_rl).editor


def load_pretrained_editor(path_or_hub_id: str, max_object_tokens: int = 8,
                           capture_size: Optional[int] = None) -> editing.Editor:
  """An ``Editor`` of a diffusers InstructPix2Pix folder or hub id (float32).

  ``editor.sampler_defaults`` holds the sampler an exported run recorded
  (``export.SAMPLER_FILE``: num_steps, guidance_scale, image_guidance_scale, eta), or {}.
  """
  models, params, tokenizer = pipeline.load_diffusers_editor(path_or_hub_id)
  return editing.Editor(models, params, tokenizer, max_object_tokens=max_object_tokens,
                        capture_size=capture_size,
                        sampler_defaults=export.read_sampler(path_or_hub_id))
