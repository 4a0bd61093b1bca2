"""The RL loop: outputs, batch arithmetic, exact resume after SIGKILL, SIGTERM stop."""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl4pix_jax.data import loader
from rl4pix_jax.rewards import RewardInputs, make_reward_fn
from rl4pix_jax.rl import batching, compiled, ppo
from rl4pix_jax.rl import trainer, validation
from rl4pix_jax.workdir import checkpointer as checkpointing
from tests.helpers import rl_fixtures, wandb_files
from tests.helpers.paths import REPO_ROOT

ROOT = REPO_ROOT
HAS_WANDB = importlib.util.find_spec("wandb") is not None
TIMING_KEYS = ("epoch_time_s", "samples_per_s", "val_time_s")


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in f if line.strip()]


def _final_state(workdir, setup, config):
  state, _ = ppo.init_train_state(jax.random.PRNGKey(0), setup.params.unet, config.ppo)
  ckpt = checkpointing.RunCheckpointer(os.path.join(workdir, "checkpoints"))
  restored, host = ckpt.restore(state)
  ckpt.close()
  return restored, host


def _subprocess(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1")
  return subprocess.run([sys.executable, "-m", "tests.helpers.rl_fixtures", *map(str, args)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module", autouse=True)
def offline_wandb(tmp_path_factory):
  """W&B (on in straight_run when installed) offline: no network."""
  with pytest.MonkeyPatch.context() as patch:
    wandb_files.set_offline(patch, tmp_path_factory.mktemp("wandb_home"))
    yield


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """4 epochs, validated at the start and after epochs 1 and 3 (rl_fixtures.VALIDATED); logged
  to W&B (offline) too when wandb is installed."""
  from rl4pix_jax import editing  # pylint: disable=import-outside-toplevel
  workdir = str(tmp_path_factory.mktemp("straight"))
  config = rl_fixtures.tiny_rl_config(**rl_fixtures.VALIDATED, **{"logging.wandb": HAS_WANDB})
  setup = rl_fixtures.tiny_rl_setup()
  compiled_before = editing.edit_batch._cache_size()  # pylint: disable=protected-access
  history = trainer.train(config, workdir, setup,
                          rl_fixtures.tiny_data_iterator(config, setup.tokenizer),
                          validation_examples=rl_fixtures.tiny_validation_examples())
  compiled = editing.edit_batch._cache_size() - compiled_before  # pylint: disable=protected-access
  return workdir, config, setup, history, compiled


def _epochs(rows):
  return [r["epoch"] for r in rows if "reward_mean" in r]


def test_run_writes_metrics_checkpoints_and_pictures(straight_run):
  workdir, config, _, history, _ = straight_run
  assert [h["epoch"] for h in history] == [-1, 0, 1, 2, 3]  # -1: the starting policy's pass
  history = history[1:]
  for key in ("reward_mean", "reward_std", "reward_attention", "reward_clip", "loss",
              "approx_kl", "clipfrac", "grad_norm", "samples_per_s"):
    assert all(np.isfinite(h[key]) for h in history), key
  assert history[-1]["optimizer_steps"] == 4 * 2  # 2 minibatches per epoch
  ckpt = checkpointing.RunCheckpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.all_epochs() == [1, 2, 3]  # keep_checkpoints = 3
  ckpt.close()
  for name in ("config.json", "reward_curve.png", "validation_curve.png", "samples/epoch_0000.png",
               "samples/epoch_0002.png", "samples/epoch_0003.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  saved = json.load(open(os.path.join(workdir, "config.json"), encoding="utf-8"))
  assert saved["ppo"]["clip_range"] == config.ppo.clip_range


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (optional: pip install -r "
                    "requirements-demo.txt)")
def test_wandb_offline_run_holds_every_metric_and_picture(straight_run):
  """config.logging.wandb: every metrics.jsonl value, the sample grids and both curves."""
  workdir, _, _, history, _ = straight_run
  (run,) = wandb_files.offline_runs(workdir)
  assert run.endswith("-" + json.load(open(os.path.join(workdir, "wandb_run.json"),
                                            encoding="utf-8"))["id"])
  rows = wandb_files.read_history(wandb_files.run_file(run))
  wandb_files.assert_logged(history, rows)
  assert [r["epoch"] for r in wandb_files.images(rows, "samples")] == [0, 2, 3]
  for name in ("samples", "reward_curve", "validation_curve"):
    image = wandb_files.images(rows, name)[-1]
    assert os.path.getsize(os.path.join(run, "files", image[f"{name}/path"])) > 0, name


def test_resume_after_sigkill_equals_straight_run(straight_run, tmp_path):
  """With validation on: the passes neither draw from nor move the training RNG or data
  iterator, and the best checkpoint and its record survive the kill."""
  workdir, config, setup, _, _ = straight_run
  killed = str(tmp_path / "killed")
  result = _subprocess(killed, 4, "kill@2")  # dies after epoch 2's work, before its checkpoint
  assert result.returncode == -9, result.stderr[-2000:]
  assert [m["epoch"] for m in _metrics(killed)] == [-1, 0, 1, 2]
  assert validation.best_epochs(killed) == [1]  # saved after epoch 1's pass, before the kill
  trainer.train(config, killed, setup, rl_fixtures.tiny_data_iterator(config, setup.tokenizer),
                validation_examples=rl_fixtures.tiny_validation_examples())
  assert _metrics(killed) == _metrics(workdir)
  assert validation.best_epochs(killed) == validation.best_epochs(workdir)
  resumed_state, resumed_host = _final_state(killed, setup, config)
  straight_state, straight_host = _final_state(workdir, setup, config)
  same = jax.tree_util.tree_map(np.array_equal, resumed_state, straight_state)
  assert all(jax.tree_util.tree_leaves(same)), "resumed params differ from the straight run"
  assert resumed_host == straight_host


def test_validation_equals_an_evaluation_of_each_validated_policy(straight_run):
  """Each pass's val_* equals evaluation.scoring on the same examples and sampler settings with
  the policy that launch.evaluate --step=<epoch> restores (the starting UNet for epoch -1),
  and one compiled editing function served all three passes."""
  from rl4pix_jax import editing, pipeline  # pylint: disable=import-outside-toplevel
  from rl4pix_jax.evaluation import scoring  # pylint: disable=import-outside-toplevel
  from rl4pix_jax.metrics import shapes_metrics  # pylint: disable=import-outside-toplevel
  from rl4pix_jax.rl import train_state  # pylint: disable=import-outside-toplevel
  workdir, config, setup, history, compiled = straight_run
  assert compiled <= 1
  rows = validation.validation_rows(history)
  assert [r["epoch"] for r in rows] == [-1, 1, 3]
  assert [r["val_samples_seen"] for r in rows] == [0, 8, 16]  # 4 samples per epoch
  examples = rl_fixtures.tiny_validation_examples()
  settings = scoring.SamplerSettings(
      num_steps=config.sampler.num_steps, guidance_scale=config.sampler.guidance_scale,
      image_guidance_scale=config.sampler.image_guidance_scale, eta=0.0, seed=0)
  score = functools.partial(scoring.shapes_per_example, tokenizer=setup.tokenizer,
                            clip_text=setup.clip_text_model, clip_vision=setup.clip_vision_model,
                            clip_params=setup.clip_params)
  keys = list(shapes_metrics.SHAPES_METRICS)
  for row in (rows[0], rows[-1]):
    unet = (setup.params.unet if row["epoch"] == -1 else
            train_state.restore_policy(config, workdir, setup.params.unet, row["epoch"])[0])
    editor = editing.Editor(
        setup.models, pipeline.EditorParams(unet=unet, vae=setup.params.vae,
                                            text_encoder=setup.params.text_encoder),
        setup.tokenizer, max_object_tokens=config.data.max_object_tokens,
        capture_size=config.sampler.capture_size, resolution=config.resolution)
    result = scoring.evaluate("check", editor, examples, settings, score, keys)
    assert row["val_examples"] == len(examples)
    for key in keys:
      values = np.asarray(result.per_example[key], np.float64)
      values = values[np.isfinite(values)]  # as intervals.summarise averages them
      expected = float(values.mean()) if values.size else float("nan")
      if key in ("success", "edit_ok", "preserved_ok"):  # 0/1 outcomes of the shapes check
        assert row[f"val_{key}"] == expected, (row["epoch"], key)
      else:  # float32 metrics of the same pixels: equal up to rounding of the summary
        np.testing.assert_allclose(row[f"val_{key}"], expected, rtol=1e-5, atol=1e-6,
                                   equal_nan=True, err_msg=f"epoch {row['epoch']} {key}")


def test_best_checkpoint_is_the_first_highest_validation_success(straight_run):
  workdir, config, setup, history, _ = straight_run
  rows = validation.validation_rows(history)
  start, validated = rows[0], rows[1:]
  values = [r["val_success"] for r in validated]
  best_epoch = validated[int(np.argmax(values))]["epoch"]  # argmax: the first of equal maxima
  assert validation.best_epochs(workdir) == [best_epoch]
  state, _ = ppo.init_train_state(jax.random.PRNGKey(0), setup.params.unet, config.ppo)
  best = checkpointing.RunCheckpointer(os.path.join(workdir, "checkpoints_best"))
  best_state, best_host = best.restore(state)
  best.close()
  assert best_host["epoch"] == best_epoch
  assert best_host["validation"] == {"metric": "success", "epoch": best_epoch,
                                     "value": max(values), "start": start["val_success"]}
  _, final_host = _final_state(workdir, setup, config)
  assert final_host["validation"] == best_host["validation"]  # every later checkpoint has it
  regular = checkpointing.RunCheckpointer(os.path.join(workdir, "checkpoints"))
  regular_state, _ = regular.restore(state, best_epoch)
  regular.close()
  same = jax.tree_util.tree_map(np.array_equal, best_state, regular_state)
  assert all(jax.tree_util.tree_leaves(same))


def test_best_keeps_the_earlier_epoch_on_ties_and_round_trips():
  best = validation.Best(metric="success")
  assert best.update(1, 0.25) and not best.update(3, 0.25)  # a tie keeps epoch 1
  assert not best.update(4, float("nan")) and not best.update(5, 0.2)
  assert best.update(7, 0.5) and (best.epoch, best.value) == (7, 0.5)
  restored = validation.Best.from_host({"validation": best.state_dict()}, "success")
  assert restored == best
  assert validation.Best.from_host({"epoch": 2}, "success") == validation.Best("success")


def test_sigterm_checkpoints_and_stops(tmp_path):
  workdir = str(tmp_path / "term")
  result = _subprocess(workdir, 4, "term@0")
  assert result.returncode == 0, result.stderr[-2000:]
  assert _epochs(_metrics(workdir)) == [0]
  ckpt = checkpointing.RunCheckpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.all_epochs() == [0]
  ckpt.close()


def test_inconsistent_batch_sizes_are_named():
  config = rl_fixtures.tiny_rl_config(**{"train.train_batch_size": 3})
  with pytest.raises(trainer.TrainingError, match=r"4 is not divisible by train.train_batch"):
    batching.batch_arithmetic(config, 1, 1)
  config = rl_fixtures.tiny_rl_config()
  with pytest.raises(trainer.TrainingError, match="8 devices"):
    batching.batch_arithmetic(config, 8, 1)
  sizes = batching.batch_arithmetic(config, 2, 1)
  assert sizes.updates_per_epoch == 2 and sizes.samples_per_epoch == 4
  assert "2 optimizer updates per epoch" in sizes.describe()


def test_samples_per_prompt_arithmetic_and_repeats():
  config = rl_fixtures.tiny_rl_config(**{"train.samples_per_prompt": 3})
  with pytest.raises(trainer.TrainingError, match=r"sample_batch_size=4 is not divisible by "
                     r"train.samples_per_prompt=3"):
    batching.batch_arithmetic(config, 1, 1)
  config = rl_fixtures.tiny_rl_config(**{"train.samples_per_prompt": 2})
  sizes = batching.batch_arithmetic(config, 1, 1)
  assert sizes.samples_per_prompt == 2 and "2 sample(s) per prompt" in sizes.describe()
  with pytest.raises(trainer.TrainingError, match="2 processes"):
    batching.batch_arithmetic(rl_fixtures.tiny_rl_config(**{"train.samples_per_prompt": 4}), 1, 2)
  batch = loader.EditBatch({"example_index": np.array([7, 9]),
                            "source": np.arange(2 * 3).reshape(2, 3)},
                           {"instruction": ["a", "b"]})
  repeated = batching.repeat_prompts(batch, 3)
  np.testing.assert_array_equal(repeated.arrays["example_index"], [7, 7, 7, 9, 9, 9])
  np.testing.assert_array_equal(repeated.arrays["source"][3:], np.tile([[3, 4, 5]], (3, 1)))
  assert repeated.texts["instruction"] == ["a", "a", "a", "b", "b", "b"]
  assert batching.repeat_prompts(batch, 1) is batch


def test_reward_map_gradient_matches_finite_differences():
  """reward_with_map_gradient's cotangent is d(sum of rewards)/d(maps): checked along a
  random direction with a central difference of the real attention reward."""
  config = rl_fixtures.tiny_rl_config(**{"reward.clip_weight": 0.0,
                                         "reward.attention_weight": 2.0})
  fn = make_reward_fn(config.reward, None, None)
  rng = np.random.default_rng(0)
  maps = jnp.asarray(rng.uniform(0.1, 1.0, (3, 4, 8, 8)), jnp.float32)
  mask = jnp.asarray((rng.uniform(size=(3, 32, 32)) > 0.6).astype(np.float32))
  inputs = RewardInputs(attention_maps=maps, mask=mask)
  reward, parts, gradient = compiled.reward_with_map_gradient(fn)(None, inputs)
  np.testing.assert_allclose(reward, fn(None, inputs)[0], rtol=1e-6)
  assert gradient.shape == maps.shape and set(parts) == {"attention"}
  direction = jnp.asarray(rng.standard_normal(maps.shape), jnp.float32)
  eps = 1e-3
  total = lambda m: float(jnp.sum(fn(None, inputs.replace(attention_maps=m))[0]))
  numeric = (total(maps + eps * direction) - total(maps - eps * direction)) / (2 * eps)
  np.testing.assert_allclose(float(jnp.sum(gradient * direction)), numeric, rtol=2e-2)


def test_pathwise_run_and_inactive_without_attention_reward(tmp_path):
  config = rl_fixtures.tiny_rl_config(**{"ppo.attention_pathwise_weight": 1.0,
                                         "train.num_epochs": 1})
  setup = rl_fixtures.tiny_rl_setup()
  history = trainer.train(config, str(tmp_path / "run"), setup,
                          rl_fixtures.tiny_data_iterator(config, setup.tokenizer))
  assert len(history) == 1 and np.isfinite(history[0]["grad_norm"])
  assert history[0]["grad_norm"] > 0
  # A CLIP-only ablation keeps the default's pathwise weight: it is inactive, not an error.
  config.reward.attention_weight = 0.0
  history = trainer.train(config, str(tmp_path / "clip_only"), setup,
                          rl_fixtures.tiny_data_iterator(config, setup.tokenizer))
  assert len(history) == 1 and "reward_attention" not in history[0]


def test_reference_region_run(tmp_path):
  """attention_region='reference': the initial UNet's maps are the target region."""
  config = rl_fixtures.tiny_rl_config(**{"reward.attention_region": "reference",
                                         "train.num_epochs": 1})
  setup = rl_fixtures.tiny_rl_setup()
  history = trainer.train(config, str(tmp_path / "run"), setup,
                          rl_fixtures.tiny_data_iterator(config, setup.tokenizer))
  assert len(history) == 1 and np.isfinite(history[0]["reward_attention"])
  assert np.isfinite(history[0]["grad_norm"]) and history[0]["grad_norm"] > 0


def test_nft_objective_run_trains_the_lora_policy(tmp_path):
  """ppo.objective='nft' through the loop: LoRA policy, group advantages, KL to the start; the
  default's pathwise weight is inactive (not an error), and the metrics are NFT's."""
  config = rl_fixtures.tiny_rl_config(**{"ppo.objective": "nft", "ppo.kl_weight": 0.1,
                                         "ppo.advantage_mode": "group",
                                         "train.samples_per_prompt": 2, "train.num_epochs": 2})
  setup = rl_fixtures.tiny_rl_setup()
  history = trainer.train(config, str(tmp_path / "run"), setup,
                          rl_fixtures.tiny_data_iterator(config, setup.tokenizer))
  assert [h["epoch"] for h in history] == [0, 1]
  assert {"positive_fraction", "approx_kl", "kl", "loss"} <= set(history[0])
  assert "clipfrac" not in history[0]
  assert all(np.isfinite(h["grad_norm"]) and h["grad_norm"] > 0 for h in history)
  # Epoch 0's updates leave the start: epoch 1 sees a KL to it, epoch 0 started at 0.
  assert history[1]["kl"] > 0 and history[1]["optimizer_steps"] == 4
