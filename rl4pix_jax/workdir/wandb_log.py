"""Weights & Biases logging of an RL run (``config.logging.wandb``), next to metrics.jsonl.

What goes to W&B: every record ``MetricsLog.write`` writes (the same keys as metrics.jsonl,
validation's ``val_*`` included), the sample grids (``samples``) and, at the end of the run,
``reward_curve`` and ``validation_curve``. The x axis of every chart is the ``epoch`` (or a
stage's ``step``) metric, not W&B's own step counter: the starting policy's validation is
logged at epoch -1, and a resumed run logs again the epochs its checkpoint did not cover.

Resuming: the W&B run id is kept in ``<workdir>/wandb_run.json``; a run that resumes from a
checkpoint opens the same W&B run (``resume="allow"``), a fresh start opens a new one. (W&B
keeps the lines a killed run logged after its last checkpoint; metrics.jsonl drops them.)

Offline: ``WANDB_MODE=offline`` writes ``<workdir>/wandb/offline-run-*/run-<id>.wandb`` (upload
later with ``wandb sync``). A ``gs://`` workdir keeps the id file there and W&B's local files in
a temporary folder.

wandb is an optional dependency (requirements-demo.txt); it is imported only when enabled.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import tempfile
from typing import Any, Dict, Optional

import ml_collections

from rl4pix_jax.workdir import files

RUN_FILE = "wandb_run.json"
INSTALL_HINT = "pip install -r requirements-demo.txt"


class WandbUnavailableError(ValueError):
  """config.logging.wandb is on but wandb is not installed."""


def run_file(workdir: str) -> str:
  return files.join(workdir, RUN_FILE)


def recorded_run_id(workdir: str) -> Optional[str]:
  """The W&B run id a run folder recorded, or None."""
  path = run_file(workdir)
  if not files.exists(path):
    return None
  return json.loads(files.read_text(path)).get("id")


def new_run_id() -> str:
  """8 random lowercase letters and digits (what wandb generates itself)."""
  alphabet = string.ascii_lowercase + string.digits
  return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbLog:
  """One W&B run of a run folder.

  Args:
    config: the full run config (logged as the W&B run's config; ``config.logging`` names
      the project, entity and run name).
    workdir: the run folder (local or ``gs://``).
    resume: continue the W&B run recorded in the folder (when there is one).
    step_key: the metric every chart is plotted against ("epoch" for RL runs).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, resume: bool,
               step_key: str = "epoch"):
    try:
      import wandb  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise WandbUnavailableError(
          f"--config.logging.wandb=True needs the wandb package ({e}); {INSTALL_HINT}, or "
          "leave W&B off (metrics.jsonl and TensorBoard are always written).") from None
    self._wandb = wandb
    self.step_key = step_key
    logging_config = config.logging
    run_id = recorded_run_id(workdir) if resume else None
    self.resumed = run_id is not None
    if run_id is None:
      run_id = new_run_id()
    self._scratch = None
    if files.is_remote(workdir):
      self._scratch = tempfile.TemporaryDirectory(prefix="rl4pix_wandb_")
      local_dir = self._scratch.name
    else:
      local_dir = os.fspath(workdir)
      os.makedirs(local_dir, exist_ok=True)
    name = logging_config.wandb_run_name or os.path.basename(os.fspath(workdir).rstrip("/"))
    self.run = wandb.init(
        project=logging_config.wandb_project or None,
        entity=logging_config.wandb_entity or None,
        name=name, id=run_id, resume="allow", dir=local_dir,
        config=config.to_dict(), settings=wandb.Settings(console="off"))
    self.run_id = run_id
    self.run.define_metric(step_key)
    self.run.define_metric("*", step_metric=step_key)
    files.write_text(run_file(workdir), json.dumps(
        {"id": run_id, "project": logging_config.wandb_project,
         "entity": logging_config.wandb_entity, "name": name}, indent=2) + "\n")

  def log(self, step: int, record: Dict[str, Any]) -> None:
    """One metrics.jsonl record (floats, ints, strings)."""
    self.run.log({self.step_key: step, **record})

  def image(self, name: str, step: int, image: Any, caption: Optional[str] = None) -> None:
    """A picture (PIL image or uint8 array) under ``name`` at ``step``."""
    self.run.log({self.step_key: step, name: self._wandb.Image(image, caption=caption)})

  def close(self) -> None:
    if self.run is not None:
      self.run.finish()
      self.run = None
    if self._scratch is not None:
      self._scratch.cleanup()
      self._scratch = None


def from_config(config: ml_collections.ConfigDict, workdir: str, resume: bool,
                enabled: bool = True, step_key: str = "epoch") -> Optional[WandbLog]:
  """A ``WandbLog`` when ``config.logging.wandb`` is on (and ``enabled``: process 0), else
  None."""
  if not (enabled and config.logging.wandb):
    return None
  return WandbLog(config, workdir, resume=resume, step_key=step_key)
