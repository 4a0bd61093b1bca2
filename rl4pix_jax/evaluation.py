"""The evaluation loop: edit a dataset split with fixed seeds, compute metrics, write reports.

Shared by ``launch.evaluate`` and the default run (which evaluates the supervised and the RL
editor on the same examples and seeds). Single-turn: examples are a split's first
``max_examples`` records in stored order, decoded at one resolution; example i is edited from
its stored source with the noise of ``Editor.edit(seed=seed)`` at position i, so every model
sees the same noise, and every example is scored.

Multi-turn (MagicBrush's "final turn" setting): records are grouped into sessions by image
(``example_id = "<img_id>-<turn>"``), ordered by image id (numerically when it is a number:
the split's stored order is a hash order); ``max_examples`` counts sessions, and each
session's turns must be exactly 1..K. Examples come session by session, turns ascending. Turn 1 edits the stored source; turn k > 1 edits the editor's own
output of turn k - 1 (never the stored source); turn k of every session is edited in one call
with seed ``seed + k``, sessions at their position among those having a turn k. Only the final
turn of each session is scored (as ``evaluation/image_eval.py`` scores ``<id>_iter_K.png``);
every turn's scores are kept in the report too.

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
from PIL import Image

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
    inputs: N (R, R, 3) uint8 images each edit started from (the stored source, or in
      multi-turn the previous turn's edit); None when not recorded.
    scored: indices of the examples in ``summary``/``row`` (all of them single-turn; the
      final turn of each session multi-turn); None means all.

  ``example_ids``, ``per_example``, ``edited``, ``attention_maps`` and ``inputs`` cover every
  edited example; ``scored_ids``/``scored_per_example`` are the scored subset.
  """
  name: str
  example_ids: List[str]
  per_example: Dict[str, np.ndarray]
  summary: dict
  row: str
  edited: List[np.ndarray]
  attention_maps: List[Optional[np.ndarray]]
  inputs: Optional[List[np.ndarray]] = None
  scored: Optional[List[int]] = None

  @property
  def scored_indices(self) -> List[int]:
    return list(range(len(self.example_ids))) if self.scored is None else list(self.scored)

  @property
  def scored_ids(self) -> List[str]:
    return [self.example_ids[i] for i in self.scored_indices]

  @property
  def scored_per_example(self) -> Dict[str, np.ndarray]:
    index = np.asarray(self.scored_indices, np.int64)
    return {k: np.asarray(v)[index] for k, v in self.per_example.items()}


def load_examples(dataset_dir: str, split: str, resolution: int,
                  max_examples: Optional[int] = None, multi_turn: bool = False) -> List[dict]:
  """Examples of a split, decoded (``records.decode_record``) at ``resolution``, each with
  ``index`` (its position in the split) and ``record`` (raw).

  Single-turn: the first ``max_examples`` records in stored order. Multi-turn: the first
  ``max_examples`` sessions (see the module docstring), every turn of each, ordered by
  ``session_order``.

  Raises:
    ValueError: an empty selection, ``max_examples`` < 1, or (multi-turn) an incomplete or
      repeated session (``session_order``).
  """
  from rl4pix_jax.data import loader  # pylint: disable=import-outside-toplevel
  if max_examples is not None and max_examples < 1:
    raise ValueError(f"max_examples={max_examples}: pass a positive number of "
                     f"{'sessions' if multi_turn else 'examples'} (or leave it out for all).")
  source = loader.open_split(dataset_dir, split)
  if len(source) == 0:
    raise ValueError(f"Split {split!r} of {dataset_dir!r} has no examples to evaluate.")
  if multi_turn:
    ids = [records.as_text(source[i]["example_id"]) for i in range(len(source))]
    sessions = session_order(ids)
    indices = [i for session in sessions[:max_examples] for i in session]
  else:
    count = len(source) if max_examples is None else min(max_examples, len(source))
    indices = list(range(count))
  out = []
  for i in indices:
    record = source[i]
    example = records.decode_record(record, resolution, i)
    example.update(index=i, record=record)
    out.append(example)
  return out


def turn_key(example_id: str) -> tuple:
  """(image id, turn) of a MagicBrush ``"<img_id>-<turn>"`` id; (id, 1) without a turn."""
  head, _, tail = example_id.rpartition("-")
  return (head, int(tail)) if head and tail.isdigit() else (example_id, 1)


