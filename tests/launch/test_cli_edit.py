"""launch.edit on the checkpoint of a tiny training run; run_loading's errors.

``tiny_run`` (also used by test_cli_evaluate and test_cli_export) trains one epoch of
``launch.train`` on a tiny random diffusers folder, once per pytest session.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from rl4pix_jax.rl import run_loading
from tests.helpers import tiny_models
from tests.helpers.cli import cli_env, tiny_run_flags
from tests.helpers.paths import REPO_ROOT

ROOT = REPO_ROOT

pytest.importorskip("torch")
pytest.importorskip("diffusers")

TINY_RUN_FLAGS = tiny_run_flags(num_epochs=1)


def run_cli(module, *flags, tmp):
  """Runs ``python -m <module> <flags>`` in the repo root; returns the CompletedProcess."""
  return subprocess.run([sys.executable, "-m", module, *flags], cwd=ROOT, env=cli_env(tmp),
                        capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """(workdir, pretrained root): one epoch of launch.train on tiny random weights."""
  root = tmp_path_factory.getbasetemp() / "cli_tiny_run"
  workdir = root / "run" / "rl"
  if not (workdir / "config.json").exists():
    tiny_models.save_tiny_diffusers_pipeline(str(root / "ip2p"))
    tiny_models.save_tiny_clip_model(str(root / "clip"))
    done = run_cli("launch.train", "--config=configs/shapes.py", f"--workdir={workdir}",
                   f"--config.model.pretrained={root / 'ip2p'}",
                   f"--config.reward.clip_model={root / 'clip'}", *TINY_RUN_FLAGS, tmp=root)
    assert done.returncode == 0, done.stderr[-3000:]
  return workdir, root


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  folder = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "a.png")
  Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(folder / "b.jpg")
  (folder / "broken.png").write_bytes(b"not a png")
  return folder


def _edit_flags(workdir, image, output, *extra):
  return [f"--workdir={workdir}", f"--image={image}", f"--output={output}",
          "--instruction=turn the red circle blue", "--steps=2", "--seed=5", *extra]


def test_edit_folder_writes_pngs_and_overlays_and_names_the_unreadable_file(
    tiny_run, images, tmp_path):
  workdir, _ = tiny_run
  first = run_cli("launch.edit", *_edit_flags(workdir, images, tmp_path / "one", "--attention",
                                              "--object=red circle"), tmp=tmp_path)
  assert first.returncode == 1, first.stderr[-3000:]
  assert "broken.png" in first.stderr and "cannot read" in first.stderr
  assert "Edited 2 of 3 images" in first.stdout
  assert sorted(os.listdir(tmp_path / "one")) == [
      "a.png", "a_attention.png", "b.png", "b_attention.png"]
  a = np.asarray(Image.open(tmp_path / "one" / "a.png"))
  b = np.asarray(Image.open(tmp_path / "one" / "b.png"))
  assert a.shape == (32, 32, 3) and b.shape == (36, 40, 3)  # size rule: multiples of 4
  assert np.asarray(Image.open(tmp_path / "one" / "a_attention.png")).shape == (32, 32, 3)
  # Same seed, same pixels; a single file output for a single image.
  again = run_cli("launch.edit", *_edit_flags(workdir, images / "a.png", tmp_path / "a.png"),
                  tmp=tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), a)


def test_edit_bad_inputs_say_what_is_wrong(tiny_run, images, tmp_path):
  workdir, _ = tiny_run
  out = run_cli("launch.edit", *_edit_flags(workdir, images, tmp_path / "o", "--attention",
                                            "--object=green star"), tmp=tmp_path)
  assert out.returncode == 2 and "'green star' is not in" in out.stderr
  out = run_cli("launch.edit", *_edit_flags(tmp_path, images, tmp_path / "o"), tmp=tmp_path)
  assert out.returncode == 2 and "config.json" in out.stderr
  out = run_cli("launch.edit", *_edit_flags(workdir, images, tmp_path / "o", "--step=7"),
                tmp=tmp_path)
  assert out.returncode == 2 and "--step=7" in out.stderr and "checkpoints" in out.stderr


def test_run_loading_errors_and_fallback(tiny_run, tmp_path):
  workdir, _ = tiny_run
  with pytest.raises(run_loading.RunLoadingError, match="config.json"):
    run_loading.read_run_config(str(tmp_path))
  assert run_loading.checkpoint_epochs(str(workdir)) == [0]
  empty = tmp_path / "no_checkpoints"
  empty.mkdir()
  (empty / "config.json").write_text((workdir / "config.json").read_text())
  with pytest.raises(run_loading.RunLoadingError, match="No RL checkpoint in"):
    run_loading.load_run(str(empty), use_rl=True)
  run = run_loading.load_run(str(empty))  # falls back to the starting editor
  assert run.epoch is None and run.editor.params is run.setup.params
  # --step=best: the tiny run validated after its one epoch, so epoch 0 is the best ...
  assert run_loading.load_run(str(workdir), step="best").epoch == 0
  # ... and a run trained without validation says which flag keeps one.
  unvalidated = tmp_path / "unvalidated"
  unvalidated.mkdir()
  config = json.loads((workdir / "config.json").read_text())
  config["train"]["eval_every"] = 0
  (unvalidated / "config.json").write_text(json.dumps(config))
  with pytest.raises(run_loading.RunLoadingError, match="--config.train.eval_every=0"):
    run_loading.load_run(str(unvalidated), step="best")


def test_step_flag_takes_an_epoch_or_best():
  from launch import cli  # pylint: disable=import-outside-toplevel
  parser = cli._StepParser()  # pylint: disable=protected-access
  assert parser.parse("best") == "best" and parser.parse("3") == 3 and parser.parse(None) is None
  for bad in ("latest", "-1"):
    with pytest.raises(ValueError, match="'best'"):
      parser.parse(bad)


def test_a_copied_run_folder_edits_from_its_new_place(tiny_run, images, tmp_path):
  """`cp -r <run> elsewhere && launch.edit --workdir=elsewhere`: same pixels as the original."""
  workdir, root = tiny_run
  recorded = json.loads((workdir / "config.json").read_text())
  assert recorded["model"]["pretrained"] == str(root / "ip2p")  # outside the run: absolute
  assert recorded["data"]["data_dir"] == str(root / "run" / "data")
  copy = tmp_path / "elsewhere" / "copy"
  shutil.copytree(workdir, copy)
  outputs = []
  for folder, name in ((workdir, "original.png"), (copy, "copy.png")):
    done = run_cli("launch.edit", *_edit_flags(folder, images / "a.png", tmp_path / name),
                   tmp=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    outputs.append(np.asarray(Image.open(tmp_path / name)))
  np.testing.assert_array_equal(outputs[0], outputs[1])
