"""The per-epoch batch arithmetic of an RL run, and the per-prompt repetition of examples."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np


class TrainingError(RuntimeError):
  """The run cannot continue (inconsistent config, repeated non-finite updates, ...)."""



@dataclasses.dataclass(frozen=True)
class BatchArithmetic:
  """The per-epoch sizes, validated against the device and process counts."""
  sample_batch_size: int
  num_sample_batches: int
  samples_per_epoch: int
  train_batch_size: int
  minibatches_per_inner_epoch: int
  num_inner_epochs: int
  updates_per_epoch: int
  per_process_sample_batch: int
  batch_devices: int
  samples_per_prompt: int = 1

  def describe(self) -> str:
    return (f"{self.samples_per_epoch} samples per epoch = {self.num_sample_batches} sampling "
            f"calls x {self.sample_batch_size} (global; {self.per_process_sample_batch} per "
            f"process, split over {self.batch_devices} devices; {self.samples_per_prompt} "
            f"sample(s) per prompt); {self.num_inner_epochs} inner "
            f"epoch(s) x {self.minibatches_per_inner_epoch} minibatches of "
            f"{self.train_batch_size} = {self.updates_per_epoch} optimizer updates per epoch")


def batch_arithmetic(config: ml_collections.ConfigDict, batch_devices: int,
                     process_count: int) -> BatchArithmetic:
  """Checks that the batch sizes fit each other and the mesh; names the numbers if not."""
  t = config.train
  problems = []
  samples = t.sample_batch_size * t.num_sample_batches
  if t.sample_batch_size % batch_devices:
    problems.append(f"train.sample_batch_size={t.sample_batch_size} is not divisible by the "
                    f"{batch_devices} devices the batch is split over")
  if t.train_batch_size % batch_devices:
    problems.append(f"train.train_batch_size={t.train_batch_size} is not divisible by the "
                    f"{batch_devices} devices the batch is split over")
  if samples % t.train_batch_size:
    problems.append(f"samples per epoch = train.sample_batch_size x train.num_sample_batches "
                    f"= {t.sample_batch_size} x {t.num_sample_batches} = {samples} is not "
                    f"divisible by train.train_batch_size={t.train_batch_size}")
  if t.sample_batch_size % process_count:
    problems.append(f"train.sample_batch_size={t.sample_batch_size} is not divisible by the "
                    f"{process_count} processes")
  repeats = samples_per_prompt(config)
  if repeats < 1 or t.sample_batch_size % (repeats * process_count):
    problems.append(f"train.sample_batch_size={t.sample_batch_size} is not divisible by "
                    f"train.samples_per_prompt={repeats} x {process_count} processes (each "
                    "process draws sample_batch_size / samples_per_prompt examples per call)")
  if problems:
    raise TrainingError("Inconsistent batch sizes: " + "; ".join(problems) + ".")
  minibatches = samples // t.train_batch_size
  return BatchArithmetic(
      sample_batch_size=t.sample_batch_size, num_sample_batches=t.num_sample_batches,
      samples_per_epoch=samples, train_batch_size=t.train_batch_size,
      minibatches_per_inner_epoch=minibatches, num_inner_epochs=config.ppo.num_inner_epochs,
      updates_per_epoch=minibatches * config.ppo.num_inner_epochs,
      per_process_sample_batch=t.sample_batch_size // process_count,
      batch_devices=batch_devices, samples_per_prompt=repeats)


def samples_per_prompt(config: ml_collections.ConfigDict) -> int:
  """``train.samples_per_prompt`` (1 when the config predates it)."""
  return int(config.train.samples_per_prompt)


def repeat_prompts(batch: Any, repeats: int) -> Any:
  """Each example of an ``EditBatch`` ``repeats`` times in a row (arrays and texts).

  The sampler draws independent noise per row, so the copies are different samples of the same
  prompt: DDPO's per-prompt advantages then compare samples of one prompt with each other.
  """
  if repeats == 1:
    return batch
  arrays = {k: np.repeat(v, repeats, axis=0) for k, v in batch.arrays.items()}
  texts = {k: [t for t in v for _ in range(repeats)] for k, v in batch.texts.items()}
  return dataclasses.replace(batch, arrays=arrays, texts=texts)
