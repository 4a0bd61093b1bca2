"""launch.evaluate on MagicBrush, end to end and offline.

A tiny MagicBrush test split in the hub's parquet layout (two edit sessions: img 300 with
turns 1-2, img 301 with turn 1; rows stored out of order) is built into tfds by
``magicbrush_builder``; a tiny random InstructPix2Pix pipeline, CLIPModel and DINO ViT are
saved in their real formats. The CLI runs once per setting (module-scoped), with
``--save_edits``, and the tests check the reports against the saved pixels.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from launch import prepare_data
from rl4pix_jax import evaluation
from rl4pix_jax.data import loader
from rl4pix_jax.metrics import image_metrics
from rl4pix_jax.rl import run_loading
from rl4pix_jax.tokenizer import load_clip_tokenizer
from tests.data.test_data_builders import tfds_tmpdir
from tests.helpers import magicbrush_parquet, tiny_models
from tests.helpers.magicbrush_parquet import write_parquet
from tests.launch.test_cli_edit import run_cli, tiny_run  # pylint: disable=unused-import

pytest.importorskip("torch")
pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

RESOLUTION = 32
SAMPLER_FLAGS = ["--steps=2", "--seed=0", "--guidance_scale=7.5", "--image_guidance_scale=1.5",
                 f"--resolution={RESOLUTION}"]
METRICS = ["l1", "l2", "clip_i", "dino", "clip_t"]
SESSION_IDS = ["300-1", "300-2", "301-1"]  # evaluation order: session by session, by turn
INSTRUCTIONS = {"300-1": "change the cat to a dog", "300-2": "remove the red car",
                "301-1": "add a hat on the dog"}


def _rows(rng, ids, corrupt=()):
  """Parquet rows in the osunlp/MagicBrush columns; turn k's source is turn k-1's target."""
  # 40 px: not the evaluation resolution, the sources and targets are resized to it.
  return magicbrush_parquet.session_rows(rng, ids, INSTRUCTIONS, corrupt, side=40)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """Tiny MagicBrush datasets, pipeline, CLIP and DINO ViT folders (paths as strings)."""
  root = tmp_path_factory.mktemp("magicbrush_eval")
  rng = np.random.default_rng(0)
  rows = _rows(rng, SESSION_IDS)
  # Stored out of order: the evaluation must not rely on the parquet's row order.
  write_parquet(root / "parquet" / "data", "test-00000-of-00001.parquet",
                [rows[1], rows[2], rows[0]])
  # A train split whose session 400 lost its turn 1 (a corrupt row skipped at build time).
  write_parquet(root / "broken_parquet" / "data", "train-00000-of-00001.parquet",
                _rows(rng, ["400-1", "400-2", "401-1"], corrupt=("400-1",)))
  with tfds_tmpdir(root / "tmp"):
    prepare_data.prepare_magicbrush(str(root / "data"), str(root / "parquet"), False)
    prepare_data.prepare_magicbrush(str(root / "broken_data"), str(root / "broken_parquet"),
                                    skip_bad_records=True)
  tiny_models.save_tiny_diffusers_pipeline(str(root / "ip2p"))
  tiny_models.save_tiny_clip_model(str(root / "clip"))
  kw = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
  transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, **kw)
                        ).save_pretrained(str(root / "dino"))
  return {name: str(root / name) for name in
          ("data", "broken_data", "ip2p", "clip", "dino")} | {"root": root}


def _model_flags(folders):
  return ["--dataset=magicbrush", f"--data_dir={folders['data']}",
          f"--clip_model={folders['clip']}", f"--dino_model={folders['dino']}", "--split=test"]


def _evaluate(folders, setting, *extra):
  """Runs the CLI; returns (report dict, markdown text, output prefix)."""
  prefix = folders["root"] / "out" / setting
  done = run_cli("launch.evaluate", f"--pretrained={folders['ip2p']}", *_model_flags(folders),
                 f"--setting={setting}", "--max_examples=3", "--save_edits",
                 f"--output={prefix}", *SAMPLER_FLAGS, *extra, tmp=folders["root"])
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads((prefix.parent / f"{setting}.json").read_text())
  return report, (prefix.parent / f"{setting}.md").read_text(), prefix


@pytest.fixture(scope="module")
def single_turn(folders):
  return _evaluate(folders, "single_turn")


@pytest.fixture(scope="module")
def multi_turn(folders):
  return _evaluate(folders, "multi_turn")


@pytest.fixture(scope="module")
def examples(folders):
  """The evaluated examples as the CLI decodes them (targets at the evaluation resolution)."""
  dataset_dir = loader.find_dataset_dir(folders["data"], "magicbrush")
  decoded = evaluation.load_examples(dataset_dir, "test", RESOLUTION, multi_turn=True)
  return {e["example_id"]: e for e in decoded}


def _saved_edit(prefix, report, model, example_id):
  relative = report["edits"][model][example_id]
  return np.asarray(Image.open(f"{prefix}_edits/0/{relative}"))


def _check_l1_l2_from_saved_pixels(report, prefix, examples, ids, values):
  for i, example_id in enumerate(ids):
    edit = _saved_edit(prefix, report, next(iter(report["models"])), example_id)
    assert edit.shape == (RESOLUTION, RESOLUTION, 3)
    diff = edit.astype(np.float64) / 255 - examples[example_id]["target"].astype(np.float64) / 255
    assert values["l1"][i] == pytest.approx(np.abs(diff).mean(), abs=1e-6)
    assert values["l2"][i] == pytest.approx((diff ** 2).mean(), abs=1e-6)


def _check_metric_values(summary, per_example, count):
  for key in METRICS:
    values = np.asarray(per_example[key], np.float64)
    assert values.shape == (count,) and np.all(np.isfinite(values)), (key, values)
    assert summary[key]["n"] == count
    assert summary[key]["ci_low"] <= summary[key]["mean"] <= summary[key]["ci_high"]
    assert summary[key]["mean"] == pytest.approx(values.mean(), abs=1e-6)
  assert all(0 < v < 1 for v in per_example["l1"]) and all(0 < v < 1 for v in per_example["l2"])
  for key in ("clip_i", "dino", "clip_t"):
    assert all(-1 - 1e-5 <= v <= 1 + 1e-5 for v in per_example[key])


def test_single_turn_scores_every_turn_from_the_saved_edits(single_turn, examples):
  report, table, prefix = single_turn
  assert report["setting"] == "single_turn" and report["dataset"] == "magicbrush"
  assert report["num_examples"] == report["num_edits"] == 3
  assert sorted(report["example_ids"]) == sorted(SESSION_IDS)
  (model, entry), = report["models"].items()
  assert set(entry["per_example"]) == set(METRICS) | {"clip_t_oracle"}
  assert "all_turns" not in entry  # every turn is scored
  _check_metric_values(entry["summary"], entry["per_example"], 3)
  _check_l1_l2_from_saved_pixels(report, prefix, examples, report["example_ids"],
                                 entry["per_example"])
  # MagicBrush's testResults layout: turn 1 as <id>_1, later turns edited independently.
  assert sorted(report["edits"][model].values()) == [
      "300/300_1.png", "300/300_inde_2.png", "301/301_1.png"]
  assert report["clip_t_text"] == "instruction" and "CLIP-T compares each edit" in table
  assert report["reference_setting"] == "single_turn"
  assert "| model | l1 | l2 | clip_i | dino | clip_t |" in table
  assert "(single_turn, 3 examples)" in table
  assert f"| {model} | {entry['summary']['l1']['mean']:.4f} [" in table
  assert "| InstructPix2Pix (paper) | 0.1122 | 0.0371 | 0.8524 | 0.7428 | 0.2764 |" in table
  assert os.path.exists(f"{prefix}_0.png")


def test_multi_turn_scores_the_final_turn_of_each_session(multi_turn, single_turn, examples):
  report, table, prefix = multi_turn
  assert report["num_examples"] == 2 and report["num_edits"] == 3
  assert report["example_ids"] == ["300-2", "301-1"]  # the final turns, session order
  (model, entry), = report["models"].items()
  _check_metric_values(entry["summary"], entry["per_example"], 2)
  every = entry["all_turns"]
  assert every["example_ids"] == SESSION_IDS  # session by session, ordered by turn
  for key in METRICS:
    assert entry["per_example"][key] == [every["per_example"][key][1],
                                         every["per_example"][key][2]]
  _check_l1_l2_from_saved_pixels(report, prefix, examples, every["example_ids"],
                                 every["per_example"])
  assert sorted(report["edits"][model].values()) == [
      "300/300_1.png", "300/300_iter_2.png", "301/301_1.png"]
  assert "(multi_turn, 2 sessions, 3 edits)" in table
  assert "(paper)" not in table and report["reference"] is None  # single-turn numbers only
  # Turn 2 started from another image than in single-turn, so its edit differs.
  single_report, _, single_prefix = single_turn
  assert not np.array_equal(_saved_edit(prefix, report, model, "300-2"),
                            _saved_edit(single_prefix, single_report, model, "300-2"))


def test_multi_turn_edits_the_previous_turns_output(folders, multi_turn, examples):
  """Re-does the CLI's multi-turn edits in-process: turn 1 from the stored sources (seed + 1,
  both sessions in one call), turn 2 from the saved turn-1 edit (seed + 2)."""
  report, _, prefix = multi_turn
  model = next(iter(report["models"]))
  editor = run_loading.load_pretrained_editor(folders["ip2p"])
  options = dict(num_steps=2, guidance_scale=7.5, image_guidance_scale=1.5, eta=0.0)
  first = editor.edit([examples["300-1"]["source"], examples["301-1"]["source"]],
                      [INSTRUCTIONS["300-1"], INSTRUCTIONS["301-1"]], seed=1, **options)
  turn_one = _saved_edit(prefix, report, model, "300-1")
  for image, example_id in zip(first.images, ["300-1", "301-1"]):
    saved = _saved_edit(prefix, report, model, example_id).astype(np.int32)
    assert np.abs(image.astype(np.int32) - saved).max() <= 1, example_id
  second = editor.edit([turn_one], [INSTRUCTIONS["300-2"]], seed=2, **options)
  saved = _saved_edit(prefix, report, model, "300-2").astype(np.int32)
  assert np.abs(second.images[0].astype(np.int32) - saved).max() <= 1
  from_source = editor.edit([examples["300-2"]["source"]], [INSTRUCTIONS["300-2"]], seed=2,
                            **options)
  assert np.abs(from_source.images[0].astype(np.int32) - saved).max() > 1


def test_multi_turn_loading_orders_sessions_and_rejects_broken_ones(folders):
  dataset_dir = loader.find_dataset_dir(folders["data"], "magicbrush")
  loaded = evaluation.load_examples(dataset_dir, "test", RESOLUTION, multi_turn=True)
  assert [e["example_id"] for e in loaded] == SESSION_IDS
  # The stored turn-2 source is the turn-1 target (the dataset's own chaining).
  np.testing.assert_array_equal(loaded[1]["source"], loaded[0]["target"])
  one = evaluation.load_examples(dataset_dir, "test", RESOLUTION, 1, multi_turn=True)
  assert [e["example_id"] for e in one] == SESSION_IDS[:2]  # a whole session, not 1 turn
  assert len(evaluation.load_examples(dataset_dir, "test", RESOLUTION, 2)) == 2
  assert evaluation.session_order(["9-2", "10-1", "9-1", "9-3"]) == [[2, 0, 3], [1]]
  assert evaluation.final_turn_indices(["9-2", "10-1", "9-1"]) == [0, 1]
  with pytest.raises(ValueError, match=r"session '9' has turns \[1, 3\].*missing: \[2\]"):
    evaluation.session_order(["9-1", "9-3"])
  with pytest.raises(ValueError, match=r"session '9' has turns \[0, 1\], but turns must be"):
    evaluation.session_order(["9-0", "9-1"])
  with pytest.raises(ValueError, match="'9-1' occurs twice"):
    evaluation.session_order(["9-1", "9-1"])
  with pytest.raises(ValueError, match="max_examples=0"):
    evaluation.load_examples(dataset_dir, "test", RESOLUTION, 0, multi_turn=True)
  broken = loader.find_dataset_dir(folders["broken_data"], "magicbrush")
  assert len(evaluation.load_examples(broken, "train", RESOLUTION)) == 2  # single-turn is fine
  with pytest.raises(ValueError, match=r"session '400' has turns \[2\]"):
    evaluation.load_examples(broken, "train", RESOLUTION, multi_turn=True)


def test_metric_models_and_per_example_scores(folders, multi_turn, examples):
  """``magicbrush_per_example`` on the saved edits gives the report's numbers; DINO's resize
  scales with the ViT's image size."""
  models = evaluation.load_magicbrush_models(folders["clip"], folders["dino"])
  assert models.dino_resize == 37 == image_metrics.dino_resize_for(32)
  assert image_metrics.dino_resize_for(224) == 256
  report, _, prefix = multi_turn
  model = next(iter(report["models"]))
  every = report["models"][model]["all_turns"]
  edits = [_saved_edit(prefix, report, model, i) for i in every["example_ids"]]
  got = evaluation.magicbrush_per_example([examples[i] for i in every["example_ids"]], edits,
                                          models, load_clip_tokenizer(), batch_size=2)
  for key in METRICS:
    np.testing.assert_allclose(got[key], every["per_example"][key], atol=1e-5, err_msg=key)


