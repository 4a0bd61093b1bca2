"""The two rules the trainer and the memory plan share: which runs hold a frozen UNet
(``train_state.needs_frozen_unet``) and the train step's PPO config (``compiled.ppo_step_config``)."""

import dataclasses

from configs import shapes as shapes_config
from rl4pix_jax.rl import ppo
from rl4pix_jax.rl.compiled import ppo_step_config
from rl4pix_jax.rl.train_state import needs_frozen_unet


def test_frozen_unet_for_lora_and_for_the_kl_reference_only():
  base = ppo.PPOConfig()
  assert needs_frozen_unet(dataclasses.replace(base, trainable="lora", kl_weight=0.0))
  assert needs_frozen_unet(dataclasses.replace(base, trainable="full", kl_weight=0.5))
  assert not needs_frozen_unet(dataclasses.replace(base, trainable="full", kl_weight=0.0))


def test_pathwise_term_is_switched_off_without_an_attention_reward(caplog):
  config = shapes_config.get_config("rl")
  config.ppo.attention_pathwise_weight = 0.3
  config.reward.attention_weight = 1.0
  assert ppo_step_config(config).attention_pathwise_weight == 0.3
  config.reward.attention_weight = 0.0
  with caplog.at_level("WARNING"):
    step_config = ppo_step_config(config)
  assert step_config.attention_pathwise_weight == 0.0
  assert dataclasses.replace(step_config, attention_pathwise_weight=0.3) == \
      ppo.PPOConfig.from_config(config.ppo)  # nothing else changed
  assert "attention_pathwise_weight=0.3 is inactive" in caplog.text
