"""The RL learns: from the shipped supervised editor, PPO raises a reward over a control.

Two runs of the default RL config on the same 4 training edits (each sampled 4 times per epoch,
so the advantages are per prompt) with the same seed: the policy run and a control with a
learning rate of 1e-12 (the PPO config rejects 0). Both draw the same data order and the same
sampling noise every epoch, so the control is what the reward would have been without
learning, and the difference between the two runs is the RL's doing. The margin: the gain
over the control (mean of the last two epochs) must exceed twice the control's standard
deviation over epochs, i.e. what sampling alone moves the reward by (0.002 for preservation,
0.021 for attention, measured), and the run must end above where it started.

The reward tested: the attention-map reward (KL(mask || map), the default's distance), which
reads maps that the UNet's weights produce directly, with ``ppo.attention_pathwise_weight`` = 1 (4 epochs;
measured over 8: -2.258 -> -0.687 against a control at -2.26 +- 0.02). Without the pathwise
term it did not rise (8 epochs ended 0.015 below the control; README, "Rewards"). The
``preservation`` reward (-mean |edit - source| outside the mask) is not tested here any more:
see the note above the test.
"""

import ml_collections
import numpy as np

from configs import shapes as shapes_config
from rl4pix_jax.rl import run_setup
from rl4pix_jax.rl import trainer
from rl4pix_jax.workdir import layout


def learning_config(data_dir: str, epochs: int, learning_rate=None, reward="preservation"):
  config = shapes_config.get_config("rl")
  config.model.stages_dir = layout.SHIPPED_EDITOR_DIR
  config.data.data_dir = data_dir
  config.data.train_size, config.data.validation_size, config.data.test_size = 4, 2, 2
  config.data.num_threads = 1
  config.reward.clip_weight = 0.0
  config.ppo.kl_weight = 0.0  # the rewards' own learning, measured without the default's KL
  config.train.eval_every = 0  # the training reward is the measure here
  config.reward.extra = ml_collections.ConfigDict()
  if reward == "preservation":
    config.reward.attention_weight = 0.0
    config.reward.extra = ml_collections.ConfigDict({"preservation": 1.0})
  else:
    config.reward.attention_weight = 1.0
    config.ppo.attention_pathwise_weight = 1.0
  config.train.num_epochs = epochs
  config.train.sample_batch_size = 16
  config.train.samples_per_prompt = 4
  config.train.num_sample_batches = 1
  config.train.train_batch_size = 8
  config.train.checkpoint_every = epochs
  config.train.image_every = 10 * epochs
  if learning_rate is not None:  # None: the default's
    config.ppo.learning_rate = learning_rate
  return config


def reward_curves(root, reward: str, epochs: int):
  curves = {}
  for name, learning_rate in (("rl", None), ("control", 1e-12)):
    config = learning_config(str(root / "data"), epochs, learning_rate, reward)
    workdir = str(root / name)
    setup = run_setup.rl_setup_from_config(config, workdir)
    iterator = run_setup.make_train_iterator(config, workdir, setup.tokenizer)
    metrics = trainer.train(config, workdir, setup, iterator)
    curves[name] = np.asarray([m[f"reward_{reward}"] for m in metrics])
  return curves


def check_rise(curves, epochs):
  rl, control = curves["rl"], curves["control"]
  assert rl.shape == control.shape == (epochs,)
  # Epoch 0 samples from the initial policy in both runs: identical rewards.
  np.testing.assert_allclose(rl[0], control[0], rtol=1e-5)
  gain = rl[-2:].mean() - control[-2:].mean()
  spread = np.std(control)  # how much the reward moves by sampling alone
  assert gain > 2 * spread and gain > 0, (rl, control)
  assert rl[-2:].mean() > rl[:2].mean(), rl


# The preservation reward's case (8 epochs, the previous shipped editor: -0.0446 -> -0.032 against
# a control at -0.045 +- 0.002) no longer learns on the editor shipped on 2026-12-02, which
# already preserves far more (start -0.0305; gain over the control -0.0006 against 2 x its spread
# 0.002). It ran as a non-strict xfail, 495 s of CI that could not fail, and is no longer run:
# `learning_config(..., reward="preservation")` and `check_rise` still give it to whoever finds a
# recipe that learns it (the RL-recipe issue owns that).
def test_attention_reward_rises_over_the_control(tmp_path):
  check_rise(reward_curves(tmp_path, "attention", 4), 4)