def test_workdir_run_matches_its_starting_pipeline(tiny_run, folders, multi_turn):
  """--workdir on the tiny RL run (whose starting editor is the same seeded tiny pipeline):
  the starting editor's row reproduces the --pretrained evaluation."""
  workdir, _ = tiny_run
  prefix = folders["root"] / "out" / "workdir"
  done = run_cli("launch.evaluate", f"--workdir={workdir}", *_model_flags(folders),
                 "--setting=multi_turn", "--compare_no_rl", f"--output={prefix}",
                 *SAMPLER_FLAGS, tmp=folders["root"])
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads((prefix.parent / "workdir.json").read_text())
  assert report["rl_epoch"] == 0 and report["num_examples"] == 2
  assert list(report["models"]) == ["no RL (starting editor)", "RL epoch 0"]
  assert report["example_ids"] == ["300-2", "301-1"]
  for entry in report["models"].values():
    _check_metric_values(entry["summary"], entry["per_example"], 2)
  pretrained = next(iter(multi_turn[0]["models"].values()))["per_example"]
  for key in METRICS:
    np.testing.assert_allclose(report["models"]["no RL (starting editor)"]["per_example"][key],
                               pretrained[key], atol=1e-5, err_msg=key)
  table = (prefix.parent / "workdir.md").read_text()
  assert "| no RL (starting editor) |" in table and "| RL epoch 0 |" in table


