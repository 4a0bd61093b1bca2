"""How often each prompt succeeds across sampling seeds: where policy-gradient RL can learn.

    for s in 0 1 2 3; do python -m launch.evaluate --workdir=runs/shapes/rl --no_rl \\
        --split=validation --eta=1.0 --seed=$s --output=runs/shapes/probe/eta1_seed$s; done
    python -m tools.outcome_spread --results=runs/shapes/probe/eta1_seed{0,1,2,3}.json

Each ``--results`` is a results.json of ``launch.evaluate`` over the same examples with another
sampling seed. A prompt whose samples all succeed or all fail gives group advantages of 0: only
the mixed ones carry signal, and "every mixed prompt always succeeds" bounds what sharpening the
policy can gain. For shapes_edit the prompts are also split by task (``rl_table.task_of``
regenerates each example from its id ``shapes-<seed>-<index>``).
"""

from __future__ import annotations

import collections
import json
from typing import Dict, List, Sequence

from absl import app, flags
import numpy as np

from tools import rl_table

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags (defined only when it runs as a command)."""
  flags.DEFINE_list("results", [], "results.json files of launch.evaluate, one per seed.")
  flags.DEFINE_string("model", "no RL", "Start of the model name in each file.")
  flags.DEFINE_string("output", None, "Write the markdown table here (and print it).")


def success_matrix(paths: Sequence[str], model: str) -> tuple:
  """(example ids, (S, N) float success of the N examples under each of the S files)."""
  rows, ids = [], None
  for path in paths:
    row = rl_table.load_row(path, model)
    with open(path, encoding="utf-8") as f:
      these = json.load(f)["example_ids"]
    if ids is not None and these != ids:
      raise rl_table.TableError(f"{path!r} scores other examples than {paths[0]!r}: evaluate "
                                "the same split and --max_examples with each seed.")
    ids = these
    rows.append(np.asarray(row["per_example"]["success"], np.float64))
  return ids, np.stack(rows)


def spread_table(ids: Sequence[str], success: np.ndarray) -> str:
  """Markdown: per task and in all, prompts by number of successes out of S, mean success
  and the ceiling (share of prompts that succeed at least once)."""
  seeds = success.shape[0]
  wins = success.sum(0).astype(int)
  tasks = [rl_table.task_of(i) for i in ids]
  groups: Dict[str, np.ndarray] = collections.OrderedDict()
  for task in sorted({t for t in tasks if t is not None}):
    groups[task] = np.asarray([t == task for t in tasks])
  groups["all"] = np.ones(len(ids), bool)
  header = (["prompts", "n"] + [f"{k} of {seeds}" for k in range(seeds + 1)]
            + ["mixed", "mean success", "ceiling (>= 1 success)"])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, keep in groups.items():
    w = wins[keep]
    counts = [int((w == k).sum()) for k in range(seeds + 1)]
    mixed = int(((w > 0) & (w < seeds)).sum())
    lines.append("| " + " | ".join(
        [name, str(int(keep.sum()))] + [str(c) for c in counts]
        + [str(mixed), f"{success[:, keep].mean():.3f}", f"{(w > 0).mean():.3f}"]) + " |")
  return "\n".join(lines) + "\n"


def main(argv: List[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if len(FLAGS.results) < 2:
    raise app.UsageError("Pass at least two --results files (the same examples, other seeds).")
  ids, success = success_matrix(FLAGS.results, FLAGS.model)
  rl_table.print_and_write(spread_table(ids, success), FLAGS.output)


if __name__ == "__main__":
  from launch import cli  # pylint: disable=import-outside-toplevel
  define_flags()
  cli.run(main)
