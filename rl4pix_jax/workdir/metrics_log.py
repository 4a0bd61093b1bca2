"""metrics.jsonl (one JSON line per logged step) and, for RL runs, TensorBoard scalars.

Used by the RL run (keyed by ``epoch``, TensorBoard on, truncated on resume to the epochs its
checkpoint covers) and by the supervised stages (keyed by ``step``, appended to as is).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

import jax
import numpy as np

from rl4pix_jax.workdir import layout


class MetricsLog:
  """``<folder>/metrics.jsonl`` (+ ``<folder>/tensorboard/``); writes nothing when disabled.

  Args:
    folder: the run or stage folder.
    resume_from: drop the lines whose ``step_key`` is >= this (what a killed run logged after
      its checkpoint); None keeps every line.
    enabled: False on every process but 0.
    step_key: the name of the step field ("epoch" for RL runs, "step" for stages).
    tensorboard: also write TensorBoard scalars.
  """

  def __init__(self, folder: str, resume_from: Optional[int] = None, enabled: bool = True,
               step_key: str = "epoch", tensorboard: bool = True):
    self.enabled = enabled
    self.step_key = step_key
    self.path = os.path.join(folder, layout.METRICS_FILE)
    self.writer = None
    if not enabled:
      return
    if resume_from is not None and os.path.exists(self.path):
      with open(self.path, encoding="utf-8") as f:
        kept = [line for line in f
                if line.strip() and json.loads(line)[step_key] < resume_from]
      with open(self.path, "w", encoding="utf-8") as f:
        f.writelines(kept)
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self.writer = SummaryWriter(os.path.join(folder, "tensorboard"))

  def write(self, step: int, metrics: Dict[str, Any]) -> None:
    """Appends ``{step_key: step, **metrics}`` (numpy/jax scalars as floats)."""
    if not self.enabled:
      return
    record = {k: float(v) if isinstance(v, (np.generic, jax.Array)) else v
              for k, v in metrics.items()}
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps({self.step_key: step, **record}, sort_keys=True) + "\n")
    if self.writer is not None:
      for name, value in record.items():
        self.writer.add_scalar(name, value, step)
      self.writer.flush()

  def read(self) -> List[dict]:
    if not os.path.exists(self.path):
      return []
    with open(self.path, encoding="utf-8") as f:
      return [json.loads(line) for line in f if line.strip()]

  def close(self):
    if self.writer is not None:
      self.writer.close()
