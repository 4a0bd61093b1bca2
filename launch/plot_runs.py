r"""One figure of a validation metric against samples seen, for several RL runs.

    python -m launch.plot_runs --workdirs=runs/a/rl,runs/b/rl --labels=paper,robust \
        --metric=val_success --output=validation.png

Reads each run's metrics.jsonl (the lines of its validation passes, ``--config.train.
eval_every``): x = ``val_samples_seen`` (epochs x samples per epoch; 0 = the starting policy),
y = ``--metric``. Each point of a 0/1 metric (``val_success``, ``val_edit_ok``,
``val_preserved_ok``) is a mean over ``val_examples`` outcomes and gets its 95% Wilson
interval (``metrics.intervals.wilson_interval``); other metrics are drawn without intervals.
"""

import json
import math
import os
from typing import Dict, List, Optional, Sequence

from absl import app, flags

from launch import cli

FLAGS = flags.FLAGS
flags.DEFINE_list("workdirs", None, "Comma-separated run folders written by launch.train.",
                  required=True)
flags.DEFINE_list("labels", None, "Comma-separated legend labels, one per --workdirs entry "
                  "(default: the folder names).")
flags.DEFINE_string("metric", "val_success", "The metrics.jsonl key to plot (a val_* metric).")
flags.DEFINE_string("output", "validation_runs.png", "PNG to write.")

BINARY_METRICS = ("val_success", "val_edit_ok", "val_preserved_ok")
SAMPLES_KEY = "val_samples_seen"
COUNT_KEY = "val_examples"


def validation_points(workdir: str, metric: str) -> List[dict]:
  """[{"samples_seen", "value", "n"}] of a run's validation passes, by samples seen.

  Raises:
    ValueError: no metrics.jsonl, or no validation line with ``metric`` (names the flag).
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise ValueError(f"--workdirs: no metrics.jsonl in {workdir!r} (a folder written by "
                     "`python -m launch.train`).")
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  points = [{"samples_seen": float(r[SAMPLES_KEY]), "value": float(r[metric]),
             "n": int(r.get(COUNT_KEY, 0))} for r in rows if SAMPLES_KEY in r and metric in r]
  if not points:
    have = sorted({k for r in rows for k in r if k.startswith("val_")})
    raise ValueError(f"--metric={metric}: {workdir!r} has no validation pass with it "
                     + (f"(it logged {', '.join(have)})." if have else
                        "(trained without validation: --config.train.eval_every=0)."))
  return sorted(points, key=lambda p: p["samples_seen"])


def plot_runs(workdirs: Sequence[str], labels: Optional[Sequence[str]], metric: str,
              output: str) -> str:
  """Draws ``metric`` against samples seen for every run into ``output``; returns the path."""
  # pylint: disable=import-outside-toplevel
  from rl4pix_jax import visualize
  from rl4pix_jax.metrics import intervals as intervals_lib
  labels = list(labels) if labels else [os.path.basename(os.path.normpath(w))
                                        for w in workdirs]
  if len(labels) != len(workdirs):
    raise ValueError(f"--labels has {len(labels)} entries for {len(workdirs)} --workdirs; give "
                     "one label per run.")
  if len(set(labels)) != len(labels):
    raise ValueError(f"--labels={','.join(labels)}: labels must differ (one curve each).")
  series: Dict[str, List[float]] = {}
  steps: Dict[str, List[float]] = {}
  bands: Dict[str, List[tuple]] = {}
  for workdir, label in zip(workdirs, labels):
    points = validation_points(workdir, metric)
    series[label] = [p["value"] for p in points]
    steps[label] = [p["samples_seen"] for p in points]
    if metric in BINARY_METRICS:
      bands[label] = [intervals_lib.wilson_interval(round(p["value"] * p["n"]), p["n"])
                      if p["n"] else (math.nan, math.nan) for p in points]
  note = " (95% Wilson intervals)" if bands else ""
  figure = visualize.metric_curves(series, steps=steps, intervals=bands,
                                   title=f"{metric} on validation{note}",
                                   x_label="samples seen", size=(720, 400))
  folder = os.path.dirname(output)
  if folder:
    os.makedirs(folder, exist_ok=True)
  figure.save(output)
  return output


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    path = plot_runs(FLAGS.workdirs, FLAGS.labels, FLAGS.metric, FLAGS.output)
  except ValueError as e:
    return cli.fail(str(e))
  print(f"Wrote {path}")
  return 0


if __name__ == "__main__":
  cli.run(main)
