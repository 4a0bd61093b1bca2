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
"""

from __future__ import annotations

import os

import ml_collections

STAGES = ("vae", "clip", "unet")
MODEL_CONFIG_FILE = "model_config.json"
METRICS_FILE = "metrics.jsonl"
RUN_CONFIG_FILE = "config.json"
RUN_CHECKPOINTS = "checkpoints"
# The supervised stages shipped with the repository (params only), relative to the repository
# root: the working directory of every command, as for --config=configs/shapes.py.
SHIPPED_EDITOR_DIR = os.path.join("assets", "shapes_editor")


def check_stage(stage: str) -> None:
  """Raises ValueError unless ``stage`` is one of ``STAGES``."""
  if stage not in STAGES:
    raise ValueError(f"Unknown stage {stage!r}; expected one of {STAGES}.")


def stage_dir(workdir: str, stage: str) -> str:
  """``<workdir>/<stage>`` as an absolute path (Orbax needs absolute paths)."""
  check_stage(stage)
  return os.path.abspath(os.path.join(os.path.expanduser(workdir), stage))


def stage_command(stage: str, workdir: str) -> str:
  """The command that creates a stage's checkpoint."""
  return (f"python -m launch.pretrain --config=configs/shapes.py:{stage} "
          f"--workdir={workdir}")


def stages_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The stages root of an RL run in ``workdir``: config or the workdir's parent."""
  configured = config.model.stages_dir
  return configured or os.path.dirname(os.path.abspath(workdir.rstrip("/")))


def data_dir(config: ml_collections.ConfigDict, stages_root: str) -> str:
  """``config.data.data_dir`` or, when empty, ``<stages_root>/data``."""
  return os.path.expanduser(config.data.data_dir or os.path.join(stages_root, "data"))


def run_checkpoint_dir(workdir: str) -> str:
  """``<workdir>/checkpoints``: the RL run's Orbax checkpoints."""
  return os.path.join(workdir, RUN_CHECKPOINTS)


def run_config_path(workdir: str) -> str:
  """``<workdir>/config.json``: the config an RL run was started with."""
  return os.path.join(workdir, RUN_CONFIG_FILE)
