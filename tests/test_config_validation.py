"""config_validation: each bad field is one line naming --config.<path>, the value and a fix."""

import math

import pytest

from configs import shapes
from rl4pix_jax import config_validation as cv


def _config(path=None, value=None):
  config = shapes.get_config("rl")
  if path is not None:
    *parents, name = path.split(".")
    node = config
    for part in parents:
      node = node[part]
    with node.unlocked() if hasattr(node, "unlocked") else _null():
      node[name] = value
  return config


class _null:  # pylint: disable=invalid-name
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def test_the_default_config_is_valid():
  cv.validate_run_config(_config())
  for stage in ("vae", "clip", "unet"):
    cv.validate_pretrain_config(_config(), stage)


@pytest.mark.parametrize("path,value,expected", [
    ("train.sample_batch_size", 3, "multiple of --config.train.samples_per_prompt=4"),
    ("train.sample_batch_size", 0, "integer >= 1"),
    ("train.samples_per_prompt", 0, "integer >= 1"),
    ("train.num_epochs", -1, "integer >= 1"),
    ("ppo.learning_rate", -1e-3, "must be > 0"),
    ("ppo.learning_rate", math.inf, "finite"),
    ("reward.attention_weight", math.nan, "finite"),
    ("ppo.adam_b2", 1.0, "< 1"),
    ("ppo.timestep_fraction", 0.0, "> 0"),
    ("sampler.num_steps", 0, "integer in [1, 1000]"),
    ("sampler.eta", -0.5, ">= 0"),
    ("sampler.eta", 0.0, "every DDIM step is deterministic"),
    ("resolution", 30, "multiple of 8"),
    ("ppo.objective", "nfft", "did you mean 'nft'"),
    ("ppo.nft_beta", 0.0, "> 0"),
    ("data.train_tasks", "insertion,moving", "['moving'] not among the shapes tasks"),
    ("reward.attention_distance", "kll", "did you mean 'kl'"),
    ("ppo.trainable", "lorra", "did you mean 'lora'"),
    ("ppo.lora_target_regex", "(", "not a regular expression"),
    ("reward.attention_last_steps", 11, "integer in [0, 10]"),
    ("data.train_size", 0, "integer >= 1"),
    ("train.eval_every", -1, "integer >= 0"),
    ("train.eval_examples", 0, "integer >= 1"),
    ("train.eval_split", "", "must name a split"),
    ("train.keep_best", None, "True or False"),
    ("model.attention", "flash", "must be one of auto, xla, cudnn, pallas_tpu, chunked"),
    ("model.attention", "cudn", "did you mean 'cudnn'"),
    ("model.attention_flash_min_tokens", 0, "integer >= 1"),
    ("model.attention_chunk_queries", None, "integer >= 1"),
    ("model.attention_flash_block", 64, "integer >= 128"),
    ("model.attention_flash_block", 200, "multiple of 128"),
])
def test_bad_field_is_one_line_naming_the_flag(path, value, expected):
  with pytest.raises(cv.ConfigError) as e:
    cv.validate_run_config(_config(path, value))
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"--config.{path}=")
  assert expected in message


def test_nft_samples_at_eta_zero_and_tasks_need_shapes():
  """NFT scores final latents, not steps: a deterministic sampler is allowed there."""
  config = _config("ppo.objective", "nft")
  config.sampler.eta = 0.0
  cv.validate_run_config(config)
  config = _config("data.train_tasks", "insertion")
  cv.validate_run_config(config)
  config.data.dataset = "magicbrush"
  with pytest.raises(cv.ConfigError, match="only shapes_edit records have tasks"):
    cv.validate_run_config(config)


def test_batch_sizes_against_devices_name_the_flags():
  config = _config("train.train_batch_size", 3)
  with pytest.raises(cv.ConfigError, match=r"--config\.train\.train_batch_size=3") as e:
    cv.checked_batch_arithmetic(config, batch_devices=2, process_count=1)
  assert "\n" not in str(e.value)
  assert cv.checked_batch_arithmetic(_config(), 2, 1).samples_per_epoch == 16


def test_pretrain_stage_fields():
  config = _config("pretrain.unet", dict(_config().pretrain.unet, text_dropout=1.5))
  with pytest.raises(cv.ConfigError, match=r"^--config\.pretrain\.unet\.text_dropout=1\.5"):
    cv.validate_pretrain_config(config, "unet")
