"""Validation during RL: edit a fixed validation subset with the current policy, log val_*.

A pass edits the first ``train.eval_examples`` examples of ``train.eval_split`` with the
policy's UNet (LoRA merged as ``launch.edit``/``launch.evaluate`` restore it), seed 0, eta 0
and the run's ``sampler.num_steps`` and guidance, and scores them with the evaluation's own
code (``evaluation.scoring.evaluate``): its metrics are those of
``launch.evaluate --workdir=<run> --step=<epoch> --split=<eval_split>
--max_examples=<eval_examples>``. The noise comes from that fixed seed, so a pass neither
draws from nor moves the training PRNG keys or the data iterator, and every pass reuses the
same compiled editing function (``editing.edit_batch``; params are arguments).

When (``Validator.due``): the starting policy once before the first update (logged as epoch
``BEFORE_FIRST_EPOCH`` = -1), then the policy after epoch e's update when
``(e + 1) % train.eval_every == 0`` and after the last epoch; those values are merged into
epoch e's line of metrics.jsonl, the policy that checkpoint e holds. ``val_samples_seen`` =
(e + 1) x samples per epoch (0 for the start).

Best checkpoint: the epoch of the highest ``val_<best metric>`` (``success`` on shapes_edit,
``clip_t`` on MagicBrush; ties keep the earlier epoch) is saved to ``<workdir>/
checkpoints_best/<epoch>`` (one checkpoint, whatever ``train.keep_checkpoints`` deletes), and
``Best`` rides in every checkpoint's host state under ``"validation"``, so a resumed run keeps
it. ``launch.edit/evaluate/export --step=best`` and ``run_loading.load_run(step="best")`` load
it. Only RL checkpoints compete: the starting policy's value is logged and kept in ``Best.start``
for comparison.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Dict, List, Optional, Sequence

from absl import logging
import jax
import ml_collections

from rl4pix_jax import editing, pipeline, visualize
from rl4pix_jax.metrics import shapes_metrics
from rl4pix_jax.workdir import checkpointer as checkpointing
from rl4pix_jax.workdir import files
from rl4pix_jax.workdir import layout

PREFIX = "val_"
BEFORE_FIRST_EPOCH = -1  # the metrics.jsonl "epoch" of the starting policy's pass
SEED = 0  # launch.evaluate's default --seed
CURVE_FILE = "validation_curve.png"
CURVE_METRICS = ("success", "edit_ok", "preserved_ok", "attention_mass_inside", "clip_t")
_KEEP_ALL = 1_000_000  # the best folder's old checkpoints are removed here, not by Orbax


class ValidationError(ValueError):
  """Validation cannot run as configured (the message names the --config flag)."""


def enabled(config: ml_collections.ConfigDict) -> bool:
  return int(config.train.eval_every) > 0


def best_metric(dataset: str) -> str:
  """The validation metric the best checkpoint is chosen by."""
  return "success" if dataset == "shapes_edit" else "clip_t"


@dataclasses.dataclass
class Best:
  """The best validated RL checkpoint so far (host state, JSON-able).

  Attributes:
    metric: the metric compared (``best_metric``).
    epoch: the epoch of the best checkpoint, or None before the first validated epoch.
    value: its value.
    start: the starting policy's value (before any update), or None.
  """
  metric: str
  epoch: Optional[int] = None
  value: Optional[float] = None
  start: Optional[float] = None

  def update(self, epoch: int, value: float) -> bool:
    """Records ``value`` of ``epoch``; True when it is a new best (strictly higher: a tie
    keeps the earlier epoch; a NaN never wins)."""
    if not math.isfinite(value):
      return False
    if self.value is None or value > self.value:
      self.epoch, self.value = int(epoch), float(value)
      return True
    return False

  def state_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_host(cls, host: Optional[dict], metric: str) -> "Best":
    """The ``Best`` of a checkpoint's host state (a fresh one when it has none)."""
    saved = (host or {}).get("validation")
    if not saved or saved.get("metric") != metric:
      return cls(metric=metric)
    return cls(**{f.name: saved.get(f.name) for f in dataclasses.fields(cls)})


def _host_arrays(tree: Any) -> Any:
  """Leaves that span processes gathered onto every host (each process then edits alone)."""
  leaves = jax.tree_util.tree_leaves(tree)
  if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in leaves):
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return multihost_utils.process_allgather(tree, tiled=True)
  return tree


