"""What a run starts from: models, parameters, tokenizer, reward CLIP and the data iterator.

Two sources of the editor, chosen by ``config.model.pretrained``:
  - a diffusers InstructPix2Pix folder or hub id (e.g. ``timbrooks/instruct-pix2pix``); the
    CLIP reward then needs ``config.reward.clip_model`` (a transformers CLIPModel folder or
    hub id, e.g. ``openai/clip-vit-large-patch14``);
  - empty (the embedded default): the tiny models trained by ``launch.pretrain`` in the
    stages folder ``config.model.stages_dir`` (default: the parent of the RL workdir), i.e.
    ``<stages>/vae``, ``<stages>/clip`` and ``<stages>/unet``; the reward uses that CLIP.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import ml_collections

from rl4pix_jax import pipeline
from rl4pix_jax.data import loader as loader_lib
from rl4pix_jax.models.clip import CLIPVisionModel
from rl4pix_jax.models.unet import UNetConfig
from rl4pix_jax.models.vae import VAEConfig
from rl4pix_jax.rl.batching import samples_per_prompt
from rl4pix_jax.tokenizer import load_clip_tokenizer
from rl4pix_jax.weights import transformers_clip
from rl4pix_jax.workdir import layout

# The end of a bad record's error in a run (the loader's ``bad_record_fix``).
BAD_RECORD_FIX = ("Fix the record and rebuild the dataset, or rerun with "
                  "--config.data.skip_bad_records=True to skip and count bad records.")


@dataclasses.dataclass
class RLSetup:
  """What the RL stage starts from.

  Attributes:
    models: the editor modules.
    params: the initial editor parameters (the UNet is the policy's starting point).
    tokenizer: the CLIP tokenizer of the text encoder.
    clip_text_model, clip_vision_model: CLIP towers with projections for the CLIP reward
      (None when the reward does not use CLIP).
    clip_params: {"text": ..., "vision": ...} or None.
  """
  models: pipeline.EditorModels
  params: pipeline.EditorParams
  tokenizer: Any
  clip_text_model: Any = None
  clip_vision_model: Any = None
  clip_params: Any = None


def _reward_clip(config: ml_collections.ConfigDict):
  """(text model, vision model, params) of ``config.reward.clip_model``, or Nones."""
  if not config.reward.clip_weight:
    return None, None, None
  source = config.reward.clip_model
  if not source:
    raise ValueError("config.reward.clip_weight > 0 with a pretrained editor needs "
                     "--config.reward.clip_model=<transformers CLIPModel folder or hub id, "
                     "e.g. openai/clip-vit-large-patch14>, or --config.reward.clip_weight=0.")
  return transformers_clip.load_clip_models(source)


def rl_setup_from_config(config: ml_collections.ConfigDict, workdir: str) -> RLSetup:
  """Builds the RL starting point described in the module docstring."""
  dtype = pipeline.compute_dtype(config.model.dtype)
  attention = pipeline.attention_config(config)
  if config.model.pretrained:
    models, params, tokenizer = pipeline.load_diffusers_editor(
        config.model.pretrained, dtype, config.model.remat, attention)
    text_model, vision_model, clip_params = _reward_clip(config)
    return RLSetup(models, params, tokenizer, text_model, vision_model, clip_params)
  # pylint: disable=import-outside-toplevel
  from rl4pix_jax.pretrain import clip_training
  from rl4pix_jax.workdir import stages
  root = layout.stages_dir(config, workdir)
  try:
    vae_params, vae_meta = stages.latest_stage_params(root, "vae")
    clip_params, clip_meta = stages.latest_stage_params(root, "clip")
    unet_params, unet_meta = stages.latest_stage_params(root, "unet")
  except stages.StageNotFoundError as e:
    where = ("--config.model.stages_dir" if not config.model.stages_dir else
             f"model.stages_dir={config.model.stages_dir!r}")
    raise stages.StageNotFoundError(
        f"The run in {workdir!r} starts from the supervised stages in {root!r} ({where}; "
        f"empty means the run folder's parent), but {e.folder!r} holds no {e.stage} checkpoint "
        f"(looked for {layout.MODEL_CONFIG_FILE} and an Orbax step there). Put the stages "
        "(vae/, clip/, unet/) there, or point model.stages_dir at the folder that holds them "
        "(in the run's config.json, or --config.model.stages_dir for launch.train).",
        e.stage, e.folder) from None
  text_model, vision_model = clip_training.make_clip(clip_meta["models"]["clip"])
  models = pipeline.build_models(
      UNetConfig.from_dict(dict(unet_meta["models"]["unet"])),
      VAEConfig.from_dict(dict(vae_meta["models"]["vae"])), text_model.config,
      config.model.scheduler, dtype, config.model.remat, attention)
  params = pipeline.EditorParams(unet=unet_params, vae=vae_params,
                                 text_encoder=clip_params["text"])
  return RLSetup(models=models, params=params, tokenizer=load_clip_tokenizer(),
                 clip_text_model=models.text_encoder,
                 clip_vision_model=CLIPVisionModel(vision_model.config, dtype=dtype),
                 clip_params={"text": clip_params["text"], "vision": clip_params["vision"]})


def prepare_dataset(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The prepared dataset folder of the run in ``workdir``; builds shapes_edit on first use
  (MagicBrush must exist). See ``workdir.datasets.ensure_dataset``."""
  from rl4pix_jax.workdir import datasets  # pylint: disable=import-outside-toplevel
  return datasets.ensure_dataset(config, layout.stages_dir(config, workdir))


def make_iterator(config: ml_collections.ConfigDict, workdir: str, tokenizer: Any,
                  split: str, batch_size: int, shuffle: bool = True,
                  num_epochs: Optional[int] = None, tasks: Sequence[str] = ()
                  ) -> loader_lib.EditBatchIterator:
  """A grain iterator over ``split`` yielding this process's share of ``batch_size``; only
  records of ``tasks`` (shapes_edit task names) when given."""
  if batch_size % jax.process_count():
    raise ValueError(f"Batch size {batch_size} is not divisible by the "
                     f"{jax.process_count()} processes.")
  source = loader_lib.open_split(prepare_dataset(config, workdir), split)
  if tasks:
    source = loader_lib.TaskSubset(source, tasks,
                                   skip_bad_records=config.data.skip_bad_records,
                                   bad_record_fix=BAD_RECORD_FIX)
  loader_config = loader_lib.LoaderConfig(
      batch_size=batch_size // jax.process_count(), resolution=config.resolution,
      seed=config.seed, shuffle=shuffle, num_epochs=num_epochs,
      max_object_tokens=config.data.max_object_tokens,
      skip_bad_records=config.data.skip_bad_records, num_threads=config.data.num_threads,
      drop_remainder=num_epochs is None, bad_record_fix=BAD_RECORD_FIX)
  return loader_lib.make_edit_iterator(source, tokenizer, loader_config,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())


def make_train_iterator(config: ml_collections.ConfigDict, workdir: str,
                        tokenizer: Any) -> loader_lib.EditBatchIterator:
  """The RL stage's iterator: shuffled, repeating, ``train.sample_batch_size /
  train.samples_per_prompt`` examples per call (the trainer repeats each example), of the
  tasks in ``data.train_tasks`` (all when empty)."""
  tasks = [t.strip() for t in config.data.train_tasks.split(",") if t.strip()]
  return make_iterator(config, workdir, tokenizer, config.data.split,
                       config.train.sample_batch_size // samples_per_prompt(config),
                       tasks=tasks)
