"""launch.evaluate on a tiny run (shapes), and the evaluation loop's parts (MagicBrush too)."""

import json

import numpy as np
from PIL import Image
import pytest
import transformers

from rl4pix_jax import editing, evaluation
from rl4pix_jax.metrics import image_metrics, intervals, shapes_metrics
from rl4pix_jax.models import clip, vit
from rl4pix_jax.tokenizer import load_clip_tokenizer
from rl4pix_jax.weights import transformers_clip, transformers_vit
from tests.helpers import tiny_models
from tests.launch.test_cli_edit import run_cli, tiny_run  # pylint: disable=unused-import

pytest.importorskip("torch")


def test_evaluate_cli_compares_rl_and_starting_editor_on_the_same_examples(tiny_run, tmp_path):
  workdir, _ = tiny_run
  prefix = tmp_path / "eval" / "shapes"
  done = run_cli("launch.evaluate", f"--workdir={workdir}", "--dataset=shapes_edit",
                 "--split=test", "--max_examples=2", "--steps=2", "--compare_no_rl",
                 f"--output={prefix}", tmp=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads((tmp_path / "eval" / "shapes.json").read_text())
  assert report["num_examples"] == 2 and report["rl_epoch"] == 0
  assert list(report["models"]) == ["no RL (starting editor)", "RL epoch 0"]
  for model in report["models"].values():
    assert set(model["per_example"]) == set(shapes_metrics.SHAPES_METRICS)
    assert all(len(v) == 2 for v in model["per_example"].values())
    assert 0.0 <= model["summary"]["l1_outside"]["mean"] <= 2.0
  table = (tmp_path / "eval" / "shapes.md").read_text()
  assert table.count("\n| ") == 3 and "attention_mass_inside" in table  # header + 2 rows
  assert (tmp_path / "eval" / "shapes_0.png").exists()
  assert (tmp_path / "eval" / "shapes_1.png").exists()


def test_evaluate_step_best_reproduces_the_runs_validation(tiny_run, tmp_path):
  """launch.evaluate --step=best on the run's validation subset and settings reports what the
  run logged for that epoch (the same code scores both)."""
  workdir, _ = tiny_run
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l]
  logged = {l["epoch"]: l for l in lines if "val_samples_seen" in l}
  assert sorted(logged) == [-1, 0] and (workdir / "validation_curve.png").exists()
  prefix = tmp_path / "best"
  done = run_cli("launch.evaluate", f"--workdir={workdir}", "--step=best", "--split=validation",
                 "--max_examples=2", f"--output={prefix}", tmp=tmp_path)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads((tmp_path / "best.json").read_text())
  assert report["rl_epoch"] == 0 and list(report["models"]) == ["RL epoch 0 (best validation)"]
  summary = report["models"]["RL epoch 0 (best validation)"]["summary"]
  for key in shapes_metrics.SHAPES_METRICS:
    if summary[key]["mean"] is None:
      assert not np.isfinite(logged[0][f"val_{key}"]), key
    elif key in ("success", "edit_ok", "preserved_ok"):
      assert summary[key]["mean"] == logged[0][f"val_{key}"], key
    else:  # float32 metrics of the same pixels, summarised in another process
      np.testing.assert_allclose(summary[key]["mean"], logged[0][f"val_{key}"], rtol=1e-5,
                                 atol=1e-6, err_msg=key)


def test_evaluate_cli_bad_flags(tiny_run, tmp_path):
  workdir, _ = tiny_run
  done = run_cli("launch.evaluate", f"--workdir={workdir}", "--dataset=magicbrush",
                 tmp=tmp_path)
  assert done.returncode == 2 and "--clip_model" in done.stderr and "--dino_model" in done.stderr
  done = run_cli("launch.evaluate", f"--workdir={tmp_path}", tmp=tmp_path)
  assert done.returncode == 2 and "config.json" in done.stderr


class ShiftEditor:
  """A stand-in editor: adds 10 to every pixel and records its calls."""

  def __init__(self):
    self.calls = []

  def edit(self, images, instructions, *, seed, object_phrases=None, **_):
    self.calls.append((seed, list(instructions), object_phrases))
    out = [np.clip(np.asarray(im, np.int32) + 10, 0, 255).astype(np.uint8) for im in images]
    return editing.EditResult(out, [None] * len(out))


def _examples(ids):
  return [dict(example_id=i, source=np.full((4, 4, 3), 100, np.uint8), instruction=f"do {i}",
               object_phrase="", target=np.zeros((4, 4, 3), np.uint8)) for i in ids]


