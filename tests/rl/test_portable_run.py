"""Portable run folders: config.json records where the stages, data and base model are, so a
copied run folder loads from its new place; a missing stage is named with where it was sought."""

import json
import shutil

import pytest

from configs import shapes
from rl4pix_jax.rl import run_loading
from rl4pix_jax.workdir import layout, stages
from tests.helpers.paths import REPO_ROOT


def test_recorded_paths_are_relative_inside_the_run_and_absolute_outside(tmp_path):
  run = tmp_path / "exp" / "rl"
  (run / "base").mkdir(parents=True)
  config = shapes.get_config()
  config.model.pretrained = str(run / "base")  # a local folder inside the run
  config.reward.clip_model = "openai/clip-vit-large-patch14"  # a hub id: kept as is
  recorded = layout.portable_run_config(config, str(run))
  assert recorded.model.pretrained == "./base"
  assert recorded.model.stages_dir == str(tmp_path / "exp")  # the run folder's parent
  assert recorded.data.data_dir == str(tmp_path / "exp" / "data")
  assert recorded.reward.clip_model == "openai/clip-vit-large-patch14"
  assert config.model.stages_dir == ""  # the run's own config is not changed
  moved = layout.resolve_run_config(recorded, str(tmp_path / "elsewhere" / "copy"))
  assert moved.model.pretrained == str(tmp_path / "elsewhere" / "copy" / "base")
  assert moved.model.stages_dir == str(tmp_path / "exp")
  # gs:// run folders: the parent is the bucket folder, not a local path named 'gs:'.
  on_gcs = layout.portable_run_config(shapes.get_config(), "gs://bucket/exp/rl")
  assert on_gcs.model.stages_dir == "gs://bucket/exp"
  assert on_gcs.data.data_dir == "gs://bucket/exp/data"
  assert layout.resolved_path("./base", "gs://bucket/other") == "gs://bucket/other/base"


def _write_run(config, workdir):
  """config.json as trainer.train writes it (layout.portable_run_config), no checkpoint yet."""
  workdir.mkdir(parents=True)
  (workdir / layout.RUN_CONFIG_FILE).write_text(
      layout.portable_run_config(config, str(workdir)).to_json_best_effort(indent=2))


def test_a_copied_stage_based_run_loads_and_a_missing_stage_names_where(tmp_path):
  experiment = tmp_path / "exp"
  for stage in layout.STAGES:  # the shipped supervised stages, as launch.run_default installs
    shutil.copytree(f"{REPO_ROOT}/{layout.SHIPPED_EDITOR_DIR}/{stage}", experiment / stage)
  _write_run(shapes.get_config(), experiment / "rl")
  copy = tmp_path / "elsewhere" / "copy"
  shutil.copytree(experiment / "rl", copy)
  assert json.loads((copy / "config.json").read_text())["model"]["stages_dir"] == str(experiment)
  run = run_loading.load_run(str(copy))  # no RL checkpoint: the supervised editor
  assert run.epoch is None and run.config.model.stages_dir == str(experiment)

  shutil.move(experiment / "unet", tmp_path / "unet_moved_away")
  with pytest.raises(stages.StageNotFoundError) as e:
    run_loading.load_run(str(copy))
  message = str(e.value)
  assert f"{experiment / 'unet'}" in message and "no unet checkpoint" in message
  assert "model_config.json" in message and "model.stages_dir" in message
  assert "launch.pretrain" not in message  # not advice to train from scratch


@pytest.mark.parametrize("chunk, kind", [(None, "xla"), (256, "chunked")])
def test_a_run_saved_before_the_attention_setting_loads_with_the_path_it_ran(tmp_path, chunk,
                                                                             kind):
  """config.json of a run from before ``model.attention`` (it had attention_query_chunk)."""
  from rl4pix_jax import pipeline  # pylint: disable=import-outside-toplevel
  saved = shapes.get_config().to_dict()
  for key in ("attention", "attention_flash_min_tokens", "attention_chunk_queries",
              "attention_flash_block"):
    del saved["model"][key]
  saved["model"]["attention_query_chunk"] = chunk
  (tmp_path / "config.json").write_text(json.dumps(saved), encoding="utf-8")
  config = run_loading.read_run_config(str(tmp_path))
  assert "attention_query_chunk" not in config.model
  attention = pipeline.attention_config(config)
  assert (attention.kind, attention.chunk_queries) == (kind, chunk)
  current = shapes.get_config()
  assert run_loading.upgrade_attention_keys(current).model.attention == "auto"  # unchanged
