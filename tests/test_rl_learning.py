"""The RL learns: from the shipped supervised editor, PPO raises the attention reward.

Two runs of the default RL config on the same 4 training edits (each sampled 4 times per epoch,
so the advantages are per prompt) with the same seed: the policy run and a control with
learning rate 0. Both draw the same data order and the same sampling
noise every epoch, so the control is exactly what the reward would have been without learning,
and the difference between the two runs is the RL's doing.
"""

import numpy as np
import pytest

from configs import shapes as shapes_config
from rl4pix_jax import run_setup, trainer
from rl4pix_jax.pretrain import shipped

EPOCHS = 6
LEARNING_RATE = 1e-2  # a handful of epochs instead of the default's 20: larger steps


def learning_config(data_dir: str, learning_rate: float):
  config = shapes_config.get_config("rl")
  config.model.stages_dir = shipped.SHIPPED_DIR
  config.data.data_dir = data_dir
  config.data.train_size, config.data.validation_size, config.data.test_size = 4, 2, 2
  config.data.num_threads = 1
  config.reward.clip_weight = 0.0  # the attention reward alone
  config.train.num_epochs = EPOCHS
  config.train.sample_batch_size = 16
  config.train.samples_per_prompt = 4
  config.train.num_sample_batches = 1
  config.train.train_batch_size = 8
  config.train.checkpoint_every = EPOCHS
  config.train.image_every = 10 * EPOCHS
  config.ppo.learning_rate = learning_rate
  return config


@pytest.fixture(scope="module")
def reward_curves(tmp_path_factory):
  root = tmp_path_factory.mktemp("learning")
  curves = {}
  for name, learning_rate in (("rl", LEARNING_RATE), ("control", 0.0)):
    config = learning_config(str(root / "data"), learning_rate)
    workdir = str(root / name)
    setup = run_setup.rl_setup_from_config(config, workdir)
    iterator = run_setup.make_train_iterator(config, workdir, setup.tokenizer)
    metrics = trainer.train(config, workdir, setup, iterator)
    curves[name] = np.asarray([m["reward_attention"] for m in metrics])
  return curves


def test_attention_reward_rises_over_the_control(reward_curves):
  rl, control = reward_curves["rl"], reward_curves["control"]
  assert rl.shape == control.shape == (EPOCHS,)
  # Epoch 0 samples from the initial policy in both runs: identical rewards.
  np.testing.assert_allclose(rl[0], control[0], rtol=1e-5)
  gain = rl[-2:].mean() - control[-2:].mean()
  spread = np.std(control)  # how much the reward moves by sampling alone
  assert gain > 2 * spread and gain > 0, (rl, control)
  assert rl[-2:].mean() > rl[:2].mean(), rl

