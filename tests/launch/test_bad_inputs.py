"""Bad inputs through the real commands: exit code, one 'error:' line naming the field or file,
no traceback, and the run folder's files unchanged.

Every case runs ``python -m launch.<command>`` in a subprocess: ml_collections reads the
``--config.`` overrides from ``sys.argv`` when the flags are defined, and absl's flags are
process-global, so a fresh process per case is the faithful boundary. All cases share the
session's tiny run (``test_cli_edit.tiny_run``); the corrupt-checkpoint case works on a copy.
"""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.launch.test_cli_edit import run_cli, tiny_run  # pylint: disable=unused-import
from tests.helpers.cli import tiny_run_flags
from tests.workdir.test_checkpointer import truncate_largest_data_file

pytest.importorskip("torch")
pytest.importorskip("diffusers")


def folder_hashes(folder) -> dict:
  """relative path -> sha256 of every file under ``folder``."""
  hashes = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        hashes[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
  return hashes


def _train_flags(workdir, root, *extra):
  return ["--config=configs/shapes.py", f"--workdir={workdir}",
          f"--config.model.pretrained={root / 'ip2p'}",
          f"--config.reward.clip_model={root / 'clip'}", *tiny_run_flags(num_epochs=1), *extra]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
  path = tmp_path_factory.mktemp("bad_inputs_image") / "a.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)).save(path)
  return path


def _edit_flags(workdir, image, output, *extra):
  return [f"--workdir={workdir}", f"--image={image}", f"--output={output}",
          "--instruction=turn the red circle blue", "--steps=2", *extra]


# (id, command, flags(workdir, root, image, tmp) -> list, exit code, words the line must hold)
CASES = [
    ("typo", "launch.train", lambda w, r, i, t: _train_flags(w, r, "--config.train.num_epoch=3"),
     2, ["--config.train.num_epoch=3", "did you mean --config.train.num_epochs"]),
    ("indivisible_batch", "launch.train",
     lambda w, r, i, t: _train_flags(w, r, "--config.train.sample_batch_size=3",
                                     "--config.train.samples_per_prompt=2"),
     2, ["--config.train.sample_batch_size=3", "samples_per_prompt=2"]),
    ("zero_samples_per_prompt", "launch.train",
     lambda w, r, i, t: _train_flags(w, r, "--config.train.samples_per_prompt=0"),
     2, ["--config.train.samples_per_prompt=0", ">= 1"]),
    ("negative_lr", "launch.train",
     lambda w, r, i, t: _train_flags(w, r, "--config.ppo.learning_rate=-0.1"),
     2, ["--config.ppo.learning_rate=-0.1", "> 0"]),
    ("nan_weight", "launch.train",
     lambda w, r, i, t: _train_flags(w, r, "--config.reward.attention_weight=nan"),
     2, ["--config.reward.attention_weight=nan", "finite"]),
    ("missing_config_file", "launch.train",
     lambda w, r, i, t: [f"--workdir={w}", "--config=configs/nope.py"],
     2, ["--config=configs/nope.py", "no such config file"]),
    ("unknown_flag", "launch.edit", lambda w, r, i, t: _edit_flags(w, i, t / "o.png", "--stepz=2"),
     2, ["stepz"]),
    ("empty_instruction", "launch.edit",
     lambda w, r, i, t: _edit_flags(w, i, t / "o.png", "--instruction= "),
     2, ["--instruction=", "empty"]),
    ("missing_step", "launch.edit", lambda w, r, i, t: _edit_flags(w, i, t / "o.png", "--step=7"),
     2, ["--step=7", "checkpoints"]),
    ("not_a_run", "launch.evaluate", lambda w, r, i, t: [f"--workdir={t}"], 2, ["config.json"]),
    ("export_not_a_run", "launch.export",
     lambda w, r, i, t: [f"--workdir={t}", f"--output={t / 'x'}"], 2, ["config.json"]),
]


@pytest.mark.parametrize("name,command,make_flags,code,words", CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(tiny_run, image, tmp_path, name, command,
                                                   make_flags, code, words):
  del name
  workdir, root = tiny_run
  before = folder_hashes(workdir)
  done = run_cli(command, *make_flags(workdir, root, image, tmp_path), tmp=tmp_path)
  assert done.returncode == code, done.stderr[-2000:]
  assert "Traceback" not in done.stderr, done.stderr[-2000:]
  errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, done.stderr[-2000:]
  for word in words:
    assert word in errors[0], errors[0]
  assert folder_hashes(workdir) == before


def test_help_exits_0_and_keeps_line_breaks_and_lists_config_fields(tmp_path):
  done = run_cli("launch.train", "--help", tmp=tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "\n    python -m launch.train --config=configs/shapes.py --workdir=runs/shapes/rl \\\n" \
      in done.stdout
  assert "--config.train.num_epochs=20" in done.stdout


def test_fewer_epochs_than_the_run_has_says_so_and_writes_nothing(tiny_run, tmp_path):
  workdir, root = tiny_run
  before = folder_hashes(workdir)
  done = run_cli("launch.train", *_train_flags(workdir, root, "--config.ppo.clip_range=0.5"),
                 tmp=tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "already has 1 epochs" in done.stdout and "--config.train.num_epochs=1" in done.stdout
  assert "Traceback" not in done.stderr and "Unable to initialize backend" not in done.stderr
  assert folder_hashes(workdir) == before  # config.json not rewritten with the new override


def test_long_instruction_warns_where_it_was_cut_and_quotes_little(tiny_run, image, tmp_path):
  workdir, _ = tiny_run
  long = "make the circle blue " + " and also green" * 2000
  done = run_cli("launch.edit", *_edit_flags(workdir, image, tmp_path / "o.png",
                                             f"--instruction={long}"), tmp=tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  warning = [line for line in done.stderr.splitlines() if "tokens but the text encoder" in line]
  assert len(warning) == 1 and "cut after" in warning[0] and len(warning[0]) < 300


def test_unreadable_newest_checkpoint_falls_back_in_edit_and_train(tiny_run, image, tmp_path):
  """The newest checkpoint's data files cut in half: edit warns once and uses the
  previous epoch; train continues from it and keeps the unreadable folder aside."""
  workdir, root = tiny_run
  run = tmp_path / "run" / "rl"
  shutil.copytree(workdir, run)
  checkpoints = run / "checkpoints"
  shutil.copytree(checkpoints / "0", checkpoints / "1")  # a second, newer checkpoint
  truncate_largest_data_file(checkpoints / "1", every=True)
  before = folder_hashes(run)
  done = run_cli("launch.edit", *_edit_flags(run, image, tmp_path / "o.png"), tmp=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = [line for line in done.stderr.splitlines() if "cannot be read" in line]
  assert len(lines) == 1 and "epoch 1" in lines[0] and "using epoch 0" in lines[0], done.stderr
  assert "Traceback" not in done.stderr and "OUT_OF_RANGE" not in done.stderr.replace(lines[0], "")
  assert folder_hashes(run) == before  # edit reads only
  trained = run_cli("launch.train", *_train_flags(run, root, "--config.train.num_epochs=2"),
                    tmp=tmp_path)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert "resumed after epoch 0" in trained.stdout
  assert os.listdir(run / "checkpoints_unreadable") == ["1"]
  with open(run / "metrics.jsonl", encoding="utf-8") as f:
    assert [json.loads(line)["epoch"] for line in f] == [-1, 0, 1]  # -1: starting policy's val_*


def test_max_side_size_keeps_the_aspect_and_leaves_small_images_alone(tmp_path):
  # In a subprocess: launch.edit's absl flags would clash with launch.prepare_data's
  # (imported by other tests) in this process.
  code = ("from launch.edit import max_side_size as f; "
          "assert f(3000, 4000, 512) == (384, 512); assert f(300, 200, 512) is None; "
          "assert f(40, 36, 32) == (32, 29); assert f(5000, 10, 512) == (512, 1); "
          "assert f(4000, 3000, 0) is None; print('ok')")
  import subprocess, sys  # pylint: disable=import-outside-toplevel,multiple-imports
  from tests.helpers.cli import cli_env  # pylint: disable=import-outside-toplevel
  from tests.helpers.paths import REPO_ROOT  # pylint: disable=import-outside-toplevel
  done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=cli_env(tmp_path),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_large_image_is_edited_downscaled_and_returned_at_its_size(tiny_run, tmp_path):
  workdir, _ = tiny_run
  big = tmp_path / "big.png"
  Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 200, 3), np.uint8)).save(big)
  done = run_cli("launch.edit", *_edit_flags(workdir, big, tmp_path / "o.png"), tmp=tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  notes = [line for line in done.stderr.splitlines() if "--max_side=32" in line]
  assert len(notes) == 1 and "200x120" in notes[0] and "edited at 32x19" in notes[0]
  assert np.asarray(Image.open(tmp_path / "o.png")).shape == (120, 200, 3)