def test_bad_inputs_name_the_problem_and_the_fix(folders):
  base = [f"--pretrained={folders['ip2p']}", f"--clip_model={folders['clip']}", *SAMPLER_FLAGS]
  swapped = run_cli("launch.evaluate", "--dataset=magicbrush", f"--data_dir={folders['data']}",
                    f"--dino_model={folders['clip']}", "--split=test", *base,
                    tmp=folders["root"])
  assert swapped.returncode == 2
  assert "--dino_model=" in swapped.stderr and "facebook/dino-vits16" in swapped.stderr
  assert "model_type='clip'" in swapped.stderr
  no_data = run_cli("launch.evaluate", "--dataset=magicbrush", f"--data_dir={folders['ip2p']}",
                    f"--dino_model={folders['dino']}", *base, tmp=folders["root"])
  assert no_data.returncode == 2 and "No prepared 'magicbrush'" in no_data.stderr
  assert "--magicbrush_dir=" in no_data.stderr
  no_test = run_cli("launch.evaluate", "--dataset=magicbrush",
                    f"--data_dir={folders['broken_data']}", f"--dino_model={folders['dino']}",
                    "--split=test", *base, tmp=folders["root"])
  assert no_test.returncode == 2 and "Split 'test' not in" in no_test.stderr
  assert "['train']" in no_test.stderr and "--split=validation" in no_test.stderr
  broken = run_cli("launch.evaluate", "--dataset=magicbrush",
                   f"--data_dir={folders['broken_data']}", f"--dino_model={folders['dino']}",
                   "--split=train", "--setting=multi_turn", *base, tmp=folders["root"])
  assert broken.returncode == 2 and "session '400' has turns [2]" in broken.stderr
  assert "--setting=single_turn" in broken.stderr and "Traceback" not in broken.stderr
