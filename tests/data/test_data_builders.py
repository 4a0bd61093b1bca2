"""Tests for record validation, the object phrase extractor and the tfds builders (offline)."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

from launch import prepare_data
from rl4pix_jax.data import magicbrush_builder
from rl4pix_jax.data import object_phrase
from rl4pix_jax.data import record_features
from rl4pix_jax.data import records
from rl4pix_jax.data import shapes
from rl4pix_jax.data import shapes_check
from rl4pix_jax.data import shapes_edit_builder
from rl4pix_jax.workdir import datasets
from tests.helpers.magicbrush_parquet import encoded, write_parquet
from tests.helpers.paths import REPO_ROOT



tfds_tmpdir = datasets.tmpdir_at  # where tfds leaves its empty tmp*tfds folders


def test_tmpdir_at_points_both_and_restores(tmp_path, monkeypatch):
  import tempfile  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("TMPDIR", "/somewhere")
  before = tempfile.tempdir
  with datasets.tmpdir_at(tmp_path / "scratch"):
    assert os.environ["TMPDIR"] == tempfile.tempdir == str(tmp_path / "scratch")
    assert (tmp_path / "scratch").is_dir()
  assert os.environ["TMPDIR"] == "/somewhere" and tempfile.tempdir == before
  monkeypatch.delenv("TMPDIR")
  with pytest.raises(RuntimeError):
    with datasets.tmpdir_at(tmp_path / "other"):
      raise RuntimeError("restored on errors too")
  assert "TMPDIR" not in os.environ and tempfile.tempdir == before


def random_rgb(height=24, width=32, seed=0):
  return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def good_record(**changes):
  record = shapes.example_to_record(shapes.make_example(0, 3, 32))
  record.update(changes)
  return record


# ---------------------------------------------------------------- records


def test_decode_image_converts_modes():
  rgb = random_rgb()
  np.testing.assert_array_equal(records.decode_image(encoded(rgb), "r", "f"), rgb)
  grey = records.decode_image(encoded(rgb, mode="L"), "r", "f")
  assert grey.shape == (24, 32, 3) and np.all(grey[..., 0] == grey[..., 1])
  rgba = np.concatenate([rgb, np.zeros((24, 32, 1), np.uint8)], axis=-1)  # fully transparent
  assert np.all(records.decode_image(encoded(rgba), "r", "f") == 255)  # composited on white
  palette = records.decode_image(encoded(rgb, mode="P"), "r", "f")
  assert palette.shape == (24, 32, 3)
  deep = Image.fromarray((np.arange(24 * 32).reshape(24, 32) * 60).astype(np.uint16))
  buffer = io.BytesIO()
  deep.save(buffer, format="PNG")
  sixteen = records.decode_image(buffer.getvalue(), "r", "f")
  assert sixteen.shape == (24, 32, 3) and sixteen.max() == 255
  jpeg = records.decode_image(encoded(rgb, "JPEG"), "r", "f")
  assert jpeg.shape == (24, 32, 3)
  assert records.decode_image(np.asarray(encoded(rgb), dtype=object), "r", "f").shape[2] == 3


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\nnot really", b"", None, "text"])
def test_decode_image_rejects_corrupt_data_naming_record_and_field(data):
  with pytest.raises(records.RecordError, match=r"Record #3 \(id 'x'\), field 'source_image'"):
    records.decode_image(data, "#3 (id 'x')", "source_image")


def test_decode_image_rejects_truncated_png():
  data = encoded(random_rgb())
  with pytest.raises(records.RecordError, match="corrupt or truncated"):
    records.decode_image(data[:len(data) // 2], "r", "target_image")


def test_decode_mask_and_resizing():
  mask = np.zeros((24, 32), np.uint8)
  mask[4:12, 8:20] = 255
  decoded = records.decode_mask(encoded(mask), "r")
  assert decoded.dtype == np.float32 and decoded.max() == 1.0 and decoded.sum() == 8 * 12
  assert records.decode_mask(encoded(np.stack([mask] * 3, -1)), "r").sum() == 8 * 12
  square = records.center_crop_square(np.arange(24 * 32).reshape(24, 32))
  assert square.shape == (24, 24) and square[0, 0] == 4
  assert records.resize_image(random_rgb(), 16).shape == (16, 16, 3)
  assert records.resize_image(random_rgb(16, 16), 16).shape == (16, 16, 3)
  small = records.resize_mask(decoded, 12)
  assert small.shape == (12, 12) and 0 <= small.min() and small.max() <= 1
  assert abs(small.sum() * 4 - decoded[:, 4:28].sum()) < 1e-3  # area is kept
  assert records.resize_mask(decoded[:, :24], 48).shape == (48, 48)


def test_encode_png_round_trip_and_errors():
  rgb = random_rgb()
  np.testing.assert_array_equal(records.decode_image(records.encode_png(rgb), "r", "f"), rgb)
  with pytest.raises(ValueError, match="uint8"):
    records.encode_png(rgb.astype(np.float32))


def test_text_checks():
  assert records.as_text(b"abc") == "abc" and records.as_text(np.asarray(b"x")) == "x"
  assert records.check_text(b"  hi ", "r", "instruction") == "hi"
  with pytest.raises(records.RecordError, match="field 'instruction': is empty"):
    records.check_text("  ", "#1", "instruction")
  assert records.check_text("", "r", "source_caption", allow_empty=True) == ""
  assert records.check_phrase("Turn the Red circle blue", "red circle", "r") == (9, 19)
  with pytest.raises(records.RecordError, match="'blue star' does not occur"):
    records.check_phrase("remove the red circle", "blue star", "#2 (id 'a')")
  with pytest.raises(records.RecordError, match="field 'object_phrase': is empty"):
    records.check_phrase("remove the red circle", "", "r")
  assert records.check_task(np.int32(2), "r") == 2
  with pytest.raises(records.RecordError, match="field 'task'"):
    records.check_task(7, "r")
  with pytest.raises(records.RecordError, match="field 'task': is not an integer"):
    records.check_task("x", "r")
  assert records.record_name({"example_id": b"e"}, 4) == "#4 (id 'e')"
  assert records.record_name({}, None) == "id '?'"
  with pytest.raises(records.RecordError, match="field 'mask_image': missing"):
    records.get_field({"a": 1}, "mask_image", "r")


def test_decode_record_good_and_bad_records():
  decoded = records.decode_record(good_record(), 16, index=0)
  assert decoded["source"].shape == (16, 16, 3) and decoded["mask"].shape == (16, 16)
  assert decoded["object_phrase"] in decoded["instruction"]
  # Bytes text (as tfds returns it) works the same.
  as_bytes = {k: v.encode() if isinstance(v, str) else v for k, v in good_record().items()}
  assert records.decode_record(as_bytes, 16)["instruction"] == decoded["instruction"]
  # A target of another size is resized to the source's size.
  resized = records.decode_record(good_record(target_image=encoded(random_rgb(64, 64))), 32)
  assert resized["target"].shape == (32, 32, 3)
  record = good_record()
  del record["instruction"]
  with pytest.raises(records.RecordError, match=r"#5 \(id 'shapes-0-3'\), field 'instruction'"):
    records.decode_record(record, 16, index=5)
  with pytest.raises(records.RecordError, match="field 'mask_image': has size"):
    records.decode_record(good_record(mask_image=encoded(np.zeros((8, 8), np.uint8))), 16)
  with pytest.raises(records.RecordError, match="field 'instruction': is empty"):
    records.decode_record(good_record(instruction=""), 16)
  with pytest.raises(records.RecordError, match="field 'object_phrase'"):
    records.decode_record(good_record(object_phrase="purple hexagon"), 16)
  with pytest.raises(records.RecordError, match="field 'source_image': corrupt"):
    records.decode_record(good_record(source_image=b"\x89PNG broken"), 16)


def test_record_features_cover_record_fields():
  features = record_features.record_features()
  assert set(features.keys()) == set(records.RECORD_FIELDS)


# ---------------------------------------------------------------- object phrase

PHRASES = [
    ("change the cat to a dog", "cat", "replacement"),
    ("Remove the red car.", "red car", "removal"),
    ("add a hat on the man", "hat", "insertion"),
    ("what if the sky was pink", "sky", "transformation"),
    ("Let there be fireworks in the sky", "fireworks", "insertion"),
    ("turn the table into wood", "table", "transformation"),
    ("replace the bowl of fruit with a cake", "bowl of fruit", "replacement"),
    ("get rid of the people in the background", "people", "removal"),
    ("put a cup of coffee on the table", "cup of coffee", "insertion"),
    ("make the man smile", "man", "transformation"),
    ("snow", "snow", "transformation"),
    ("The cat should be a tiger", "cat", "transformation"),
]


@pytest.mark.parametrize("instruction,phrase,task", PHRASES)
def test_extract_object_phrase_and_task(instruction, phrase, task):
  found = object_phrase.extract_object_phrase(instruction)
  assert found == phrase
  assert found in instruction  # a literal substring, case kept
  assert object_phrase.classify_task(instruction) == task


def test_extract_object_phrase_without_content_words():
  assert object_phrase.extract_object_phrase("make it so") == ""
  assert object_phrase.extract_object_phrase("Make it night time") == "time"


def test_shapes_instructions_give_their_phrase():
  for i in range(30):
    example = shapes.make_example(6, i, 32)
    assert object_phrase.extract_object_phrase(example.instruction) == example.object_phrase
    assert object_phrase.classify_task(example.instruction) in records.TASKS


# ---------------------------------------------------------------- shapes_edit builder


def test_shapes_edit_config_names_and_validation():
  config = shapes_edit_builder.shapes_edit_config(32, 6, 2, 1, seed=4)
  assert config.name == "r32_train6_val2_test1_seed4" and config.resolution == 32
  with pytest.raises(ValueError, match="train_size must be >= 0"):
    shapes_edit_builder.shapes_edit_config(32, -1)
  with pytest.raises(ValueError, match="resolution must be >= 8"):
    shapes_edit_builder.shapes_edit_config(4)
  with pytest.raises(ValueError, match="seed must be >= 0"):
    shapes_edit_builder.shapes_edit_config(32, seed=-2)


def test_shapes_edit_builder_prepares_and_reads_back(tmp_path):
  with tfds_tmpdir(tmp_path / "tmp"):
    builder = shapes_edit_builder.make_builder(str(tmp_path / "data"), 32, 6, 2, 0, seed=1)
    builder.download_and_prepare()
  assert set(builder.info.splits) == {"train", "validation"}
  source = builder.as_data_source()["train"]
  assert len(source) == 6
  ids = sorted(records.as_text(source[i]["example_id"]) for i in range(6))
  assert ids == sorted(f"shapes-3-{i}" for i in range(6))  # train seed = 3 * seed + 0
  for i in range(6):
    example = shapes.example_from_record(source[i], i)
    reference = shapes.make_example(3, int(example.example_id.split("-")[-1]), 32)
    np.testing.assert_array_equal(example.target, reference.target)
    assert shapes_check.check_edit(example.target, example)["success"] == 1.0
  # Readable from the folder alone (no builder class), and via tfds.data_source.
  reread = tfds.builder_from_directory(builder.data_dir)
  assert reread.info.splits["validation"].num_examples == 2
  assert len(reread.as_data_source(split="validation")) == 2
  assert not [p for p in os.listdir(tmp_path) if p.startswith("tmp") and p != "tmp"]


def test_make_builder_uses_predefined_config_names(tmp_path):
  with tfds_tmpdir(tmp_path / "tmp"):
    predefined = shapes_edit_builder.make_builder(str(tmp_path))
    custom = shapes_edit_builder.make_builder(str(tmp_path), 32, 10, 1, 1)
  assert predefined.builder_config.name == shapes_edit_builder.ShapesEdit.DEFAULT_CONFIG_NAME
  assert custom.builder_config.train_size == 10


def test_prepare_data_builds_shapes_and_cleans_up(tmp_path):
  with tfds_tmpdir(tmp_path / "tmp"):
    folder = prepare_data.prepare_shapes_edit(str(tmp_path), 32, 3, 1, 1, 0)
  assert os.path.isfile(os.path.join(folder, "dataset_info.json"))
  scratch = tmp_path / "scratch"
  (scratch / "tmpabctfds").mkdir(parents=True)
  prepare_data.remove_empty_folders(str(scratch))
  assert not scratch.exists()


def test_prepare_data_command_line(tmp_path):
  png = tmp_path / "docs" / "grid.png"
  command = [sys.executable, "-m", "launch.prepare_data", "--dataset=shapes_edit",
             f"--data_dir={tmp_path / 'data'}", "--resolution=32", "--train_size=4",
             "--validation_size=1", "--test_size=1", f"--preview={png}"]
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Prepared shapes_edit" in result.stdout
  assert Image.open(png).size[0] > 300
  assert (tmp_path / "data" / "shapes_edit" / "r32_train4_val1_test1_seed0").is_dir()
  assert not (tmp_path / "data" / "tmp").exists()


# ---------------------------------------------------------------- magicbrush builder


def magicbrush_rows():
  """Rows in the osunlp/MagicBrush schema: good ones and bad ones (marked by img_id)."""
  rgb = random_rgb(24, 32, seed=1)
  mask = np.zeros((24, 32, 3), np.uint8)
  mask[5:15, 10:20] = 255
  painted = rgb.copy()  # MagicBrush style: the source with the region painted white
  painted[2:6, 2:6] = 255

  def image(data):
    return {"bytes": data, "path": None}

  def row(img_id, turn, instruction, **images):
    values = {"source_img": image(encoded(rgb)), "mask_img": image(encoded(mask)),
              "target_img": image(encoded(rgb, "JPEG"))}
    values.update({k: image(v) for k, v in images.items()})
    return dict(img_id=img_id, turn_index=turn, instruction=instruction, **values)

  return [
      row("100", 1, "change the cat to a dog"),
      row("100", 2, "remove the red car", source_img=encoded(rgb, mode="L"),
          target_img=encoded(rgb, mode="RGBA"), mask_img=encoded(painted)),
      row("101", 1, "let it snow", mask_img=encoded(mask, mode="RGBA")),
      row("bad-corrupt", 1, "add a hat", source_img=b"\x89PNG\r\n\x1a\ntruncated"),
      row("bad-mask", 1, "add a hat", mask_img=encoded(np.zeros((8, 8), np.uint8))),
      row("bad-empty", 1, "   "),
  ]


def test_magicbrush_record_conversions():
  rows = magicbrush_rows()
  key, record = magicbrush_builder.magicbrush_record(rows[0], "train-0.parquet row 0")
  assert key == "100-1" and record["example_id"] == "100-1"
  assert record["object_phrase"] == "cat" and record["task"] == records.TASKS.index(
      "replacement")
  assert record["target_caption"] == "change the cat to a dog" and record["source_caption"] == ""
  mask = records.decode_mask(record["mask_image"], "r")
  assert mask.sum() == 100 and mask[5:15, 10:20].min() == 1.0
  _, painted = magicbrush_builder.magicbrush_record(rows[1], "r")
  assert records.decode_mask(painted["mask_image"], "r")[2:6, 2:6].min() == 1.0
  decoded = records.decode_record(painted, 16)
  assert decoded["source"].shape == (16, 16, 3)
  overridden = dict(rows[0], object_phrase="dog", task="transformation",
                    source_caption="a cat", target_caption="a dog")
  _, record = magicbrush_builder.magicbrush_record(overridden, "r")
  assert record["object_phrase"] == "dog" and record["task"] == 3
  assert (record["source_caption"], record["target_caption"]) == ("a cat", "a dog")
  with pytest.raises(records.RecordError, match="field 'object_phrase'.*'horse' does not occur"):
    magicbrush_builder.magicbrush_record(dict(rows[0], object_phrase="horse"), "r")
  with pytest.raises(records.RecordError, match="field 'task'"):
    magicbrush_builder.magicbrush_record(dict(rows[0], task="recolour"), "r")
  missing = dict(rows[0])
  del missing["target_img"]
  with pytest.raises(records.RecordError, match="row 7, field 'target_img': missing"):
    magicbrush_builder.magicbrush_record(missing, "row 7")
  with pytest.raises(records.RecordError, match=r"id 'bad-corrupt-1'\), field 'source_img'"):
    magicbrush_builder.magicbrush_record(rows[3], "row 3")
  with pytest.raises(records.RecordError, match="field 'mask_img': has size"):
    magicbrush_builder.magicbrush_record(rows[4], "row 4")
  with pytest.raises(records.RecordError, match="field 'instruction': is empty"):
    magicbrush_builder.magicbrush_record(rows[5], "row 5")
  with pytest.raises(records.RecordError, match="non-empty 'bytes'"):
    magicbrush_builder.magicbrush_record(dict(rows[0], mask_img={"bytes": None}), "r")


def test_mask_from_magicbrush_marks_white():
  image = np.zeros((2, 3, 3), np.uint8)
  image[0, 0] = 255
  image[1, 1] = (255, 255, 200)  # bright but not white
  expected = np.asarray([[255, 0, 0], [0, 0, 0]], np.uint8)
  np.testing.assert_array_equal(magicbrush_builder.mask_from_magicbrush(image), expected)


def test_find_parquet_shards(tmp_path):
  with pytest.raises(ValueError, match="No MagicBrush parquet shards"):
    magicbrush_builder.find_parquet_shards(str(tmp_path))
  rows = magicbrush_rows()[:1]
  write_parquet(tmp_path / "data", "train-00001-of-00002.parquet", rows)
  write_parquet(tmp_path / "data", "train-00000-of-00002.parquet", rows)
  write_parquet(tmp_path / "data", "dev-00000-of-00001.parquet", rows)
  write_parquet(tmp_path, "notes.parquet", rows)
  shards = magicbrush_builder.find_parquet_shards(str(tmp_path))
  assert sorted(shards) == ["train", "validation"]
  assert [os.path.basename(p) for p in shards["train"]] == [
      "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
  assert len(list(magicbrush_builder.read_parquet_rows(shards["validation"][0]))) == 1


def test_magicbrush_builder_offline(tmp_path):
  rows = magicbrush_rows()
  parquet_dir = tmp_path / "parquet"
  write_parquet(parquet_dir / "data", "train-00000-of-00001.parquet", rows)
  write_parquet(parquet_dir / "data", "dev-00000-of-00001.parquet", rows[:2])
  manual = tfds.download.DownloadConfig(manual_dir=str(parquet_dir))
  with tfds_tmpdir(tmp_path / "tmp"):
    strict = magicbrush_builder.Magicbrush(data_dir=str(tmp_path / "strict"),
                                           file_format="array_record")
    with pytest.raises(records.RecordError, match="row 3 .*field 'source_img'"):
      strict.download_and_prepare(download_config=manual)
    folder = prepare_data.prepare_magicbrush(str(tmp_path / "data"), str(parquet_dir),
                                             skip_bad_records=True)
  reread = tfds.builder_from_directory(folder)
  assert reread.info.splits["train"].num_examples == 3
  assert reread.info.splits["validation"].num_examples == 2
  assert dict(reread.info.metadata["skipped_records"]) == {"train": 3, "validation": 0}
  train = reread.as_data_source(split="train")
  ids = sorted(records.as_text(train[i]["example_id"]) for i in range(len(train)))
  assert ids == ["100-1", "100-2", "101-1"]
  for i in range(len(train)):
    decoded = records.decode_record(train[i], 16, i)
    assert decoded["source"].shape == (16, 16, 3) and decoded["mask"].max() <= 1.0
    assert decoded["object_phrase"] in decoded["instruction"]