def session_order(example_ids: Sequence[str]) -> List[List[int]]:
  """Multi-turn sessions of a list of ids: per image id (sorted: numerically when the id is a
  number, numbers first), the positions of its turns sorted by turn.

  Raises:
    ValueError: an (image, turn) that occurs twice, or a session whose turns are not exactly
      1..K (the message names the session and the fix).
  """
  sessions: Dict[str, Dict[int, int]] = {}
  for position, example_id in enumerate(example_ids):
    image, turn = turn_key(example_id)
    turns = sessions.setdefault(image, {})
    if turn in turns:
      raise ValueError(f"Multi-turn: example id {example_id!r} occurs twice (positions "
                       f"{turns[turn]} and {position}); each (image, turn) must be unique. "
                       "Rebuild the dataset from shards without duplicated rows.")
    turns[turn] = position
  out = []
  for image in sorted(sessions, key=lambda i: (0, int(i), i) if i.isdigit() else (1, 0, i)):
    turns = sessions[image]
    ordered = sorted(turns)
    if ordered != list(range(1, len(ordered) + 1)):
      missing = sorted(set(range(1, max(ordered) + 1)) - set(ordered))
      raise ValueError(
          f"Multi-turn: session {image!r} has turns {ordered}, but turns must be exactly "
          f"1..K (missing: {missing}), since each turn edits the previous turn's output. "
          "A record skipped at build "
          "time (--skip_bad_records) or a partial split does this: fix or restore the "
          "record and rebuild the dataset, or evaluate with --setting=single_turn.")
    out.append([turns[t] for t in ordered])
  return out


def final_turn_indices(example_ids: Sequence[str]) -> List[int]:
  """Positions of each session's final turn (the multi-turn scores), in session order."""
  return [session[-1] for session in session_order(example_ids)]


def edit_examples(editor: Any, examples: Sequence[dict], settings: SamplerSettings,
                  multi_turn: bool = False, attention: bool = True):
  """Edits every example, in input order.

  Returns:
    (edited, maps, inputs): N edited (R, R, 3) uint8, N maps or Nones, and the N images each
    edit started from (the stored sources; multi-turn, the previous turn's edit for turn > 1).
  ``attention`` records the object phrase's map when every example has a phrase.
  """
  phrases = [e["object_phrase"] for e in examples]
  record = attention and all(phrases)
  options = dict(num_steps=settings.num_steps, guidance_scale=settings.guidance_scale,
                 image_guidance_scale=settings.image_guidance_scale, eta=settings.eta,
                 batch_size=settings.batch_size)
  if not multi_turn:
    sources = [e["source"] for e in examples]
    result = editor.edit(sources, [e["instruction"] for e in examples],
                         seed=settings.seed, object_phrases=phrases if record else None,
                         **options)
    return result.images, result.attention_maps, sources
  sessions = session_order([e["example_id"] for e in examples])
  edited: List[Optional[np.ndarray]] = [None] * len(examples)
  maps: List[Optional[np.ndarray]] = [None] * len(examples)
  inputs: List[Optional[np.ndarray]] = [None] * len(examples)
  for turn in range(1, max(len(s) for s in sessions) + 1):
    chained = [s for s in sessions if len(s) >= turn]
    indices = [s[turn - 1] for s in chained]
    for session, i in zip(chained, indices):
      inputs[i] = examples[i]["source"] if turn == 1 else edited[session[turn - 2]]
    result = editor.edit([inputs[i] for i in indices],
                         [examples[i]["instruction"] for i in indices],
                         seed=settings.seed + turn,
                         object_phrases=[phrases[i] for i in indices] if record else None,
                         **options)
    for j, i in enumerate(indices):
      edited[i], maps[i] = result.images[j], result.attention_maps[j]
  return edited, maps, inputs


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
    if images.shape != target.shape:  # resampling at the same size would blur the pixels
      images = image_metrics.resize_to(images, target.shape[1], target.shape[2])
    ids = jnp.asarray(tokenize(tokenizer, [c["target_caption"] for c in chunk]))
    for key, value in _jit_magicbrush(models, images, target, ids).items():
      out.setdefault(key, []).append(np.asarray(value, np.float32))
  return {k: np.concatenate(v) for k, v in out.items()}


