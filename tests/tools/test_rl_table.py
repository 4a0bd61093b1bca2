"""tools.rl_table: intervals and paired differences by hand, and its one-line errors."""

import json

import numpy as np
import pytest

from rl4pix_jax.metrics import intervals
from tools import rl_table


def _results(path, models, split="test", seed=0):
  per = {name: {"per_example": {m: list(map(float, values[m])) for m in values}}
         for name, values in models.items()}
  path.write_text(json.dumps({"split": split, "num_edits": 4, "sampler": {"seed": seed},
                              "models": per}))
  return str(path)


def _row(success, preserved):
  return {"success": success, "edit_ok": success, "preserved_ok": preserved,
          "attention_mass_inside": [0.1, 0.2, 0.3, 0.4], "clip_t": [0.8, 0.8, 0.9, 0.9]}


def test_table_means_and_paired_differences(tmp_path):
  path = _results(tmp_path / "a.json", {
      "no RL (starting editor)": _row([0, 1, 0, 1], [1, 1, 0, 1]),
      "RL epoch 9": _row([1, 1, 0, 1], [1, 1, 1, 1])})
  rows = [(label, rl_table.load_row(*rl_table.parse_row(f"{label}={path}#{model}")[1:]))
          for label, model in (("supervised", "no RL"), ("rl", "RL"))]
  table = rl_table.markdown(rows, "supervised")
  lines = table.strip().splitlines()
  assert len(lines) == 4 and lines[0].startswith("| editor | success")
  rl_line = lines[3]
  assert rl_line.startswith("| rl | 0.750 [")  # success mean 3/4
  difference = intervals.summarise(np.asarray([1, 1, 0, 1]) - np.asarray([0, 1, 0, 1]))
  assert f"{difference['mean']:.3f} [{difference['ci_low']:.3f}, " in rl_line  # +0.25 paired
  assert lines[2].endswith("| — | — |")


def test_bad_rows_are_named(tmp_path):
  with pytest.raises(rl_table.TableError, match="expected label="):
    rl_table.parse_row("supervised")
  path = _results(tmp_path / "a.json", {"RL epoch 1": _row([0] * 4, [1] * 4)})
  with pytest.raises(rl_table.TableError, match="must start exactly one"):
    rl_table.load_row(path, "no RL")
  other = _results(tmp_path / "b.json", {"RL epoch 1": _row([0] * 4, [1] * 4)},
                   split="validation")
  rows = [("a", rl_table.load_row(path, "RL")), ("b", rl_table.load_row(other, "RL"))]
  with pytest.raises(rl_table.TableError, match="evaluate both alike"):
    rl_table.markdown(rows, "a")


def test_by_task_means_by_hand(tmp_path):
  """Four shapes ids; each task's cell is the mean over that task's examples, computed here
  from the regenerated tasks; results without shapes ids are refused in one line."""
  from rl4pix_jax.data import shapes  # pylint: disable=import-outside-toplevel
  ids = [f"shapes-1-{i}" for i in range(4)]
  tasks = [shapes.make_example(1, i, 32).task for i in range(4)]
  success, preserved = [1, 0, 1, 1], [1, 1, 0, 1]
  data = {"split": "test", "num_edits": 4, "sampler": {"seed": 0}, "example_ids": ids,
          "models": {"RL epoch 1": {"per_example": _row(success, preserved)}}}
  path = tmp_path / "a.json"
  path.write_text(json.dumps(data))
  table = rl_table.by_task_markdown([("rl", rl_table.load_row(str(path), "RL"))])
  header, _, line = table.strip().splitlines()
  names = sorted(set(tasks))
  want = ["rl"]
  for values in (success, success, preserved):  # edit_ok = success in _row
    want += [f"{np.mean([v for v, t in zip(values, tasks) if t == n]):.3f}" for n in names]
  assert line == "| " + " | ".join(want) + " |"
  assert f"success {names[0]} (n={tasks.count(names[0])})" in header
  plain = _results(tmp_path / "b.json", {"RL epoch 1": _row(success, preserved)})
  with pytest.raises(rl_table.TableError, match="--by_task needs shapes_edit"):
    rl_table.by_task_markdown([("rl", rl_table.load_row(plain, "RL"))])
