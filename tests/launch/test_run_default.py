"""Smoke test of the whole default (launch.run_default) with a couple of steps per stage."""

import json
import os
import subprocess
import sys

from tests.helpers.cli import cli_env
from tests.helpers.paths import REPO_ROOT

ROOT = REPO_ROOT
SMOKE = [
    "--config.data.train_size=16", "--config.data.validation_size=4",
    "--config.data.test_size=4", "--config.pretrain.vae.steps=2",
    "--config.pretrain.clip.steps=2", "--config.pretrain.unet.steps=2",
    "--config.pretrain.vae.batch_size=4", "--config.pretrain.clip.batch_size=4",
    "--config.pretrain.unet.batch_size=4", "--config.pretrain.unet.train_examples=16",
    "--config.sampler.num_steps=2",
    "--config.train.num_epochs=1", "--config.train.sample_batch_size=2", "--config.train.samples_per_prompt=1",
    "--config.train.num_sample_batches=1", "--config.train.train_batch_size=2",
    "--config.data.num_threads=1", "--config.train.eval_examples=2",
]


def test_run_default_smoke(tmp_path):
  workdir = tmp_path / "shapes"
  env = cli_env(tmp_path)
  command = [sys.executable, "-m", "launch.run_default", f"--workdir={workdir}",
             "--supervised=train", "--max_eval_examples=4", *SMOKE]
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  for stage in ("vae", "clip", "unet"):
    assert os.path.exists(workdir / stage / "model_config.json"), stage
  assert os.listdir(workdir / "rl" / "checkpoints")
  report = json.load(open(workdir / "results.json", encoding="utf-8"))
  assert report
  assert (workdir / "results.md").read_text().count("|") > 4
  timings = json.load(open(workdir / "timings.json", encoding="utf-8"))
  assert set(timings) >= {"pretrain_vae", "pretrain_clip", "pretrain_unet", "rl", "total"}
  # Rerunning skips every finished stage.
  again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1500)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("skipping") >= 3, again.stdout[-3000:]


def test_run_default_refuses_shipped_stages_of_another_config(tmp_path):
  """The shipped stages were trained at 32 pixels: a 16-pixel run must train its own."""
  command = [sys.executable, "-m", "launch.run_default", f"--workdir={tmp_path / 'run'}",
             "--config.resolution=16"]
  result = subprocess.run(command, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode != 0
  assert "resolution: shipped 32, config 16" in result.stderr, result.stderr[-3000:]
  assert "--supervised=train" in result.stderr
  assert not os.path.exists(tmp_path / "run" / "vae")


def test_run_default_with_the_shipped_stages(tmp_path):
  """README's main job with the shipped supervised stages, RL and evaluation cut short."""
  workdir = tmp_path / "shapes"
  env = cli_env(tmp_path)
  short_rl = ["--config.sampler.num_steps=2", "--config.train.num_epochs=1",
              "--config.train.sample_batch_size=2", "--config.train.samples_per_prompt=1", "--config.train.num_sample_batches=1",
              "--config.train.train_batch_size=2", "--config.data.num_threads=1",
              "--config.train.eval_examples=2"]
  command = [sys.executable, "-m", "launch.run_default", f"--workdir={workdir}",
             "--max_eval_examples=2", *short_rl]
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert result.stdout.count("installed the shipped checkpoint") == 3
  assert result.stdout.count("skipping") >= 3  # the pretrain commands find them complete
  for stage in ("vae", "clip", "unet"):
    shipped_config = json.load(open(os.path.join(ROOT, "assets", "shapes_editor", stage,
                                                 "model_config.json")))
    assert json.load(open(workdir / stage / "model_config.json")) == shipped_config
  report = json.load(open(workdir / "results.json", encoding="utf-8"))
  assert len(report["models"]) == 2 and len(report["example_ids"]) == 2
  table_header = next(line for line in (workdir / "results.md").read_text().splitlines()
                      if line.startswith("| model"))
  assert result.stdout.count(table_header) == 1  # the results table is printed once
  timings = json.load(open(workdir / "timings.json", encoding="utf-8"))
  assert {"install_supervised", "rl", "evaluation", "total"} <= set(timings)
