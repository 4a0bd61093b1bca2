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


def test_max_side_is_part_of_the_one_size_rule():
  from rl4pix_jax import editing  # pylint: disable=import-outside-toplevel
  f = editing.max_side_size
  assert f(3000, 4000, 512) == (384, 512) and f(300, 200, 512) == (300, 200)
  assert f(40, 36, 32) == (32, 29) and f(5000, 10, 512) == (512, 1) and f(4000, 3000, 0) == (
      4000, 3000)
  size = editing.editing_size
  # Stable Diffusion (multiple 64): a 4000x3000 photo is edited at 512x384, one resize.
  assert size(3000, 4000, 64, max_side=512) == (384, 512)
  assert size(200, 300, 64, max_side=512) == (192, 256)  # fits: only rounded down
  assert size(120, 200, 4, max_side=32) == (16, 32)  # scaled to 19x32, then multiples of 4
  # An editor trained at one resolution, or an explicit size, is not scaled first.
  assert size(3000, 4000, 4, resolution=32, max_side=16) == (32, 32)
  assert size(3000, 4000, 64, size=(256, 320), max_side=512) == (256, 320)
  assert "max_side=32" in editing.size_reason(120, 200, 4, max_side=32)


def test_large_image_is_edited_downscaled_and_returned_at_its_size(tiny_run, tmp_path):
  workdir, _ = tiny_run
  big = tmp_path / "big.png"
  Image.fromarray(np.random.default_rng(1).integers(0, 256, (120, 200, 3), np.uint8)).save(big)
  done = run_cli("launch.edit", *_edit_flags(workdir, big, tmp_path / "o.png"), tmp=tmp_path)
  assert done.returncode == 0, done.stderr[-2000:]
  notes = [line for line in done.stderr.splitlines() if "200x120" in line]
  assert len(notes) == 1, done.stderr[-2000:]  # one line, one resize (not max_side, then 4s)
  assert "at 32x16" in notes[0] and "max_side=32" in notes[0] and "back to 200x120" in notes[0]
  assert np.asarray(Image.open(tmp_path / "o.png")).shape == (120, 200, 3)


# ------------------------------------------------------------------ data (launch.prepare_data)


def run_prepare_data(capsys, *argv):
  """``launch.prepare_data`` main in-process behind the CLI boundary (``cli.guarded``), its
  flags parsed from ``argv`` and restored afterwards; returns (exit code, stdout, stderr)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from absl.testing import flagsaver  # pylint: disable=import-outside-toplevel
  from launch import cli, prepare_data  # pylint: disable=import-outside-toplevel
  capsys.readouterr()
  with flagsaver.flagsaver():
    flags.FLAGS(["prepare_data", *argv], known_only=True)
    code = cli.guarded(prepare_data.main)(["prepare_data"])
  out, err = capsys.readouterr()
  return code, out, err


def _one_error_line(err):
  assert "Traceback" not in err, err[-2000:]
  errors = [line for line in err.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, err[-2000:]
  return errors[0]


@pytest.fixture(scope="module")
def parquet_folders(tmp_path_factory):
  """MagicBrush-like folders: empty, a text file named like a shard, a shard with bad rows."""
  from tests.data.test_data_builders import magicbrush_rows
  from tests.helpers.magicbrush_parquet import write_parquet
  root = tmp_path_factory.mktemp("bad_parquet")
  (root / "empty").mkdir()
  (root / "text" / "data").mkdir(parents=True)
  (root / "text" / "data" / "train-00000-of-00001.parquet").write_text("not parquet\n")
  write_parquet(root / "bad_rows" / "data", "train-00000-of-00001.parquet", magicbrush_rows())
  return root


# (id, flags(parquet root, data dir) -> list, exit code, words the line must hold)
PREPARE_CASES = [
    ("empty_magicbrush_dir", lambda p, d: [f"--magicbrush_dir={p / 'empty'}"], 2,
     ["--magicbrush_dir=", "empty", "train-00000-of-00051.parquet", "--download"]),
    ("missing_magicbrush_dir", lambda p, d: [], 2, ["--magicbrush_dir=<folder"]),
    ("text_named_parquet", lambda p, d: [f"--magicbrush_dir={p / 'text'}"], 1,
     ["train-00000-of-00001.parquet", "not a readable parquet file"]),
    ("bad_row", lambda p, d: [f"--magicbrush_dir={p / 'bad_rows'}"], 1,
     ["train-00000-of-00001.parquet row 3", "'source_img'", "--skip_bad_records"]),
]


@pytest.mark.parametrize("make_flags,code,words", [c[1:] for c in PREPARE_CASES],
                         ids=[c[0] for c in PREPARE_CASES])
def test_prepare_magicbrush_bad_input_is_one_line_and_leaves_the_data_dir(
    parquet_folders, tmp_path, capsys, make_flags, code, words):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  (data_dir / "other_dataset.txt").write_text("kept\n")
  before = folder_hashes(data_dir)
  done, _, err = run_prepare_data(capsys, "--dataset=magicbrush", f"--data_dir={data_dir}",
                                  *make_flags(parquet_folders, data_dir))
  assert done == code, err[-2000:]
  line = _one_error_line(err)
  for word in words:
    assert word in line, line
  assert folder_hashes(data_dir) == before and os.listdir(data_dir) == ["other_dataset.txt"]


@pytest.mark.parametrize("argv,words", [
    (["--train_size=-1"], ["--train_size=-1", ">= 0", "--train_size=2000"]),
    (["--train_size=0", "--validation_size=0", "--test_size=0"],
     ["--train_size=0 --validation_size=0 --test_size=0", "nothing to build"]),
    (["--resolution=4"], ["--resolution=4", ">= 8", "--resolution=32"]),
], ids=["negative_size", "all_sizes_zero", "tiny_resolution"])
def test_prepare_shapes_bad_sizes_are_one_line_and_write_nothing(tmp_path, capsys, argv, words):
  done, _, err = run_prepare_data(capsys, "--dataset=shapes_edit",
                                  f"--data_dir={tmp_path / 'data'}", *argv)
  assert done == 2, err[-2000:]
  line = _one_error_line(err)
  for word in words:
    assert word in line, line
  assert not (tmp_path / "data").exists()


def test_prepare_data_defaults_are_the_default_runs(capsys):
  """One default in one place: prepare_data's shapes_edit flags default to configs/shapes.py."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from configs import shapes  # pylint: disable=import-outside-toplevel
  from launch import prepare_data  # pylint: disable=import-outside-toplevel,unused-import
  del capsys
  config = shapes.get_config()
  resolution = flags.FLAGS["resolution"]
  assert resolution.default == config.resolution == 32 and "configs/shapes.py" in resolution.help
  assert [flags.FLAGS[f"{s}_size"].default for s in ("train", "validation", "test")] == [
      config.data.train_size, config.data.validation_size, config.data.test_size]
  assert flags.FLAGS["seed"].default == config.seed


