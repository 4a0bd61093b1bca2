"""Shapes data for the supervised stages: build when missing, load a split into memory.

The stages are small enough to hold a whole split in host memory (2000 examples at 32x32 are
~50 MB); batches are then drawn by index with a NumPy generator seeded by (seed, step), so an
interrupted stage resumes with exactly the batches it would have seen.
"""

from __future__ import annotations

from typing import Dict, List

import numpy as np

from rl4pix_jax import tokenizer as tokenizer_lib
from rl4pix_jax.data import loader
from rl4pix_jax.data import shapes
from rl4pix_jax.workdir import datasets


def ensure_shapes_dataset(config, workdir: str) -> str:
  """Folder of the shapes_edit dataset the config names (``workdir.datasets.ensure_dataset``).

  Args:
    config: the stage config; ``data.dataset`` must be shapes_edit.
    workdir: the stages root (the data lives in ``layout.data_dir(config, workdir)``).
  Returns:
    the tfds dataset folder (the one holding dataset_info.json).
  """
  if config.data.dataset != "shapes_edit":
    raise ValueError(f"The supervised stages train on shapes_edit, got "
                     f"config.data.dataset={config.data.dataset!r}.")
  return datasets.ensure_dataset(config, workdir)


def load_split(dataset_dir: str, split: str, resolution: int, max_examples: int = 0,
               num_threads: int = 2) -> loader.EditBatch:
  """A whole split (or its first ``max_examples``) as one ``EditBatch`` (unshuffled).

  Arrays are those of ``loader`` (images (N, R, R, 3) float32 in [-1, 1], ids (N, 77) ...).
  """
  source = loader.open_split(dataset_dir, split)
  size = len(source) if max_examples <= 0 else min(max_examples, len(source))
  config = loader.LoaderConfig(batch_size=min(size, 256), resolution=resolution, shuffle=False,
                               num_epochs=1, drop_remainder=False, num_threads=num_threads)
  iterator = loader.make_edit_iterator(source, tokenizer_lib.load_clip_tokenizer(), config)
  batches: List[loader.EditBatch] = []
  count = 0
  for batch in iterator:
    batches.append(batch)
    count += len(batch.texts["instruction"])
    if count >= size:
      break
  arrays = {k: np.concatenate([b.arrays[k] for b in batches])[:size] for k in batches[0].arrays}
  texts = {k: sum((b.texts[k] for b in batches), [])[:size] for k in batches[0].texts}
  return loader.EditBatch(arrays, texts)


def load_examples(dataset_dir: str, split: str, count: int) -> List[shapes.ShapesEditExample]:
  """The first ``count`` examples of a split as ``ShapesEditExample`` (for ``check_edit``)."""
  source = loader.open_split(dataset_dir, split)
  return [shapes.example_from_record(source[i], i) for i in range(min(count, len(source)))]


def batch_indices(seed: int, step: int, size: int, batch_size: int) -> np.ndarray:
  """(batch_size,) int indices into a split of ``size`` for ``step`` (deterministic)."""
  rng = np.random.default_rng([seed, step])
  return rng.choice(size, batch_size, replace=size < batch_size)


def take(arrays: Dict[str, np.ndarray], indices: np.ndarray) -> Dict[str, np.ndarray]:
  """Rows ``indices`` of every array."""
  return {k: v[indices] for k, v in arrays.items()}