def load_magicbrush_models(clip_model: str, dino_model: str) -> image_metrics.EvaluationModels:
  """The MagicBrush metric models: a transformers CLIPModel folder (or hub id) and a DINO ViT
  folder (or hub id). DINO's resize before the crop scales with the ViT's image size
  (``image_metrics.dino_resize_for``: 256 for 224).

  Raises:
    ValueError: naming the flag (``--clip_model``/``--dino_model``), the path and the problem;
    OSError: a hub id that cannot be downloaded (e.g. offline), likewise named.
  """
  # pylint: disable=import-outside-toplevel
  from rl4pix_jax.models import clip, vit
  from rl4pix_jax.weights import folders, transformers_clip, transformers_vit
  try:
    loaded = transformers_clip.load_clip(folders.resolve_pretrained(clip_model))
  except (ValueError, OSError) as e:
    raise type(e)(f"--clip_model={clip_model}: {e} MagicBrush's CLIP-I/CLIP-T need a "
                  "transformers CLIPModel folder or hub id (openai/clip-vit-base-patch32)."
                  ) from e
  if loaded.vision_config.projection_dim is None or loaded.text_config.projection_dim is None:
    raise ValueError(f"--clip_model={clip_model}: the CLIP towers have no projection_dim; "
                     "pass a full CLIPModel folder (openai/clip-vit-base-patch32).")
  try:
    vit_config, vit_params = transformers_vit.load_vit(folders.resolve_pretrained(dino_model))
  except (ValueError, OSError) as e:
    raise type(e)(f"--dino_model={dino_model}: {e} MagicBrush's DINO metric needs a "
                  "transformers ViTModel folder or hub id (facebook/dino-vits16).") from e
  return image_metrics.EvaluationModels(
      clip_text_params=loaded.text_params, clip_vision_params=loaded.vision_params,
      dino_params=vit_params, clip_text=clip.CLIPTextModel(loaded.text_config),
      clip_vision=clip.CLIPVisionModel(loaded.vision_config), dino=vit.ViTModel(vit_config),
      dino_resize=image_metrics.dino_resize_for(vit_config.image_size))


def evaluate(name: str, editor: Any, examples: Sequence[dict], settings: SamplerSettings,
             per_example_fn, keys: Sequence[str], multi_turn: bool = False,
             attention: bool = True) -> EvaluationResult:
  """Edits ``examples`` and scores them with ``per_example_fn(examples, edited, maps)``.

  Every edit is scored; the summary and row cover all examples single-turn, and the final
  turn of each session multi-turn.
  """
  edited, maps, inputs = edit_examples(editor, examples, settings, multi_turn, attention)
  per_example = per_example_fn(examples, edited, maps)
  ids = [e["example_id"] for e in examples]
  scored = final_turn_indices(ids) if multi_turn else list(range(len(examples)))
  result = EvaluationResult(name=name, example_ids=ids, per_example=per_example, summary={},
                            row="", edited=edited, attention_maps=maps, inputs=inputs,
                            scored=scored)
  result.summary, result.row = intervals.metrics_report(result.scored_per_example, name, keys,
                                                        seed=settings.seed)
  return result


def markdown_table(results: Sequence[EvaluationResult], keys: Sequence[str],
                   reference_rows: Sequence[str] = (), title: str = "",
                   notes: Sequence[str] = ()) -> str:
  """A markdown table: a header, one row per result, then any reference rows and notes."""
  lines = ([f"### {title}", ""] if title else []) + [intervals.markdown_header(keys)]
  lines += [r.row for r in results] + list(reference_rows)
  if notes:
    lines += [""] + list(notes)
  return "\n".join(lines) + "\n"


def example_figure(examples: Sequence[dict], result: EvaluationResult, path: str,
                   count: int = FIGURE_EXAMPLES, cell: int = 128) -> str:
  """PNG of the first ``count`` examples: input | edit | attention overlay | target (the
  input is the previous turn's edit for multi-turn turns > 1)."""
  inputs = result.inputs or [e["source"] for e in examples]
  rows = []
  for example, start, image, attention in list(zip(examples, inputs, result.edited,
                                                   result.attention_maps))[:count]:
    overlay = (visualize.attention_overlay(image, attention) if attention is not None
               else np.zeros_like(image))
    rows.append([start, image, overlay, example["target"]])
  captions = [f"{e['example_id']}: {e['instruction']}" for e in examples[:count]]
  grid = visualize.captioned_grid(rows, captions, ("input", "edit", "attention", "target"),
                                  cell=cell, title=result.name)
  grid.save(path)
  return path


def comparison_figure(examples: Sequence[dict], results: Sequence[EvaluationResult], path: str,
                      count: int = FIGURE_EXAMPLES, cell: int = 96) -> str:
  """PNG comparing models on the first ``count`` examples, one row each: input, then edit and
  attention overlay of every model (same examples and seeds), then the target."""
  columns = ["input"]
  for i in range(len(results)):
    columns += [f"edit {i + 1}", f"attention {i + 1}"]
  columns.append("target")
  inputs = results[0].inputs or [e["source"] for e in examples]
  rows = []
  for i, example in enumerate(examples[:count]):
    row = [inputs[i]]
    for r in results:
      attention = r.attention_maps[i]
      row += [r.edited[i], visualize.attention_overlay(r.edited[i], attention)
              if attention is not None else np.zeros_like(r.edited[i])]
    rows.append(row + [example["target"]])
  captions = [f"{e['example_id']}: {e['instruction']}" for e in examples[:count]]
  visualize.captioned_grid(rows, captions, columns, cell=cell,
                           title="   ".join(f"{i + 1}: {r.name}" for i, r in
                                          enumerate(results))).save(path)
  return path


