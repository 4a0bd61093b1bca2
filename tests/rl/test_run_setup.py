"""The train CLI on a pretrained diffusers folder (tiny random weights saved by the test)."""

import json
import os
import subprocess
import sys

import pytest

from configs import shapes as shapes_config
from rl4pix_jax.rl import run_setup
from rl4pix_jax.workdir import layout
from tests.helpers import tiny_models
from tests.helpers.cli import cli_env, tiny_run_flags
from tests.helpers.paths import REPO_ROOT

ROOT = REPO_ROOT

pytest.importorskip("torch")
pytest.importorskip("diffusers")

TINY_RUN_FLAGS = tiny_run_flags(num_epochs=2)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  root = tmp_path_factory.mktemp("pretrained")
  tiny_models.save_tiny_diffusers_pipeline(str(root / "ip2p"))
  tiny_models.save_tiny_clip_model(str(root / "clip"))
  return root


def test_train_cli_on_a_diffusers_folder_runs_and_resumes(pretrained, tmp_path):
  workdir = tmp_path / "run" / "rl"
  command = [sys.executable, "-m", "launch.train", "--config=configs/shapes.py",
             f"--workdir={workdir}", f"--config.model.pretrained={pretrained / 'ip2p'}",
             f"--config.reward.clip_model={pretrained / 'clip'}", *TINY_RUN_FLAGS]
  first = subprocess.run(command + ["--stop_after_epochs=1"], cwd=ROOT, env=cli_env(tmp_path),
                         capture_output=True, text=True, timeout=900)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "optimizer updates per epoch" in first.stdout
  second = subprocess.run(command, cwd=ROOT, env=cli_env(tmp_path), capture_output=True,
                          text=True, timeout=900)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed after epoch 0" in second.stdout
  with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
    epochs = [json.loads(line)["epoch"] for line in f]
  assert epochs == [-1, 0, 1]  # -1: the starting policy's validation, kept across the resume
  # The shapes dataset was built next to the run (stages_dir = the workdir's parent).
  assert os.path.isdir(tmp_path / "run" / "data" / "shapes_edit")


def test_pretrained_setup_needs_a_reward_clip(pretrained):
  config = shapes_config.get_config()
  config.model.pretrained = str(pretrained / "ip2p")
  with pytest.raises(ValueError, match="clip_model"):
    run_setup.rl_setup_from_config(config, "/tmp/unused/rl")
  config.reward.clip_weight = 0.0
  setup = run_setup.rl_setup_from_config(config, "/tmp/unused/rl")
  assert setup.clip_params is None and setup.models.unet.config.in_channels == 8


def test_stages_dir_and_data_dir_defaults():
  config = shapes_config.get_config()
  assert layout.stages_dir(config, "/x/runs/shapes/rl") == "/x/runs/shapes"
  assert (layout.data_dir(config, layout.stages_dir(config, "/x/runs/shapes/rl/"))
          == "/x/runs/shapes/data")
  config.model.stages_dir = "/s"
  config.data.data_dir = "/d"
  assert layout.stages_dir(config, "/x/rl") == "/s"
  assert layout.data_dir(config, layout.stages_dir(config, "/x/rl")) == "/d"
  config.data.dataset = "coco"
  with pytest.raises(ValueError, match="coco"):
    run_setup.prepare_dataset(config, "/x/rl")
