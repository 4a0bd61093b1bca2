"""Supervised stage checkpoints shipped with the repository, and how a run installs them.

The embedded default's three supervised stages (VAE, CLIP, editor UNet) take longer to train on
two CPU cores than the README's main job may last, so the repository ships their final params
in ``assets/shapes_editor/<stage>/`` (``layout.SHIPPED_EDITOR_DIR``; same layout as a workdir
stage, see ``workdir.stages``, but params only: no optimizer state) and ``launch.run_default`` copies
them into the run's workdir. ``launch.run_default --supervised=train`` trains them instead, and
``python -m tools.ship_supervised --workdir=<that run>`` regenerates the shipped folder.

A shipped stage is only used when the config that trained it matches the current one in every
field the stage depends on (``stage_fingerprint``); otherwise installing raises and names the
fields that differ.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List

import ml_collections

from rl4pix_jax.workdir import layout
from rl4pix_jax.workdir import stages as ckpt
from rl4pix_jax.workdir.checkpointer import Checkpointer

FINGERPRINT_KEY = "config_fingerprint"
# Config fields each stage's result depends on (a stage also depends on the ones it reads).
_COMMON = ("seed", "resolution", "data.dataset", "data.train_size", "data.validation_size",
           "data.test_size")
_STAGE_FIELDS = {
    "vae": _COMMON + ("model.vae", "pretrain.vae"),
    "clip": _COMMON + ("model.text_encoder", "model.vision_encoder", "pretrain.clip"),
}
_STAGE_FIELDS["unet"] = tuple(dict.fromkeys(
    _STAGE_FIELDS["vae"] + _STAGE_FIELDS["clip"] +
    ("model.unet", "model.scheduler", "pretrain.unet")))


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
  value: Any = config
  for part in dotted.split("."):
    value = value[part]
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return json.loads(json.dumps(value))  # tuples -> lists, as they come back from JSON


def stage_fingerprint(config: ml_collections.ConfigDict, stage: str) -> Dict[str, Any]:
  """The config values ``stage`` depends on, as a JSON-compatible dict keyed by dotted path."""
  layout.check_stage(stage)
  return {field: _lookup(config, field) for field in _STAGE_FIELDS[stage]}


# Settings that change how often a stage logs or saves, not what it trains.
_IRRELEVANT = ("log_every", "checkpoint_every")


def _leaves(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_leaves(value, name + "."))
    elif key not in _IRRELEVANT:
      flat[name] = value
  return flat


def fingerprint_differences(shipped: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
  """``field: shipped X, config Y`` for every differing leaf field (e.g. pretrain.unet.steps)."""
  shipped, current = _leaves(shipped), _leaves(current)
  missing = "(absent)"
  return [f"{field}: shipped {shipped.get(field, missing)!r}, config "
          f"{current.get(field, missing)!r}"
          for field in sorted(set(shipped) | set(current))
          if shipped.get(field, missing) != current.get(field, missing)]


def export_stage(workdir: str, stage: str, config: ml_collections.ConfigDict,
                 destination_root: str) -> str:
  """Writes ``<destination_root>/<stage>/``: the final params, model_config.json, metrics.

  Args:
    workdir: a run whose ``stage`` is complete (trained with ``config``).
    stage: "vae", "clip" or "unet".
    config: the run's config (its fingerprint is stored in model_config.json's metadata).
    destination_root: e.g. ``layout.SHIPPED_EDITOR_DIR``; an existing ``<stage>`` folder there is replaced.
  Returns:
    The written stage folder.
  """
  if not ckpt.stage_complete(workdir, stage):
    raise FileNotFoundError(f"{stage} is not complete in {layout.stage_dir(workdir, stage)!r}: "
                            f"run `{layout.stage_command(stage, workdir)}` first.")
  params, model_config = ckpt.latest_stage_params(workdir, stage)
  metadata = dict(model_config["metadata"])
  metadata.pop("dataset_dir", None)  # a path on the machine that trained it
  metadata[FINGERPRINT_KEY] = stage_fingerprint(config, stage)
  step = int(metadata["step"])
  final = layout.stage_dir(destination_root, stage)
  scratch = final + ".writing"
  shutil.rmtree(scratch, ignore_errors=True)
  with Checkpointer(scratch, keep=1, cleanup_tmp_directories=False) as m:
    m.save_items(step, {"params": params}, {"progress": {"step": step}})
  with open(os.path.join(scratch, layout.MODEL_CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump({"stage": stage, "models": model_config["models"], "metadata": metadata}, f,
              indent=2)
  metrics = os.path.join(layout.stage_dir(workdir, stage), layout.METRICS_FILE)
  if os.path.exists(metrics):
    shutil.copy(metrics, os.path.join(scratch, layout.METRICS_FILE))
  shutil.rmtree(final, ignore_errors=True)
  os.replace(scratch, final)
  return final


def install_stage(shipped_root: str, workdir: str, stage: str,
                  config: ml_collections.ConfigDict) -> bool:
  """Copies the shipped ``stage`` into ``workdir`` unless the workdir already has it complete.

  Returns:
    True when copied, False when the workdir's stage was already complete (left untouched).
  Raises:
    FileNotFoundError: no shipped stage in ``shipped_root``.
    FileExistsError: the workdir holds an unfinished stage (never overwritten).
    ValueError: the shipped stage was trained with a config that differs from ``config`` in a
      field the stage depends on (the message lists them and says how to train instead).
  """
  if ckpt.stage_complete(workdir, stage):
    return False
  shipped = ckpt.read_model_config(shipped_root, stage)
  if shipped is None:
    raise FileNotFoundError(
        f"No shipped {stage} checkpoint in {layout.stage_dir(shipped_root, stage)!r}. Train it "
        f"with `python -m launch.run_default --supervised=train ...` (or `"
        f"{layout.stage_command(stage, workdir)}`).")
  differences = fingerprint_differences(shipped["metadata"].get(FINGERPRINT_KEY, {}),
                                        stage_fingerprint(config, stage))
  if differences:
    raise ValueError(
        f"The shipped {stage} checkpoint was trained with another config:\n  " +
        "\n  ".join(differences) + "\nRun with --supervised=train to train the supervised "
        "stages with your config (or drop the overrides of these fields).")
  destination = layout.stage_dir(workdir, stage)
  if os.path.exists(destination):
    raise FileExistsError(
        f"{destination!r} holds an unfinished {stage} stage (an interrupted training run); "
        "it is left untouched. Finish it with --supervised=train, or move it away to use the "
        "shipped checkpoint.")
  shutil.copytree(layout.stage_dir(shipped_root, stage), destination)
  return True
