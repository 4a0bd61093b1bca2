"""Tests for the grain input pipeline: batch format, sharding, resume, bad records."""

import json

import numpy as np
import pytest

from rl4pix_jax import tokenizer as tokenizer_lib
from rl4pix_jax.data import loader
from rl4pix_jax.data import records
from rl4pix_jax.data import shapes
from rl4pix_jax.data import shapes_scene
from rl4pix_jax.data import shapes_edit_builder
from tests.data.test_data_builders import tfds_tmpdir

NUM_RECORDS = 10
RESOLUTION = 32


@pytest.fixture(scope="module")
def tokenizer():
  return tokenizer_lib.load_clip_tokenizer()


@pytest.fixture(scope="module")
def shape_records():
  return [shapes.example_to_record(shapes.make_example(11, i, RESOLUTION))
          for i in range(NUM_RECORDS)]


def config(**changes):
  values = dict(batch_size=3, resolution=RESOLUTION, seed=4, num_threads=1,
                prefetch_buffer_size=4)
  values.update(changes)
  return loader.LoaderConfig(**values)


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.texts == b.texts
    for key in a.arrays:
      np.testing.assert_array_equal(a.arrays[key], b.arrays[key])


def test_batch_format(tokenizer, shape_records):
  batch = next(loader.make_edit_iterator(shape_records, tokenizer, config(max_object_tokens=6)))
  arrays = batch.arrays
  b, r = 3, RESOLUTION
  expected = {
      "source": ((b, r, r, 3), np.float32), "target": ((b, r, r, 3), np.float32),
      "mask": ((b, r, r), np.float32), "input_ids": ((b, 77), np.int32),
      "token_index": ((b, 6), np.int32), "token_mask": ((b, 6), np.bool_),
      "caption_ids": ((b, 77), np.int32), "source_caption_ids": ((b, 77), np.int32),
      "example_index": ((b,), np.int64), "task": ((b,), np.int32),
      # the shapes check's targets (shapes data only)
      "check_region": ((b, r, r), np.float32), "check_before": ((b, r, r), np.float32),
      "check_outside": ((b, r, r), np.float32), "check_colours": ((b, len(shapes_scene.PALETTE) + 1, 3), np.float32),
      "check_colour": ((b,), np.int32), "check_removal": ((b,), np.int32),
      "check_has_before": ((b,), np.float32),
  }
  assert {k: (v.shape, v.dtype.type) for k, v in arrays.items()} == expected
  assert -1.0 <= arrays["source"].min() and arrays["source"].max() <= 1.0
  assert set(np.unique(arrays["mask"])) <= {0.0, 1.0}
  assert sorted(batch.texts) == sorted(loader.TEXT_KEYS)
  for i in range(b):
    record = shape_records[arrays["example_index"][i]]
    assert batch.texts["example_id"][i] == record["example_id"]
    assert batch.texts["instruction"][i] == record["instruction"]
    assert arrays["task"][i] == record["task"]
    source = records.decode_image(record["source_image"], "r", "f")
    np.testing.assert_allclose(arrays["source"][i], source / 127.5 - 1.0, atol=1e-6)
    # The phrase tokens, read back from input_ids, spell the object phrase.
    positions = arrays["token_index"][i][arrays["token_mask"][i]]
    assert len(positions) >= 2 and np.all(arrays["token_index"][i][~arrays["token_mask"][i]]
                                          == 0)
    words = tokenizer.decode(arrays["input_ids"][i][positions]).strip()
    assert words == batch.texts["object_phrase"][i]
    np.testing.assert_array_equal(
        arrays["caption_ids"][i],
        tokenizer_lib.tokenize(tokenizer, [batch.texts["target_caption"][i]])[0])
    np.testing.assert_array_equal(
        arrays["source_caption_ids"][i],
        tokenizer_lib.tokenize(tokenizer, [batch.texts["source_caption"][i]])[0])


def test_resume_yields_the_same_next_batches(tokenizer, shape_records):
  """N batches, save the state, M more; a fresh iterator restored from it gives the same M."""
  iterator = loader.make_edit_iterator(shape_records, tokenizer, config())
  take(iterator, 4)  # 12 examples: already into the second (reshuffled) epoch
  state = json.loads(json.dumps(iterator.get_state()))  # JSON-serialisable
  expected = take(iterator, 5)
  restored = loader.make_edit_iterator(shape_records, tokenizer, config())
  restored.set_state(state)
  assert_same_batches(take(restored, 5), expected)
  assert restored.metrics() == iterator.metrics() == {"data/bad_records": 0,
                                                      "data/batches": 9}