def load_examples(config: ml_collections.ConfigDict, workdir: str) -> List[dict]:
  """The first ``train.eval_examples`` of ``train.eval_split`` of the run's dataset."""
  # pylint: disable=import-outside-toplevel
  from rl4pix_jax import evaluation
  from rl4pix_jax.rl import run_setup
  split = config.train.eval_split
  try:
    return evaluation.load_examples(run_setup.prepare_dataset(config, workdir), split,
                                    config.resolution, config.train.eval_examples)
  except ValueError as e:
    raise ValidationError(f"--config.train.eval_split={split}: {e} Pass a split the dataset "
                          "has, or --config.train.eval_every=0 to train without "
                          "validation.") from e


class Validator:
  """Edits and scores the validation examples with given policy UNet params.

  Args:
    config: the run config.
    setup: the run's ``RLSetup`` (models, tokenizer, VAE/text params, reward CLIP).
    examples: the validation examples (``evaluation.load_examples`` /
      ``evaluation.decode_examples``).
  """

  def __init__(self, config: ml_collections.ConfigDict, setup: Any, examples: Sequence[dict]):
    # pylint: disable=import-outside-toplevel
    from rl4pix_jax.evaluation import scoring
    if not examples:
      raise ValidationError("--config.train.eval_examples: the validation subset is empty.")
    self.config, self.setup, self.examples = config, setup, list(examples)
    self.eval_every = int(config.train.eval_every)
    self.num_epochs = int(config.train.num_epochs)
    self.dataset = config.data.dataset
    self.metric = best_metric(self.dataset)
    self.settings = scoring.SamplerSettings(
        num_steps=config.sampler.num_steps, guidance_scale=config.sampler.guidance_scale,
        image_guidance_scale=config.sampler.image_guidance_scale, eta=0.0, seed=SEED)
    clip = dict(clip_text=setup.clip_text_model, clip_vision=setup.clip_vision_model,
                clip_params=setup.clip_params)
    if self.dataset == "shapes_edit":
      if setup.clip_params is None:
        raise ValidationError(
            "--config.train.eval_every: the shapes validation metrics include CLIP-T, which "
            "needs the run's reward CLIP; set --config.reward.clip_model=<CLIPModel folder> "
            "(with a clip_weight > 0) or --config.train.eval_every=0.")
      self.keys = list(shapes_metrics.SHAPES_METRICS)
      self.score = functools.partial(scoring.shapes_per_example, tokenizer=setup.tokenizer,
                                     batch_size=self.settings.batch_size, **clip)
    else:  # MagicBrush: what the run's own models can score (no shapes check, no DINO)
      self.keys = [k for k in scoring.RUN_MODEL_METRICS
                   if k != "clip_t" or setup.clip_params is not None]
      self.score = functools.partial(scoring.run_model_per_example, tokenizer=setup.tokenizer,
                                     batch_size=self.settings.batch_size, **clip)
    # launch.evaluate's editor (run_loading.load_run): same resolution rule and options.
    self.resolution = None if config.model.pretrained else config.resolution
    self.keep_best = bool(config.train.keep_best) and self.metric in self.keys

  def due(self, epoch: int) -> bool:
    """Whether the policy after epoch ``epoch``'s update is validated."""
    return (epoch + 1) % self.eval_every == 0 or epoch == self.num_epochs - 1

  def editor(self, unet_params: Any) -> editing.Editor:
    params = self.setup.params
    return editing.Editor(
        self.setup.models, pipeline.EditorParams(unet=_host_arrays(unet_params), vae=params.vae,
                                                 text_encoder=params.text_encoder),
        self.setup.tokenizer, max_object_tokens=self.config.data.max_object_tokens,
        capture_size=self.config.sampler.capture_size or None,
        resolution=self.resolution)

  def evaluate(self, unet_params: Any, name: str = "validation"):
    """The ``scoring.EvaluationResult`` of one pass."""
    from rl4pix_jax.evaluation import scoring  # pylint: disable=import-outside-toplevel
    return scoring.evaluate(name, self.editor(unet_params), self.examples, self.settings,
                            self.score, self.keys)

  def run(self, unet_params: Any, samples_seen: int) -> Dict[str, float]:
    """One pass: {"val_<metric>": mean, "val_examples", "val_samples_seen", "val_time_s"}."""
    start = time.perf_counter()
    result = self.evaluate(unet_params)
    record = {PREFIX + k: (math.nan if result.summary[k]["mean"] is None
                           else float(result.summary[k]["mean"])) for k in self.keys}
    record.update({PREFIX + "examples": float(len(self.examples)),
                   PREFIX + "samples_seen": float(samples_seen),
                   PREFIX + "time_s": time.perf_counter() - start})
    logging.info("Validation (%d edits, %d samples seen): %s in %.1f s.", len(self.examples),
                 samples_seen, ", ".join(f"{k}={record[PREFIX + k]:.4f}" for k in self.keys),
                 record[PREFIX + "time_s"])
    return record


