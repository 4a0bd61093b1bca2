"""Reports of an evaluation: the markdown table, figures, the saved edits and the JSON report."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
from PIL import Image

from rl4pix_jax import visualize
from rl4pix_jax.evaluation.examples import turn_key
from rl4pix_jax.evaluation.scoring import EvaluationResult
from rl4pix_jax.metrics import intervals
from rl4pix_jax.workdir import files

FIGURE_EXAMPLES = 8


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
  files.save_image(grid, path)
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
  files.save_image(visualize.captioned_grid(
      rows, captions, columns, cell=cell,
      title="   ".join(f"{i + 1}: {r.name}" for i, r in enumerate(results))), path)
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
    path = files.join(folder, edit_file_name(example_id, multi_turn, magicbrush_layout))
    files.save_image(Image.fromarray(np.asarray(image, np.uint8)), path)
    paths.append(path)
  return paths


def _json_values(values) -> list:
  return [float(x) if np.isfinite(x) else None for x in np.asarray(values, np.float64)]


def write_reports(results: Sequence[EvaluationResult], examples: Sequence[dict],
                  keys: Sequence[str], output_prefix: str, metadata: Mapping[str, Any],
                  reference_rows: Sequence[str] = (), notes: Sequence[str] = (),
                  save_edited: bool = False, magicbrush_layout: bool = False,
                  figure_examples: int = FIGURE_EXAMPLES) -> Dict[str, str]:
  """Writes ``<prefix>.json`` (metadata, summaries, per-example values), ``<prefix>.md``
  (the table, then ``notes``), ``<prefix>_<i>.png`` (example figure per result),
  ``<prefix>_comparison.png`` when there are several results (``comparison_figure``), both of
  the first ``figure_examples`` examples, and, with ``save_edited``, every edit under ``<prefix>_edits/<i>/`` (``save_edits``).

  JSON: ``example_ids`` and each model's ``per_example`` are the scored examples; when only
  part of the edits is scored (multi-turn), each model also has ``all_turns`` with every
  edit's id and values. Returns the paths.
  """
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
    paths[f"figure_{i}"] = example_figure(examples, result, f"{output_prefix}_{i}.png",
                                          count=figure_examples)
    if save_edited:
      edits = files.join(f"{output_prefix}_edits", str(i))
      report.setdefault("edits", {})[result.name] = {
          example_id: os.path.relpath(path, edits) for example_id, path in zip(
              result.example_ids, save_edits(result, edits, multi_turn, magicbrush_layout))}
      paths[f"edits_{i}"] = edits
  if len(results) > 1:
    paths["comparison"] = comparison_figure(examples, results,
                                            f"{output_prefix}_comparison.png",
                                            count=figure_examples)
  files.write_text(paths["json"], json.dumps(report, indent=2, allow_nan=False, default=str))
  scored = len(results[0].scored_indices) if results else len(examples)
  count = (f"{scored} sessions, {len(examples)} edits" if multi_turn
           else f"{len(examples)} examples")
  title = f"{metadata.get('dataset', '')} {metadata.get('split', '')} " \
          f"({metadata.get('setting', '')}, {count})"
  files.write_text(paths["markdown"], markdown_table(results, keys, reference_rows, title, notes))
  return paths