def test_shuffle_is_seeded_and_reshuffled_every_epoch(tokenizer, shape_records):
  def order(seed, batches=10, **changes):
    iterator = loader.make_edit_iterator(shape_records, tokenizer,
                                         config(seed=seed, batch_size=2, **changes))
    return np.concatenate([b.arrays["example_index"] for b in take(iterator, batches)])

  first = order(4)
  np.testing.assert_array_equal(first, order(4))
  assert not np.array_equal(first, order(5))
  epoch1, epoch2 = first[:NUM_RECORDS], first[NUM_RECORDS:]
  assert sorted(epoch1) == sorted(epoch2) == list(range(NUM_RECORDS))
  assert not np.array_equal(epoch1, epoch2)
  np.testing.assert_array_equal(order(4, batches=5, shuffle=False), np.arange(NUM_RECORDS))


def test_processes_read_disjoint_shards(tokenizer, shape_records):
  seen = []
  for process_index in range(2):
    iterator = loader.make_edit_iterator(
        shape_records, tokenizer, config(num_epochs=1, drop_remainder=False),
        process_index=process_index, process_count=2)
    batches = list(iterator)
    assert [len(b.texts["example_id"]) for b in batches] == [3, 2]
    seen.append({int(i) for b in batches for i in b.arrays["example_index"]})
  assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(NUM_RECORDS))
  dropped = loader.make_edit_iterator(shape_records, tokenizer, config(num_epochs=1))
  assert len(list(dropped)) == NUM_RECORDS // 3


def test_bad_record_raises_naming_record_and_field(tokenizer, shape_records):
  bad = list(shape_records)
  bad[2] = dict(bad[2], source_image=b"\x89PNG\r\n\x1a\n truncated")
  iterator = loader.make_edit_iterator(bad, tokenizer, config(shuffle=False))
  with pytest.raises(records.RecordError, match=r"#2 \(id 'shapes-11-2'\), field 'source_image'"):
    next(iterator)


def test_bad_records_are_skipped_and_counted(tokenizer, shape_records):
  bad = list(shape_records)
  bad[1] = dict(bad[1], source_image=b"corrupt")
  bad[4] = dict(bad[4], object_phrase="purple hexagon")  # not in the instruction
  bad[6] = {k: v for k, v in bad[6].items() if k != "mask_image"}
  bad[7] = dict(bad[7], instruction="")
  # A phrase the tokenizer cannot place (past the 77-token truncation) is bad as well.
  long_instruction = "please " * 80 + bad[8]["instruction"]
  bad[8] = dict(bad[8], instruction=long_instruction)
  iterator = loader.make_edit_iterator(
      bad, tokenizer, config(shuffle=False, num_epochs=1, skip_bad_records=True,
                             drop_remainder=False))
  batches = list(iterator)
  kept = [int(i) for b in batches for i in b.arrays["example_index"]]
  assert kept == [0, 2, 3, 5, 9]
  assert iterator.bad_records == 5 and iterator.metrics()["data/bad_records"] == 5
  assert len(iterator.bad_messages) == 5
  assert "field 'source_image'" in iterator.bad_messages[0]
  assert any("field 'object_phrase'" in m and "shapes-11-8" in m for m in iterator.bad_messages)
  state = iterator.get_state()
  restored = loader.make_edit_iterator(bad, tokenizer, config(skip_bad_records=True))
  restored.set_state(state)
  assert restored.bad_records == 5


def test_phrase_past_truncation_raises_without_skipping(tokenizer, shape_records):
  bad = [dict(shape_records[0], instruction="please " * 80 + shape_records[0]["instruction"])]
  iterator = loader.make_edit_iterator(bad, tokenizer, config(batch_size=1))
  with pytest.raises(records.RecordError, match=r"#0 \(id 'shapes-11-0'\), field 'object_phrase'"):
    next(iterator)


def test_argument_errors(tokenizer, shape_records):
  with pytest.raises(ValueError, match="batch_size must be >= 1"):
    loader.make_edit_iterator(shape_records, tokenizer, config(batch_size=0))
  with pytest.raises(ValueError, match=r"process_index=2 must be in \[0, 2\)"):
    loader.make_edit_iterator(shape_records, tokenizer, config(), 2, 2)
  with pytest.raises(ValueError, match="fewer than the 4 processes"):
    loader.make_edit_iterator(shape_records[:3], tokenizer, config(), 0, 4)
  iterator = loader.make_edit_iterator(shape_records, tokenizer, config())
  with pytest.raises(ValueError, match="Loader state lacks 'bad_records'"):
    iterator.set_state({"examples": {}, "batches": 0})