# ---- the best checkpoint ---------------------------------------------------------------------

def _remove_epochs(directory: str, epochs: Sequence[int]) -> None:
  """Deletes checkpoint folders (process 0), then waits for every process."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    for epoch in epochs:
      folder = epath.Path(directory) / str(epoch)
      if folder.exists():
        folder.rmtree()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices("rl4pix_jax: best checkpoint folders removed")


def save_best(workdir: str, epoch: int, state: Any, host: dict) -> None:
  """Makes the checkpoint of ``epoch`` the only one in ``<workdir>/checkpoints_best``.

  The new one is written (complete) before the old one is removed, so a crash in between
  leaves a best checkpoint; a folder of the same epoch (a killed run's, redone on resume) is
  replaced.
  """
  directory = layout.run_best_checkpoint_dir(workdir)
  checkpointer = checkpointing.RunCheckpointer(directory, keep=_KEEP_ALL)
  try:
    existing = checkpointer.all_steps()
    if epoch in existing:
      _remove_epochs(checkpointer.directory, [epoch])
      checkpointer.reload()
    checkpointer.save(epoch, state, host)
    _remove_epochs(checkpointer.directory, [e for e in existing if e != epoch])
  finally:
    checkpointer.close()


def best_epochs(workdir: str) -> List[int]:
  """The complete checkpoints in ``<workdir>/checkpoints_best`` (one after a run)."""
  directory = layout.run_best_checkpoint_dir(workdir)
  if not files.isdir(directory):
    return []
  checkpointer = checkpointing.RunCheckpointer(directory, keep=_KEEP_ALL, read_only=True)
  try:
    return checkpointer.all_epochs()
  finally:
    checkpointer.close()


def best_epoch(workdir: str, config: ml_collections.ConfigDict) -> int:
  """The epoch of ``--step=best``.

  Raises:
    ValueError: the run kept no best checkpoint (the message names the flag to train with).
  """
  epochs = best_epochs(workdir)
  if epochs:
    return epochs[-1]
  if not enabled(config):
    raise ValueError(f"--step=best: {workdir} was trained without validation "
                     f"(--config.train.eval_every={config.train.eval_every}); train "
                     "with --config.train.eval_every=5 to keep the best checkpoint, or pass "
                     "--step=<epoch>.")
  if not config.train.keep_best:
    raise ValueError(f"--step=best: {workdir} was trained with --config.train.keep_best=False, "
                     "so no best checkpoint was kept; pass --step=<epoch>.")
  raise ValueError(f"--step=best: {workdir} has no best checkpoint in "
                   f"{layout.run_best_checkpoint_dir(workdir)!r} yet (no validated epoch; "
                   "see --config.train.eval_every); pass --step=<epoch>.")


# ---- pictures --------------------------------------------------------------------------------

def validation_rows(history: Sequence[dict]) -> List[dict]:
  """The metrics.jsonl lines that hold a validation pass, in order."""
  return [h for h in history if PREFIX + "samples_seen" in h]


def write_curve(workdir: str, history: Sequence[dict]) -> Optional[str]:
  """``<workdir>/validation_curve.png``: the val_* metrics against samples seen."""
  rows = validation_rows(history)
  if not rows:
    return None
  series = {k: [r.get(PREFIX + k, math.nan) for r in rows] for k in CURVE_METRICS
            if any(PREFIX + k in r for r in rows)}
  if not series:
    return None
  path = files.join(workdir, CURVE_FILE)
  files.save_image(visualize.metric_curves(
      series, steps=[r[PREFIX + "samples_seen"] for r in rows],
      title=f"Validation val_* ({int(rows[-1][PREFIX + 'examples'])} edits, eta 0)",
      x_label="samples seen", size=(800, 360)), path)
  return path


def describe_best(best: Best) -> str:
  """One line on the best checkpoint and the starting policy."""
  if best.epoch is None:
    return "no validated RL epoch yet"
  line = f"best validation {best.metric} {best.value:.4f} at epoch {best.epoch}"
  if best.start is not None and math.isfinite(best.start):
    line += f" (starting policy {best.start:.4f}"
    line += ": higher than every RL checkpoint; --no_rl edits with it)" \
        if best.start > best.value else ")"
  return line


def samples_seen(after_epochs: int, samples_per_epoch: int) -> int:
  return int(after_epochs) * int(samples_per_epoch)
