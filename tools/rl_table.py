"""One table of evaluated editors: means with 95% intervals, and paired differences to a row.

    python -m tools.rl_table --baseline=supervised \\
        --row="supervised=runs/a/results.json#no RL" --row="paper=runs/a/results.json#RL" \\
        --row="verifiable=runs/b/results.json#RL" --output=docs/rl_results.md

Each ``--row`` is ``label=<results.json of launch.evaluate>#<model>``, where <model> is the
start of a model name in that file ("no RL" = the starting editor, "RL" = the RL checkpoint).
Rows compared with the baseline must score the same examples in the same order (same split,
``--max_examples`` and seed); the differences are then paired per example: the mean of
(row - baseline) with a percentile bootstrap interval over examples (``metrics.intervals``),
which is tighter than comparing two separate intervals.

``--by_task`` adds, for shapes_edit results, each row's success / edit_ok / preserved_ok per
shapes task (the task regenerated from each example id ``shapes-<seed>-<index>``).
"""

from __future__ import annotations

import json
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from absl import app, flags
import numpy as np

from rl4pix_jax.data import shapes
from rl4pix_jax.metrics import intervals

METRICS = ("success", "edit_ok", "preserved_ok", "attention_mass_inside", "clip_t")
PAIRED = ("success", "preserved_ok")
TASK_METRICS = ("success", "edit_ok", "preserved_ok")

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs as a command, so that importing this
  module next to a launch module, whose --output it would clash with, defines none)."""
  flags.DEFINE_multi_string("row", [], "label=results.json#model (repeat).")
  flags.DEFINE_string("baseline", None, "Label of the row the others are compared with "
                      "(paired per example).")
  flags.DEFINE_string("output", None, "Write the markdown table here (and print it).")
  flags.DEFINE_bool("by_task", False, "Also a table of each row's success, edit_ok and "
                    "preserved_ok per shapes task.")


class TableError(app.UsageError):
  """A row spec or results file that cannot be used (the message names it)."""


def parse_row(spec: str) -> Tuple[str, str, str]:
  """'label=path#model' -> (label, path, model prefix)."""
  if "=" not in spec or "#" not in spec.split("=", 1)[1]:
    raise TableError(f"--row={spec!r}: expected label=<results.json>#<model>, e.g. "
                     "'supervised=runs/shapes/results.json#no RL'.")
  label, rest = spec.split("=", 1)
  path, model = rest.rsplit("#", 1)
  return label.strip(), path.strip(), model.strip()


def load_row(path: str, model: str) -> Dict[str, object]:
  """The per-example metrics and the example ids of ``model`` in a results.json."""
  try:
    with open(path, encoding="utf-8") as f:
      results = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise TableError(f"Cannot read {path!r} ({e}): pass a results.json of launch.evaluate.") \
        from e
  names = [n for n in results.get("models", {}) if n.startswith(model)]
  if len(names) != 1:
    raise TableError(f"{path!r} has models {sorted(results.get('models', {}))}; {model!r} "
                     f"must start exactly one of them.")
  entry = results["models"][names[0]]
  return {"name": names[0], "per_example": entry["per_example"],
          "split": results.get("split"), "num_edits": results.get("num_edits"),
          "example_ids": results.get("example_ids"),
          "seed": results.get("sampler", {}).get("seed")}


def _interval(values: Sequence[float]) -> str:
  s = intervals.summarise(values)
  return f"{s['mean']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"


def markdown(rows: Sequence[Tuple[str, Mapping]], baseline: str = None) -> str:
  """The table: one line per row; with ``baseline``, paired differences of PAIRED metrics."""
  base = dict(rows).get(baseline) if baseline else None
  if baseline and base is None:
    raise TableError(f"--baseline={baseline!r} is not a row label ({[r for r, _ in rows]}).")
  header = ["editor", *METRICS] + ([f"Δ {m} (paired)" for m in PAIRED] if base else [])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for label, row in rows:
    cells = [label] + [_interval(row["per_example"][m]) for m in METRICS]
    if base is not None:
      for metric in PAIRED:
        a = np.asarray(row["per_example"][metric], np.float64)
        b = np.asarray(base["per_example"][metric], np.float64)
        if a.shape != b.shape or (row["split"], row["seed"]) != (base["split"], base["seed"]):
          raise TableError(f"Row {label!r} scored {a.size} edits of split {row['split']!r} "
                           f"(seed {row['seed']}), the baseline {b.size} of "
                           f"{base['split']!r} (seed {base['seed']}): evaluate both alike.")
        cells.append("—" if label == baseline else _interval(a - b))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def task_of(example_id: str) -> Optional[str]:
  """The shapes task of ``shapes-<seed>-<index>``; None for other ids."""
  parts = example_id.split("-")
  if len(parts) != 3 or parts[0] != "shapes" or not all(p.isdigit() for p in parts[1:]):
    return None
  return shapes.make_example(int(parts[1]), int(parts[2]), 8).task


def by_task_markdown(rows: Sequence[Tuple[str, Mapping]]) -> str:
  """Markdown: one line per row, TASK_METRICS means per shapes task (n in the header).

  Raises:
    TableError: a row without example ids, or with ids that are not shapes ids.
  """
  tasks_of_rows = []
  for label, row in rows:
    ids = row.get("example_ids")
    tasks = [task_of(i) for i in ids] if ids else []
    if not tasks or None in tasks:
      raise TableError(f"Row {label!r}: --by_task needs shapes_edit results (example ids "
                       "shapes-<seed>-<index>); these have none.")
    tasks_of_rows.append(np.asarray(tasks))
  names = sorted(set(np.concatenate(tasks_of_rows)))
  first = tasks_of_rows[0]
  header = ["editor"] + [f"{m} {t} (n={int((first == t).sum())})"
                         for m in TASK_METRICS for t in names]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for (label, row), tasks in zip(rows, tasks_of_rows):
    cells = [label]
    for metric in TASK_METRICS:
      values = np.asarray(row["per_example"][metric], np.float64)
      cells += [f"{values[tasks == t].mean():.3f}" if (tasks == t).any() else "—"
                for t in names]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv: List[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.row:
    raise app.UsageError("Pass at least one --row=label=results.json#model.")
  rows = []
  for spec in FLAGS.row:
    label, path, model = parse_row(spec)
    rows.append((label, load_row(path, model)))
  table = markdown(rows, FLAGS.baseline)
  if FLAGS.by_task:
    table += "\n" + by_task_markdown(rows)
  print_and_write(table, FLAGS.output)


def print_and_write(table: str, output: str = None) -> None:
  """Prints a markdown table and, when ``output`` is given, writes it there too."""
  print(table, end="")
  if output:
    with open(output, "w", encoding="utf-8") as f:
      f.write(table)


if __name__ == "__main__":
  from launch import cli  # pylint: disable=import-outside-toplevel
  define_flags()
  cli.run(main)
