"""Running the project's commands from tests: a CPU-only environment and a tiny run's flags."""

import os
from typing import List

import jax


def cli_env(tmp) -> dict:
  """CPU only, temporary files under ``tmp``, this session's XLA compilation cache."""
  return dict(os.environ, JAX_PLATFORMS="cpu", TMPDIR=str(tmp),
              JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")


def tiny_run_flags(num_epochs: int) -> List[str]:
  """``launch.train`` flags of a run on 8 shapes edits at 32x32, two samples per call."""
  return [
      "--config.resolution=32", "--config.data.train_size=8", "--config.data.validation_size=4",
      "--config.data.test_size=4", "--config.sampler.num_steps=2",
      "--config.sampler.capture_size=16", f"--config.train.num_epochs={num_epochs}",
      "--config.train.sample_batch_size=2", "--config.train.samples_per_prompt=1",
      "--config.train.num_sample_batches=1",
      "--config.train.train_batch_size=2", "--config.train.checkpoint_every=1",
      "--config.data.num_threads=1",
      # Validation (default eval_every): the start and the last epoch, on 2 edits.
      "--config.train.eval_examples=2",
  ]
