"""W&B logging (config.logging.wandb) in offline mode: what the trainer logs, and resuming.

A tiny RL run (quick random weights, validation on) trains 2 epochs with W&B on, then is resumed
for a third: the offline run folders under ``<workdir>/wandb`` are read back
(``tests.helpers.wandb_files``, the .wandb transaction log) and must hold every metric of
metrics.jsonl at its epoch, the sample grids and the reward / validation curves as images, and
both calls must log to one W&B run id (``<workdir>/wandb_run.json``). No network: WANDB_MODE is
offline. Skipped when wandb (optional: requirements-demo.txt) is not installed.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.helpers import rl_fixtures, wandb_files

pytest.importorskip("wandb", reason="wandb is not installed: W&B logging is optional "
                    "(pip install -r requirements-demo.txt)")

# pylint: disable=wrong-import-position
from rl4pix_jax import config_validation
from rl4pix_jax.workdir import wandb_log
from rl4pix_jax.workdir.metrics_log import MetricsLog


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
  wandb_files.set_offline(monkeypatch, tmp_path / "wandb_home")


def _rows(run_folder):
  return wandb_files.read_history(wandb_files.run_file(run_folder))


def test_resumed_run_continues_its_wandb_run_with_every_metric_and_picture(tmp_path):
  """What the trainer does (rl/trainer.py): a fresh run logs epochs -1..1 and a grid, then a
  run resumed from the checkpoint of epoch 1 (metrics.jsonl cut there) logs epoch 2."""
  workdir = str(tmp_path / "run")
  config = rl_fixtures.tiny_rl_config(**{"logging.wandb": True,
                                         "logging.wandb_run_name": "tiny"})
  grid = np.full((16, 24, 3), 200, np.uint8)
  log = MetricsLog(workdir, resume_from=-1,
                   wandb=wandb_log.from_config(config, workdir, resume=False))
  log.write(-1, {"val_success": 0.25, "val_samples_seen": 0})
  for epoch in (0, 1):
    log.write(epoch, {"reward_mean": 0.5 + epoch, "loss": float("nan"), "optimizer_steps": 2})
    log.image("samples", epoch, grid)
  log.close()
  log = MetricsLog(workdir, resume_from=2,
                   wandb=wandb_log.from_config(config, workdir, resume=True))
  log.write(2, {"reward_mean": 2.5, "loss": 0.1, "optimizer_steps": 4})
  log.image("reward_curve", 2, Image.fromarray(grid))
  log.close()

  run_id = wandb_log.recorded_run_id(workdir)
  with open(os.path.join(workdir, wandb_log.RUN_FILE), encoding="utf-8") as f:
    assert json.load(f)["name"] == "tiny"
  runs = wandb_files.offline_runs(workdir)
  assert len(runs) == 2 and all(wandb_files.run_id(r) == run_id for r in runs), runs
  first, resumed = _rows(runs[0]), _rows(runs[1])
  wandb_files.assert_logged(MetricsLog(workdir, enabled=False).read(), first + resumed)
  assert [r["epoch"] for r in wandb_files.images(first, "samples")] == [0, 1]
  assert [r["epoch"] for r in wandb_files.images(resumed, "reward_curve")] == [2]
  image = wandb_files.images(first, "samples")[0]
  with Image.open(os.path.join(runs[0], "files", image["samples/path"])) as png:
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), grid)


def test_fresh_start_opens_a_new_wandb_run_and_config_checks(tmp_path, monkeypatch):
  config = rl_fixtures.tiny_rl_config(**{"logging.wandb": True})
  first = wandb_log.from_config(config, str(tmp_path), resume=False)
  first.log(0, {"reward_mean": 1.0})
  first.close()
  again = wandb_log.from_config(config, str(tmp_path), resume=False)  # no checkpoint: new run
  again.close()
  assert again.run_id != first.run_id
  assert {wandb_files.run_id(r) for r in wandb_files.offline_runs(str(tmp_path))} == {
      first.run_id, again.run_id}
  assert wandb_log.recorded_run_id(str(tmp_path)) == again.run_id
  assert wandb_log.from_config(rl_fixtures.tiny_rl_config(), str(tmp_path), resume=True) is None
  config_validation.validate_run_config(config)
  import importlib.util  # pylint: disable=import-outside-toplevel
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "wandb" else real(name, *a))
  with pytest.raises(config_validation.ConfigError,
                     match=r"logging.wandb=True needs the wandb package.*requirements-demo"):
    config_validation.validate_run_config(config)