def edit_file_name(example_id: str, multi_turn: bool, magicbrush_layout: bool) -> str:
  """Relative PNG path of an edit: MagicBrush's ``testResults`` layout
  (``<img_id>/<img_id>_1.png`` for turn 1, ``<img_id>_inde_<k>.png`` single-turn and
  ``<img_id>_iter_<k>.png`` multi-turn for turn k > 1), else ``<example_id>.png``."""
  safe = lambda text: text.replace(os.sep, "_").replace("/", "_")  # noqa: E731
  if not magicbrush_layout:
    return safe(example_id) + ".png"
  image, turn = turn_key(example_id)
  image = safe(image)
  suffix = "1" if turn == 1 else f"{'iter' if multi_turn else 'inde'}_{turn}"
  return os.path.join(image, f"{image}_{suffix}.png")


def save_edits(result: EvaluationResult, folder: str, multi_turn: bool,
               magicbrush_layout: bool) -> List[str]:
  """Writes every edit of ``result`` as a PNG under ``folder`` (``edit_file_name``); returns
  the paths in example order. The PNGs hold exactly the pixels that were scored."""
  paths = []
  for example_id, image in zip(result.example_ids, result.edited):
    path = os.path.join(folder, edit_file_name(example_id, multi_turn, magicbrush_layout))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(image, np.uint8)).save(path)
    paths.append(path)
  return paths


def _json_values(values) -> list:
  return [float(x) if np.isfinite(x) else None for x in np.asarray(values, np.float64)]


def write_reports(results: Sequence[EvaluationResult], examples: Sequence[dict],
                  keys: Sequence[str], output_prefix: str, metadata: Mapping[str, Any],
                  reference_rows: Sequence[str] = (), notes: Sequence[str] = (),
                  save_edited: bool = False, magicbrush_layout: bool = False
                  ) -> Dict[str, str]:
  """Writes ``<prefix>.json`` (metadata, summaries, per-example values), ``<prefix>.md``
  (the table, then ``notes``), ``<prefix>_<i>.png`` (example figure per result),
  ``<prefix>_comparison.png`` when there are several results (``comparison_figure``) and, with
  ``save_edited``, every edit under ``<prefix>_edits/<i>/`` (``save_edits``).

  JSON: ``example_ids`` and each model's ``per_example`` are the scored examples; when only
  part of the edits is scored (multi-turn), each model also has ``all_turns`` with every
  edit's id and values. Returns the paths.
  """
  folder = os.path.dirname(output_prefix)
  if folder:
    os.makedirs(folder, exist_ok=True)
  report = dict(metadata)
  report["models"] = {}
  for r in results:
    entry = {"summary": r.summary,
             "per_example": {k: _json_values(v) for k, v in r.scored_per_example.items()}}
    if len(r.scored_indices) != len(r.example_ids):
      entry["all_turns"] = {"example_ids": list(r.example_ids),
                            "per_example": {k: _json_values(v)
                                            for k, v in r.per_example.items()}}
    report["models"][r.name] = entry
  report["example_ids"] = results[0].scored_ids if results else []
  paths = {"json": output_prefix + ".json", "markdown": output_prefix + ".md"}
  multi_turn = metadata.get("setting") == "multi_turn"
  for i, result in enumerate(results):
    paths[f"figure_{i}"] = example_figure(examples, result, f"{output_prefix}_{i}.png")
    if save_edited:
      edits = f"{output_prefix}_edits{os.sep}{i}"
      report.setdefault("edits", {})[result.name] = {
          example_id: os.path.relpath(path, edits) for example_id, path in zip(
              result.example_ids, save_edits(result, edits, multi_turn, magicbrush_layout))}
      paths[f"edits_{i}"] = edits
  if len(results) > 1:
    paths["comparison"] = comparison_figure(examples, results,
                                            f"{output_prefix}_comparison.png")
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump(report, f, indent=2, allow_nan=False, default=str)
  scored = len(results[0].scored_indices) if results else len(examples)
  count = (f"{scored} sessions, {len(examples)} edits" if multi_turn
           else f"{len(examples)} examples")
  title = f"{metadata.get('dataset', '')} {metadata.get('split', '')} " \
          f"({metadata.get('setting', '')}, {count})"
  with open(paths["markdown"], "w", encoding="utf-8") as f:
    f.write(markdown_table(results, keys, reference_rows, title, notes))
  return paths