def test_multi_turn_edits_the_previous_output():
  examples = _examples(["x-1", "y-1", "x-2", "x-3"])
  editor = ShiftEditor()
  settings = evaluation.SamplerSettings(seed=4)
  edited, maps, inputs = evaluation.edit_examples(editor, examples, settings, multi_turn=True)
  assert [int(e[0, 0, 0]) for e in edited] == [110, 110, 120, 130]
  assert [int(e[0, 0, 0]) for e in inputs] == [100, 100, 110, 120]
  assert inputs[2] is edited[0] and inputs[3] is edited[2]
  assert maps == [None] * 4
  assert [c[0] for c in editor.calls] == [5, 6, 7]  # seed + turn
  assert editor.calls[0][1] == ["do x-1", "do y-1"]
  single = ShiftEditor()
  edited, _, _ = evaluation.edit_examples(single, examples, settings)
  assert [int(e[0, 0, 0]) for e in edited] == [110] * 4 and len(single.calls) == 1
  assert single.calls[0][2] is None  # no phrases -> no attention recorded


def test_turn_key():
  assert evaluation.turn_key("12345-3") == ("12345", 3)
  assert evaluation.turn_key("shapes_7") == ("shapes_7", 1)


def test_reports_and_table(tmp_path):
  examples = _examples(["a-1", "b-1"])
  per_example = {"l1": np.array([0.1, 0.3], np.float32)}
  summary, row = intervals.metrics_report(per_example, "model", ["l1"], seed=0)
  result = evaluation.EvaluationResult(
      name="model", example_ids=["a-1", "b-1"], per_example=per_example, summary=summary,
      row=row, edited=[e["source"] for e in examples],
      attention_maps=[np.ones((2, 2), np.float32), None])
  paths = evaluation.write_reports([result], examples, ["l1"], str(tmp_path / "r"),
                                   {"dataset": "magicbrush", "split": "test"},
                                   image_metrics.reference_markdown_rows(["l1"]))
  table = open(paths["markdown"], encoding="utf-8").read()
  assert "| model | 0.2000 [" in table and "InstructPix2Pix (paper) | 0.1122 |" in table
  report = json.load(open(paths["json"], encoding="utf-8"))
  assert report["models"]["model"]["per_example"]["l1"] == pytest.approx([0.1, 0.3])
  assert report["example_ids"] == ["a-1", "b-1"]
  assert "comparison" not in paths  # one model: no comparison figure


def test_comparison_figure_has_a_column_pair_per_model(tmp_path):
  examples = _examples(["a-1", "b-1"])
  results = []
  for name, shade in (("supervised", 0), ("RL", 255)):
    per_example = {"l1": np.array([0.1, 0.3], np.float32)}
    summary, row = intervals.metrics_report(per_example, name, ["l1"], seed=0)
    results.append(evaluation.EvaluationResult(
        name=name, example_ids=["a-1", "b-1"], per_example=per_example, summary=summary,
        row=row, edited=[np.full_like(e["source"], shade) for e in examples],
        attention_maps=[np.ones((2, 2), np.float32), None]))
  paths = evaluation.write_reports(results, examples, ["l1"], str(tmp_path / "r"),
                                   {"dataset": "shapes_edit", "split": "test"})
  both = Image.open(paths["comparison"])
  assert both.size[0] >= 6 * 96  # input | (edit, attention) per model | target, 96-px cells
  pixels = np.asarray(both.convert("RGB"))
  assert (pixels == 0).all(axis=-1).any() and (pixels == 255).all(axis=-1).any()


def test_magicbrush_per_example_matches_numpy(tmp_path):
  tiny_models.save_tiny_clip_model(str(tmp_path / "clip"))
  kw = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
  transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, **kw)
                        ).save_pretrained(str(tmp_path / "vit"))
  loaded = transformers_clip.load_clip(str(tmp_path / "clip"))
  vit_config, vit_params = transformers_vit.load_vit(str(tmp_path / "vit"))
  models = image_metrics.EvaluationModels(
      clip_text_params=loaded.text_params, clip_vision_params=loaded.vision_params,
      dino_params=vit_params, clip_text=clip.CLIPTextModel(loaded.text_config),
      clip_vision=clip.CLIPVisionModel(loaded.vision_config), dino=vit.ViTModel(vit_config),
      dino_resize=36)
  rng = np.random.default_rng(0)
  examples = [dict(target=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                   target_caption=c) for c in ("a red circle", "a blue square", "two stars")]
  edited = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in examples]
  edited[2] = examples[2]["target"]
  got = evaluation.magicbrush_per_example(examples, edited, models, load_clip_tokenizer(),
                                          batch_size=2)
  diff = np.stack(edited).astype(np.float64) / 255 - np.stack(
      [e["target"] for e in examples]).astype(np.float64) / 255
  np.testing.assert_allclose(got["l1"], np.abs(diff).mean(axis=(1, 2, 3)), atol=1e-6)
  np.testing.assert_allclose(got["l2"], (diff ** 2).mean(axis=(1, 2, 3)), atol=1e-6)
  np.testing.assert_allclose([got["clip_i"][2], got["dino"][2]], [1.0, 1.0], atol=1e-5)
  assert got["clip_t"][2] == pytest.approx(got["clip_t_oracle"][2], abs=1e-5)
  assert np.all(np.abs(got["clip_i"]) <= 1 + 1e-6)