def test_task_subset_keeps_the_tasks_asked_for(tokenizer, shape_records):
  tasks = [records.TASKS[int(r["task"])] for r in shape_records]
  wanted = tasks[0]
  subset = loader.TaskSubset(shape_records, [wanted])
  kept = [r["example_id"] for r, t in zip(shape_records, tasks) if t == wanted]
  assert len(subset) == len(kept) and [r["example_id"] for r in subset] == kept
  both = sorted(set(tasks))[:2]
  assert len(loader.TaskSubset(shape_records, both)) == sum(t in both for t in tasks)
  # The loader reads the subset like any source: every batch is of the task asked for.
  batch = next(loader.make_edit_iterator(subset, tokenizer, config(batch_size=1)))
  assert batch.texts["instruction"][0] in [r["instruction"] for r in subset]
  only_wanted = [r for r, t in zip(shape_records, tasks) if t == wanted]
  other = next(t for t in records.TASKS if t != wanted)
  with pytest.raises(ValueError, match="No record of the tasks"):
    loader.TaskSubset(only_wanted, [other])


def test_task_subset_bad_task_field(shape_records):
  """A record without a readable task raises one line naming it and the fix, or is left out
  and counted with skip_bad_records."""
  tasks = [records.TASKS[int(r["task"])] for r in shape_records]
  missing = [dict(r) for r in shape_records]
  del missing[1]["task"]
  with pytest.raises(records.RecordError, match=r"#1 .*'task'.* missing.*skip them"):
    loader.TaskSubset(missing, [tasks[0]], bad_record_fix="Pass skip them.")
  subset = loader.TaskSubset(missing, [tasks[0]], skip_bad_records=True)
  assert subset.skipped == 1
  assert len(subset) == sum(t == tasks[0] for i, t in enumerate(tasks) if i != 1)
  out_of_range = [dict(r) for r in shape_records]
  out_of_range[0]["task"] = np.int64(len(records.TASKS))
  with pytest.raises(records.RecordError, match="is not a task index"):
    loader.TaskSubset(out_of_range, [tasks[0]])


def test_decode_for_batch(shape_records):
  decoded = loader.decode_for_batch(3, shape_records[3], 16, skip_bad_records=False)
  assert decoded["source"].shape == (16, 16, 3) and decoded["example_index"] == 3
  assert decoded["source"].dtype == np.float32 and decoded["source"].min() >= -1.0
  bad = loader.decode_for_batch(3, dict(shape_records[3], instruction=" "), 16, True)
  assert isinstance(bad, loader.BadRecord) and "field 'instruction'" in bad.message
  dataset = loader.build_example_dataset(shape_records, config(num_epochs=1, shuffle=False))
  assert [e["example_index"] for e in dataset] == list(range(NUM_RECORDS))


def test_reads_a_prepared_tfds_split(tmp_path, tokenizer):
  with tfds_tmpdir(tmp_path / "tmp"):
    builder = shapes_edit_builder.make_builder(str(tmp_path / "data"), RESOLUTION, 8, 2, 0)
    builder.download_and_prepare()
  folder = loader.find_dataset_dir(str(tmp_path / "data"), "shapes_edit")
  assert folder == str(builder.data_dir)
  source = loader.open_split(folder, "train")
  first = take(loader.make_edit_iterator(source, tokenizer, config(batch_size=4)), 3)
  assert first[0].arrays["source"].shape == (4, RESOLUTION, RESOLUTION, 3)
  assert all(i.startswith("shapes-0-") for b in first for i in b.texts["example_id"])
  # Resume works the same on the tfds source.
  iterator = loader.make_edit_iterator(source, tokenizer, config(batch_size=4))
  take(iterator, 1)
  restored = loader.make_edit_iterator(source, tokenizer, config(batch_size=4))
  restored.set_state(json.loads(json.dumps(iterator.get_state())))
  assert_same_batches(take(restored, 2), first[1:])
  with pytest.raises(ValueError, match="Split 'test' not in"):
    loader.open_split(folder, "test")
  with pytest.raises(ValueError, match="No prepared 'magicbrush' dataset"):
    loader.find_dataset_dir(str(tmp_path / "data"), "magicbrush")
  with tfds_tmpdir(tmp_path / "tmp"):
    other = shapes_edit_builder.make_builder(str(tmp_path / "data"), RESOLUTION, 2, 1, 0)
    other.download_and_prepare()
  with pytest.raises(ValueError, match="several 'shapes_edit' configs"):
    loader.find_dataset_dir(str(tmp_path / "data"), "shapes_edit")
  assert loader.find_dataset_dir(str(tmp_path / "data"), "shapes_edit",
                                 other.builder_config.name) == str(other.data_dir)
