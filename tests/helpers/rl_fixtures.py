"""A tiny, fully random RL setup on 32x32 shapes edits, shared by trainer tests and subprocesses."""

import jax
import ml_collections
import jax.numpy as jnp

from configs import shapes as shapes_config
from rl4pix_jax import pipeline
from rl4pix_jax.data import loader, shapes
from rl4pix_jax.models.clip import CLIPTextConfig, CLIPVisionConfig, CLIPVisionModel
from rl4pix_jax.models.unet import UNetConfig
from rl4pix_jax.models.vae import VAEConfig
from rl4pix_jax.rl.run_setup import RLSetup
from rl4pix_jax.tokenizer import load_clip_tokenizer
from tests.helpers import tiny_models

RESOLUTION = 32
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
            eos_token_id=49407, bos_token_id=49406, pad_token_id=49407)
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
              num_hidden_layers=1, num_attention_heads=2, projection_dim=32)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32],
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
           layers_per_block=1, norm_num_groups=8, sample_size=32)


def tiny_rl_config(**overrides):
  """The shapes config shrunk to seconds per epoch; overrides are 'section.field': value."""
  config = shapes_config.get_config("rl")
  config.resolution = RESOLUTION
  config.sampler.num_steps = 3
  config.sampler.capture_size = 16
  config.train.num_epochs = 4
  config.train.sample_batch_size = 4
  config.train.samples_per_prompt = 1  # the loop's mechanics, not the default's sampling plan
  config.ppo.num_inner_epochs = 1
  config.train.num_sample_batches = 1
  config.train.train_batch_size = 2
  config.train.checkpoint_every = 1
  config.train.image_every = 2
  config.ppo.stat_min_count = 2
  # The loop's mechanics: the paper's two reward terms, no KL reference forward (the default's
  # extras and KL run in tests/launch/test_run_default.py and tests/rl/test_ppo.py).
  config.reward.extra = ml_collections.ConfigDict()
  config.ppo.kl_weight = 0.0
  config.train.eval_every = 0  # VALIDATED turns validation on, with tiny_validation_examples
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def tiny_rl_setup(seed: int = 0) -> RLSetup:
  models = pipeline.build_models(
      UNetConfig.from_diffusers(tiny_models.TINY_UNET), VAEConfig.from_diffusers(VAE),
      CLIPTextConfig.from_transformers(TEXT, projection_dim=32), shapes_config.get_config().model.scheduler)
  params = pipeline.init_params(models, jax.random.PRNGKey(seed), RESOLUTION)
  vision = CLIPVisionModel(CLIPVisionConfig.from_transformers(VISION, projection_dim=32))
  vision_params = vision.init(jax.random.PRNGKey(seed + 1),
                              jnp.zeros((1, 32, 32, 3)))["params"]
  return RLSetup(models=models, params=params, tokenizer=load_clip_tokenizer(),
                 clip_text_model=models.text_encoder, clip_vision_model=vision,
                 clip_params={"text": params.text_encoder, "vision": vision_params})


def quick_tiny_rl_setup(seed: int = 0) -> RLSetup:
  """``tiny_rl_setup``'s models with ``tiny_models.quick_random_params`` weights: seconds
  instead of flax's eager init (for tests of the loop's plumbing, not its numbers)."""
  models = pipeline.build_models(
      UNetConfig.from_diffusers(tiny_models.TINY_UNET), VAEConfig.from_diffusers(VAE),
      CLIPTextConfig.from_transformers(TEXT, projection_dim=32),
      shapes_config.get_config().model.scheduler)
  params = tiny_models.quick_random_editor_params(models, RESOLUTION, seed)
  vision = CLIPVisionModel(CLIPVisionConfig.from_transformers(VISION, projection_dim=32))
  vision_params = tiny_models.quick_random_params(
      lambda key: vision.init(key, jnp.zeros((1, 32, 32, 3)))["params"], seed + 1)
  return RLSetup(models=models, params=params, tokenizer=load_clip_tokenizer(),
                 clip_text_model=models.text_encoder, clip_vision_model=vision,
                 clip_params={"text": params.text_encoder, "vision": vision_params})


def tiny_records(count: int = 8, seed: int = 0):
  return [shapes.example_to_record(shapes.make_example(seed, i, RESOLUTION))
          for i in range(count)]


# Validation every 2 epochs of a 4-epoch run: the start, after epochs 1 and 3 (three passes).
VALIDATED = {"train.eval_every": 2}


def tiny_validation_examples(count: int = 3):
  """Held-out scenes (another generator seed than ``tiny_records``) as evaluation examples."""
  from rl4pix_jax import evaluation  # pylint: disable=import-outside-toplevel
  return evaluation.decode_examples(tiny_records(count, seed=1), RESOLUTION)


def tiny_data_iterator(config, tokenizer, records=None):
  return loader.make_edit_iterator(
      records if records is not None else tiny_records(), tokenizer,
      loader.LoaderConfig(batch_size=config.train.sample_batch_size, resolution=RESOLUTION,
                          seed=config.seed, num_threads=1))


def run_in_subprocess_main(argv):
  """``python -m tests.helpers.rl_fixtures WORKDIR EPOCHS [kill|term]@EPOCH``: a tiny run that kills
  itself (SIGKILL, or SIGTERM for a graceful stop) at the end of the given epoch."""
  import os  # pylint: disable=import-outside-toplevel
  import signal  # pylint: disable=import-outside-toplevel

  from rl4pix_jax.rl import trainer  # pylint: disable=import-outside-toplevel

  workdir, epochs = argv[1], int(argv[2])
  action, at = (argv[3].split("@") + [None])[:2] if len(argv) > 3 else (None, None)
  config = tiny_rl_config(**{"train.num_epochs": epochs, **VALIDATED})
  setup = tiny_rl_setup()

  def on_epoch_end(epoch, _):
    if action and epoch == int(at):
      os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGTERM)

  trainer.train(config, workdir, setup, tiny_data_iterator(config, setup.tokenizer),
                on_epoch_end=on_epoch_end, validation_examples=tiny_validation_examples())


if __name__ == "__main__":
  import sys  # pylint: disable=import-outside-toplevel
  run_in_subprocess_main(sys.argv)