def test_a_runs_bad_record_names_the_config_flag_that_skips_it(parquet_folders, tmp_path):
  """A record the builder accepts but the run's loader cannot use (its object phrase lies past
  the text encoder's 77 tokens): the error names the record and --config.data.skip_bad_records;
  with that flag the record is skipped and counted."""
  from configs import shapes  # pylint: disable=import-outside-toplevel
  from launch import cli, prepare_data  # pylint: disable=import-outside-toplevel
  from rl4pix_jax.data import records  # pylint: disable=import-outside-toplevel
  from rl4pix_jax.rl import run_setup  # pylint: disable=import-outside-toplevel
  from rl4pix_jax.tokenizer import load_clip_tokenizer  # pylint: disable=import-outside-toplevel
  from tests.data.test_data_builders import magicbrush_rows, tfds_tmpdir
  from tests.helpers.magicbrush_parquet import write_parquet
  rows = magicbrush_rows()[:3]
  rows[1] = dict(rows[1], instruction="please " * 80 + "remove the red car",
                 object_phrase="red car")
  write_parquet(tmp_path / "parquet", "train-00000-of-00001.parquet",
                [dict(r, object_phrase=r.get("object_phrase", "")) for r in rows])
  with tfds_tmpdir(tmp_path / "tmp"):
    prepare_data.prepare_magicbrush(str(tmp_path / "data"), str(tmp_path / "parquet"), False)
  config = shapes.get_config()
  config.data.dataset, config.data.data_dir = "magicbrush", str(tmp_path / "data")
  tokenizer = load_clip_tokenizer()
  iterator = run_setup.make_iterator(config, str(tmp_path / "run"), tokenizer, "train", 3,
                                     shuffle=False, num_epochs=1)
  with pytest.raises(records.RecordError) as raised:
    next(iterator)
  line = cli.one_line(raised.value)
  assert cli.error_exit_code(raised.value) == 1
  assert "field 'object_phrase'" in line and "--config.data.skip_bad_records=True" in line
  config.data.skip_bad_records = True
  iterator = run_setup.make_iterator(config, str(tmp_path / "run"), tokenizer, "train", 3,
                                     shuffle=False, num_epochs=1)
  assert len(next(iterator).texts["instruction"]) == 2 and iterator.bad_records == 1
