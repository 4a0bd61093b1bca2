"""tools.outcome_spread: prompts counted by successes across seeds, by hand, per task."""

import json

import pytest

from rl4pix_jax.data import shapes
from tools import outcome_spread, rl_table


def _results(path, ids, success):
  path.write_text(json.dumps({"split": "validation", "example_ids": ids,
                              "models": {"no RL (starting editor)": {"per_example": {
                                  "success": list(map(float, success))}}}}))
  return str(path)


def test_counts_mixed_prompts_and_the_ceiling_per_task(tmp_path):
  ids = [f"shapes-1-{i}" for i in range(4)]
  tasks = [shapes.make_example(1, i, 32).task for i in range(4)]
  assert [rl_table.task_of(i) for i in ids] == tasks
  assert rl_table.task_of("magicbrush-12-1") is None
  # Over 2 seeds example 0 succeeds twice, 1 never, 2 once, 3 twice: counts 1 / 1 / 2, one
  # mixed, mean 5/8, ceiling 3 of 4.
  paths = [_results(tmp_path / "a.json", ids, [1, 0, 1, 1]),
           _results(tmp_path / "b.json", ids, [1, 0, 0, 1])]
  got_ids, success = outcome_spread.success_matrix(paths, "no RL")
  assert got_ids == ids and success.shape == (2, 4)
  table = outcome_spread.spread_table(ids, success)
  assert "| all | 4 | 1 | 1 | 2 | 1 | 0.625 | 0.750 |" in table
  for task in set(tasks):  # each task's row counts its own examples
    n = tasks.count(task)
    assert f"| {task} | {n} |" in table


def test_other_examples_in_a_file_are_named(tmp_path):
  a = _results(tmp_path / "a.json", ["shapes-1-0", "shapes-1-1"], [1, 0])
  b = _results(tmp_path / "b.json", ["shapes-1-1", "shapes-1-0"], [1, 0])
  with pytest.raises(rl_table.TableError, match="scores other examples"):
    outcome_spread.success_matrix([a, b], "no RL")
