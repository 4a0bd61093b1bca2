"""The RL loop: outputs, batch arithmetic, exact resume after SIGKILL, SIGTERM stop."""

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
from rl4pix_jax.rl import trainer
from rl4pix_jax.workdir import checkpointer as checkpointing
from tests.helpers import rl_fixtures
from tests.helpers.paths import REPO_ROOT

ROOT = REPO_ROOT
TIMING_KEYS = ("epoch_time_s", "samples_per_s")


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


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  config = rl_fixtures.tiny_rl_config()
  setup = rl_fixtures.tiny_rl_setup()
  history = trainer.train(config, workdir, setup,
                          rl_fixtures.tiny_data_iterator(config, setup.tokenizer))
  return workdir, config, setup, history


def test_run_writes_metrics_checkpoints_and_pictures(straight_run):
  workdir, config, _, history = straight_run
  assert [h["epoch"] for h in history] == [0, 1, 2, 3]
  for key in ("reward_mean", "reward_std", "reward_attention", "reward_clip", "loss",
              "approx_kl", "clipfrac", "grad_norm", "samples_per_s"):
    assert all(np.isfinite(h[key]) for h in history), key
  assert history[-1]["optimizer_steps"] == 4 * 2  # 2 minibatches per epoch
  ckpt = checkpointing.RunCheckpointer(os.path.join(workdir, "checkpoints"))
  assert ckpt.all_epochs() == [1, 2, 3]  # keep_checkpoints = 3
  ckpt.close()
  for name in ("config.json", "reward_curve.png", "samples/epoch_0000.png",
               "samples/epoch_0002.png", "samples/epoch_0003.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  saved = json.load(open(os.path.join(workdir, "config.json"), encoding="utf-8"))
  assert saved["ppo"]["clip_range"] == config.ppo.clip_range


def test_resume_after_sigkill_equals_straight_run(straight_run, tmp_path):
  workdir, config, setup, _ = straight_run
  killed = str(tmp_path / "killed")
  result = _subprocess(killed, 4, "kill@2")  # dies after epoch 2's work, before its checkpoint
  assert result.returncode == -9, result.stderr[-2000:]
  assert [m["epoch"] for m in _metrics(killed)] == [0, 1, 2]
  trainer.train(config, killed, setup, rl_fixtures.tiny_data_iterator(config, setup.tokenizer))
  assert _metrics(killed) == _metrics(workdir)
  resumed_state, resumed_host = _final_state(killed, setup, config)
  straight_state, straight_host = _final_state(workdir, setup, config)
  same = jax.tree_util.tree_map(np.array_equal, resumed_state, straight_state)
  assert all(jax.tree_util.tree_leaves(same)), "resumed params differ from the straight run"
  assert resumed_host == straight_host


def test_sigterm_checkpoints_and_stops(tmp_path):
  workdir = str(tmp_path / "term")
  result = _subprocess(workdir, 4, "term@0")
  assert result.returncode == 0, result.stderr[-2000:]
  assert [m["epoch"] for m in _metrics(workdir)] == [0]
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
