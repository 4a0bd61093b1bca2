"""Where things live: the stages root, its data, a run's files, and the shipped editor stages.

The embedded default keeps everything of one experiment under one root::

  <stages root>/data/       the tfds data (when config.data.data_dir is empty)
  <stages root>/vae/        the supervised stages (``workdir.stages``): Orbax steps,
  <stages root>/clip/       model_config.json, metrics.jsonl
  <stages root>/unet/
  <stages root>/<run>/      an RL run (``launch.train --workdir``): config.json,
                            checkpoints/, metrics.jsonl, tensorboard/, samples/

The stages root of an RL run is ``config.model.stages_dir`` or, when empty, the run folder's
parent. Paths may be local or ``gs://``.

A run folder is portable: its ``config.json`` records where the run's inputs are
(``RUN_PATH_FIELDS``: the stages root, the data, a local pretrained editor and reward CLIP), each
``./<path>`` relative to the run folder when inside it and absolute otherwise
(``portable_run_config``); ``resolve_run_config`` reads them back against the folder the run is
in now. So ``cp -r runs/x/rl elsewhere`` edits and evaluates from ``elsewhere`` with the same
stages.
"""

from __future__ import annotations

import copy
import os
import posixpath

import ml_collections

STAGES = ("vae", "clip", "unet")
MODEL_CONFIG_FILE = "model_config.json"
METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "config.json"
RUN_CHECKPOINTS = "checkpoints"
# The RL checkpoint with the best validation success (train.keep_best), beside checkpoints/.
RUN_BEST_CHECKPOINT = "checkpoints_best"
# The supervised stages shipped with the repository (params only), relative to the repository
# root: the working directory of every command, as for --config=configs/shapes.py.
SHIPPED_EDITOR_DIR = os.path.join("assets", "shapes_editor")


def check_stage(stage: str) -> None:
  """Raises ValueError unless ``stage`` is one of ``STAGES``."""
  if stage not in STAGES:
    raise ValueError(f"Unknown stage {stage!r}; expected one of {STAGES}.")


def stage_dir(workdir: str, stage: str) -> str:
  """``<workdir>/<stage>`` as an absolute path (Orbax needs absolute paths) or URL."""
  check_stage(stage)
  if _is_url(workdir):
    return workdir.rstrip("/") + "/" + stage
  return os.path.abspath(os.path.join(os.path.expanduser(workdir), stage))


def stage_command(stage: str, workdir: str) -> str:
  """The command that creates a stage's checkpoint."""
  return (f"python -m launch.pretrain --config=configs/shapes.py:{stage} "
          f"--workdir={workdir}")


def stages_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The stages root of an RL run in ``workdir``: config or the workdir's parent."""
  configured = config.model.stages_dir
  if configured:
    return configured
  run = workdir.rstrip("/")
  if _is_url(run):  # gs://bucket/exp/rl -> gs://bucket/exp (os.path.abspath would make it local)
    return posixpath.dirname(run)
  return os.path.dirname(os.path.abspath(os.path.expanduser(run)))


# Config fields holding a location a run reads from (a hub id or gs:// URL stays as it is).
RUN_PATH_FIELDS = ("model.stages_dir", "data.data_dir", "model.pretrained", "reward.clip_model")
RELATIVE_PREFIX = "./"  # a recorded path relative to the run folder (hub ids never start so)


def _is_url(path: str) -> bool:
  return "://" in path


def recorded_path(path: str, workdir: str) -> str:
  """``path`` as a run folder records it: ``./<relative>`` inside ``workdir``, else absolute."""
  if not path:
    return path
  if not _is_url(path):
    path = os.path.abspath(os.path.expanduser(path))
  run = workdir.rstrip("/")
  if not _is_url(run):
    run = os.path.abspath(os.path.expanduser(run))
  if path.rstrip("/") == run:
    return RELATIVE_PREFIX + "."
  if path.startswith(run + "/") or path.startswith(run + os.sep):
    return RELATIVE_PREFIX + path[len(run) + 1:]
  return path


def resolved_path(recorded: str, workdir: str) -> str:
  """The inverse of ``recorded_path`` for the run folder's current location."""
  if recorded.startswith(RELATIVE_PREFIX):
    relative = recorded[len(RELATIVE_PREFIX):]
    if _is_url(workdir):
      return workdir.rstrip("/") + "/" + relative
    return os.path.normpath(os.path.join(os.path.abspath(os.path.expanduser(workdir)), relative))
  return recorded


def portable_run_config(config: ml_collections.ConfigDict,
                        workdir: str) -> ml_collections.ConfigDict:
  """A copy of the run config with every ``RUN_PATH_FIELDS`` location resolved and recorded
  (``recorded_path``): what ``trainer.train`` writes to ``<workdir>/config.json``."""
  config = copy.deepcopy(config)
  root = stages_dir(config, workdir)
  config.data.data_dir = recorded_path(data_dir(config, root), workdir)
  config.model.stages_dir = recorded_path(root, workdir)
  for section, key in (("model", "pretrained"), ("reward", "clip_model")):
    value = config[section][key]
    if value and os.path.isdir(os.path.expanduser(value)):  # a local folder, not a hub id
      config[section][key] = recorded_path(value, workdir)
  return config


def resolve_run_config(config: ml_collections.ConfigDict,
                       workdir: str) -> ml_collections.ConfigDict:
  """The run config of ``<workdir>/config.json`` with its recorded locations resolved."""
  for field in RUN_PATH_FIELDS:
    section, key = field.split(".")
    if section in config and key in config[section] and config[section][key]:
      config[section][key] = resolved_path(config[section][key], workdir)
  return config


def data_dir(config: ml_collections.ConfigDict, stages_root: str) -> str:
  """``config.data.data_dir`` or, when empty, ``<stages_root>/data``."""
  return os.path.expanduser(config.data.data_dir or os.path.join(stages_root, "data"))


def run_checkpoint_dir(workdir: str) -> str:
  """``<workdir>/checkpoints``: the RL run's Orbax checkpoints."""
  return os.path.join(workdir, RUN_CHECKPOINTS)


def run_best_checkpoint_dir(workdir: str) -> str:
  """``<workdir>/checkpoints_best``: the RL checkpoint of the best validation success."""
  return os.path.join(workdir, RUN_BEST_CHECKPOINT)


def run_config_path(workdir: str) -> str:
  """``<workdir>/config.json``: the config an RL run was started with."""
  return os.path.join(workdir, RUN_CONFIG_FILE)
