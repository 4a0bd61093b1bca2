"""The evaluation loop: edit a dataset split with fixed seeds, compute metrics, write reports.

Shared by ``launch.evaluate`` and the default run (which evaluates the supervised and the RL
editor on the same examples and seeds). Examples are a split's first ``max_examples`` records
in stored order, decoded at one resolution. Example i of a split is edited with the noise of
``Editor.edit(seed=seed)`` at position i (single-turn), so every model sees the same noise.
Multi-turn (MagicBrush): examples are grouped by image (``example_id = "<img_id>-<turn>"``);
turn k > 1 edits the editor's own output of turn k - 1 instead of the stored source, and turn
k's noise is ``seed + k``.

Metrics: ``shapes_edit`` -> ``metrics.shapes_metrics.SHAPES_METRICS`` (needs the run's CLIP
towers); ``magicbrush`` -> ``metrics.image_metrics.magicbrush_metrics`` (CLIP ViT-B/32 and DINO
ViT-S/16 in ``image_metrics.EvaluationModels``). Each summary has a percentile-bootstrap 95% CI.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rl4pix_jax import visualize
from rl4pix_jax.data import records, shapes
from rl4pix_jax.metrics import image_metrics, intervals, shapes_metrics
from rl4pix_jax.tokenizer import tokenize

DATASETS = ("shapes_edit", "magicbrush")
SETTINGS = ("single_turn", "multi_turn")
FIGURE_EXAMPLES = 8


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """Sampler options of an evaluation (the same for every compared model)."""
  num_steps: int = 20
  guidance_scale: float = 7.5
  image_guidance_scale: float = 1.5
  eta: float = 0.0
  seed: int = 0
  batch_size: int = 8


@dataclasses.dataclass
class EvaluationResult:
  """One model's evaluation.

  Attributes:
    name: the model's row name.
    example_ids: N ids in evaluation order.
    per_example: {metric: (N,) float32}.
    summary: ``intervals.metrics_report`` JSON dict (mean, CI, n per metric).
    row: the markdown table row.
    edited: N (R, R, 3) uint8 edits.
    attention_maps: N (r, r) float32 maps or Nones.
  """
  name: str
  example_ids: List[str]
  per_example: Dict[str, np.ndarray]
  summary: dict
  row: str
  edited: List[np.ndarray]
  attention_maps: List[Optional[np.ndarray]]


def load_examples(dataset_dir: str, split: str, resolution: int,
                  max_examples: Optional[int] = None) -> List[dict]:
  """The first ``max_examples`` records of a split, decoded (``records.decode_record``) at
  ``resolution``, each with ``index`` (its position in the split) and ``record`` (raw)."""
  from rl4pix_jax.data import loader  # pylint: disable=import-outside-toplevel
  source = loader.open_split(dataset_dir, split)
  count = len(source) if max_examples is None else min(max_examples, len(source))
  if count == 0:
    raise ValueError(f"Split {split!r} of {dataset_dir!r} has no examples to evaluate.")
  out = []
  for i in range(count):
    record = source[i]
    example = records.decode_record(record, resolution, i)
    example.update(index=i, record=record)
    out.append(example)
  return out


def turn_key(example_id: str) -> tuple:
  """(image id, turn) of a MagicBrush ``"<img_id>-<turn>"`` id; (id, 1) without a turn."""
  head, _, tail = example_id.rpartition("-")
  return (head, int(tail)) if head and tail.isdigit() else (example_id, 1)


def edit_examples(editor: Any, examples: Sequence[dict], settings: SamplerSettings,
                  multi_turn: bool = False, attention: bool = True):
  """Edits every example; returns (N edited (R,R,3) uint8, N maps or Nones) in input order.

  ``attention`` records the object phrase's map when every example has a phrase.
  """
  phrases = [e["object_phrase"] for e in examples]
  record = attention and all(phrases)
  options = dict(num_steps=settings.num_steps, guidance_scale=settings.guidance_scale,
                 image_guidance_scale=settings.image_guidance_scale, eta=settings.eta,
                 batch_size=settings.batch_size)
  if not multi_turn:
    result = editor.edit([e["source"] for e in examples], [e["instruction"] for e in examples],
                         seed=settings.seed, object_phrases=phrases if record else None,
                         **options)
    return result.images, result.attention_maps
  keys = [turn_key(e["example_id"]) for e in examples]
  edited: List[Optional[np.ndarray]] = [None] * len(examples)
  maps: List[Optional[np.ndarray]] = [None] * len(examples)
  previous: Dict[str, np.ndarray] = {}
  for turn in sorted({k[1] for k in keys}):
    indices = [i for i, k in enumerate(keys) if k[1] == turn]
    sources = [previous.get(keys[i][0], examples[i]["source"]) for i in indices]
    result = editor.edit(sources, [examples[i]["instruction"] for i in indices],
                         seed=settings.seed + turn,
                         object_phrases=[phrases[i] for i in indices] if record else None,
                         **options)
    for j, i in enumerate(indices):
      edited[i], maps[i] = result.images[j], result.attention_maps[j]
      previous[keys[i][0]] = result.images[j]
  return edited, maps


def _batches(count: int, size: int):
  for start in range(0, count, size):
    yield slice(start, min(start + size, count))


def shapes_per_example(examples: Sequence[dict], edited: Sequence[np.ndarray],
                       maps: Sequence[np.ndarray], tokenizer: Any, clip_text: Any,
                       clip_vision: Any, clip_params: Mapping, batch_size: int = 8
                       ) -> Dict[str, np.ndarray]:
  """``shapes_metrics.shapes_example_metrics`` over all examples: {metric: (N,) float32}."""
  if any(m is None for m in maps):
    raise ValueError("The shapes metrics need attention maps: edit with attention=True.")
  out: Dict[str, List[np.ndarray]] = {k: [] for k in shapes_metrics.SHAPES_METRICS}
  for part in _batches(len(examples), batch_size):
    chunk = examples[part]
    arrays = {
        "source": np.stack([c["source"] for c in chunk]).astype(np.float32) / 127.5 - 1.0,
        "target": np.stack([c["target"] for c in chunk]).astype(np.float32) / 127.5 - 1.0,
        "mask": np.stack([c["mask"] for c in chunk]),
        "caption_ids": tokenize(tokenizer, [c["target_caption"] for c in chunk]),
    }
    pixels = np.stack(edited[part]).astype(np.float32) / 127.5 - 1.0
    wanted = [shapes.example_from_record(c["record"], c["index"]) for c in chunk]
    values = shapes_metrics.shapes_example_metrics(
        pixels, arrays, np.stack(maps[part]), wanted, clip_text, clip_params["text"],
        clip_vision, clip_params["vision"])
    for key, value in values.items():
      out[key].append(np.asarray(value, np.float32))
  return {k: np.concatenate(v) for k, v in out.items()}


_jit_magicbrush = jax.jit(image_metrics.magicbrush_metrics)


def magicbrush_per_example(examples: Sequence[dict], edited: Sequence[np.ndarray],
                           models: image_metrics.EvaluationModels, tokenizer: Any,
                           batch_size: int = 8) -> Dict[str, np.ndarray]:
  """MagicBrush metrics of each example: {"l1", "l2", "clip_i", "dino", "clip_t",
  "clip_t_oracle"} -> (N,) float32. Edits are resized to the target size first."""
  out: Dict[str, List[np.ndarray]] = {}
  for part in _batches(len(examples), batch_size):
    chunk = examples[part]
    target = jnp.asarray(np.stack([c["target"] for c in chunk]), jnp.float32) / 255.0
    images = jnp.asarray(np.stack(edited[part]), jnp.float32) / 255.0
    images = image_metrics.resize_to(images, target.shape[1], target.shape[2])
    ids = jnp.asarray(tokenize(tokenizer, [c["target_caption"] for c in chunk]))
    for key, value in _jit_magicbrush(models, images, target, ids).items():
      out.setdefault(key, []).append(np.asarray(value, np.float32))
  return {k: np.concatenate(v) for k, v in out.items()}


def evaluate(name: str, editor: Any, examples: Sequence[dict], settings: SamplerSettings,
             per_example_fn, keys: Sequence[str], multi_turn: bool = False,
             attention: bool = True) -> EvaluationResult:
  """Edits ``examples`` and scores them with ``per_example_fn(examples, edited, maps)``."""
  edited, maps = edit_examples(editor, examples, settings, multi_turn, attention)
  per_example = per_example_fn(examples, edited, maps)
  summary, row = intervals.metrics_report(per_example, name, keys, seed=settings.seed)
  return EvaluationResult(name=name, example_ids=[e["example_id"] for e in examples],
                          per_example=per_example, summary=summary, row=row, edited=edited,
                          attention_maps=maps)


def markdown_table(results: Sequence[EvaluationResult], keys: Sequence[str],
                   reference_rows: Sequence[str] = (), title: str = "") -> str:
  """A markdown table: a header, one row per result, then any reference rows."""
  lines = ([f"### {title}", ""] if title else []) + [intervals.markdown_header(keys)]
  lines += [r.row for r in results] + list(reference_rows)
  return "\n".join(lines) + "\n"


def example_figure(examples: Sequence[dict], result: EvaluationResult, path: str,
                   count: int = FIGURE_EXAMPLES, cell: int = 128) -> str:
  """PNG of the first ``count`` examples: source | edit | attention overlay | target."""
  rows = []
  for example, image, attention in list(zip(examples, result.edited,
                                            result.attention_maps))[:count]:
    overlay = (visualize.attention_overlay(image, attention) if attention is not None
               else np.zeros_like(image))
    rows.append([example["source"], image, overlay, example["target"]])
  grid = visualize.captioned_grid(rows, [e["instruction"] for e in examples[:count]],
                                  ("source", "edit", "attention", "target"), cell=cell,
                                  title=result.name)
  grid.save(path)
  return path


def write_reports(results: Sequence[EvaluationResult], examples: Sequence[dict],
                  keys: Sequence[str], output_prefix: str, metadata: Mapping[str, Any],
                  reference_rows: Sequence[str] = ()) -> Dict[str, str]:
  """Writes ``<prefix>.json`` (metadata, summaries, per-example values), ``<prefix>.md``
  (the table) and ``<prefix>_<i>.png`` (example figure per result). Returns the paths."""
  folder = os.path.dirname(output_prefix)
  if folder:
    os.makedirs(folder, exist_ok=True)
  report = dict(metadata)
  report["models"] = {r.name: {"summary": r.summary,
                               "per_example": {k: [float(x) if np.isfinite(x) else None
                                                   for x in v]
                                               for k, v in r.per_example.items()}}
                      for r in results}
  report["example_ids"] = results[0].example_ids if results else []
  paths = {"json": output_prefix + ".json", "markdown": output_prefix + ".md"}
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, allow_nan=False, default=str)
  title = f"{metadata.get('dataset', '')} {metadata.get('split', '')} " \
          f"({metadata.get('setting', '')}, {len(examples)} examples)"
  with open(paths["markdown"], "w", encoding="utf-8") as f:
    f.write(markdown_table(results, keys, reference_rows, title))
  for i, result in enumerate(results):
    paths[f"figure_{i}"] = example_figure(examples, result, f"{output_prefix}_{i}.png")
  return paths
