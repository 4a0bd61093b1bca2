"""metrics.jsonl (one JSON line per logged step), for RL runs TensorBoard scalars, and W&B.

Used by the RL run (keyed by ``epoch``, TensorBoard on, truncated on resume to the epochs its
checkpoint covers) and by the supervised stages (keyed by ``step``, appended to as is). An RL
run with ``config.logging.wandb`` also sends every record and picture to Weights & Biases
(``wandb_log.WandbLog``, passed in as ``wandb``).
"""

from __future__ import annotations

import json
import tempfile
from typing import Any, Dict, List, Optional

import jax
import numpy as np

from rl4pix_jax.workdir import files, layout


class MetricsLog:
  """``<folder>/metrics.jsonl`` (+ ``<folder>/tensorboard/``); writes nothing when disabled.

  The folder may be local or ``gs://`` (``workdir.files``): metrics.jsonl is rewritten whole
  on each write (object stores have no append), and TensorBoard events of a remote folder are
  written to a local scratch folder and copied to ``<folder>/tensorboard/`` after each write.

  Args:
    folder: the run or stage folder.
    resume_from: drop the lines whose ``step_key`` is >= this (what a killed run logged after
      its checkpoint); None keeps every line.
    enabled: False on every process but 0.
    step_key: the name of the step field ("epoch" for RL runs, "step" for stages).
    tensorboard: also write TensorBoard scalars.
    wandb: a ``wandb_log.WandbLog`` that gets every record and picture too (closed with this
      log), or None.
  """

  def __init__(self, folder: str, resume_from: Optional[int] = None, enabled: bool = True,
               step_key: str = "epoch", tensorboard: bool = True, wandb: Any = None):
    self.enabled = enabled
    self.step_key = step_key
    self.wandb = wandb if enabled else None
    self.path = files.join(folder, layout.METRICS_FILE)
    self.writer = None
    self._tensorboard = files.join(folder, "tensorboard")
    self._scratch = None
    if not enabled:
      return
    self._lines = self._read_lines()
    if resume_from is not None and self._lines:
      self._lines = [line for line in self._lines if json.loads(line)[step_key] < resume_from]
      files.write_text(self.path, "".join(self._lines))
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      logdir = self._tensorboard
      if files.is_remote(folder):
        self._scratch = tempfile.TemporaryDirectory(prefix="rl4pix_tensorboard_")
        logdir = self._scratch.name
      self.writer = SummaryWriter(logdir)

  def _read_lines(self) -> List[str]:
    if not files.exists(self.path):
      return []
    return [line + "\n" for line in files.read_text(self.path).splitlines() if line.strip()]

  def write(self, step: int, metrics: Dict[str, Any]) -> None:
    """Appends ``{step_key: step, **metrics}`` (numpy/jax scalars as floats)."""
    if not self.enabled:
      return
    record = {k: float(v) if isinstance(v, (np.generic, jax.Array)) else v
              for k, v in metrics.items()}
    self._lines.append(json.dumps({self.step_key: step, **record}, sort_keys=True) + "\n")
    if files.is_remote(self.path):
      files.write_text(self.path, "".join(self._lines))
    else:  # local: append, as before (a stage log can be long)
      with open(self.path, "a", encoding="utf-8") as f:
        f.write(self._lines[-1])
    if self.writer is not None:
      for name, value in record.items():
        self.writer.add_scalar(name, value, step)
      self.writer.flush()
      if self._scratch is not None:
        files.copy_tree_to(self._scratch.name, self._tensorboard)
    if self.wandb is not None:
      self.wandb.log(step, record)

  def image(self, name: str, step: int, image: Any) -> None:
    """A picture (sample grid, curve) for W&B; the caller saves its PNG in the folder."""
    if self.wandb is not None:
      self.wandb.image(name, step, image)

  def read(self) -> List[dict]:
    lines = self._read_lines()
    return [json.loads(line) for line in lines]

  def close(self):
    if self.wandb is not None:
      self.wandb.close()
      self.wandb = None
    if self.writer is not None:
      self.writer.close()
      if self._scratch is not None:
        files.copy_tree_to(self._scratch.name, self._tensorboard)
        self._scratch.cleanup()
        self._scratch = None
        self.writer = None
