"""Writes an editor as a diffusers ``StableDiffusionInstructPix2PixPipeline`` folder.

The folder has ``model_index.json``, ``unet/`` (the given, e.g. RL-fine-tuned and LoRA-merged,
UNet), ``vae/``, ``text_encoder/`` (transformers ``CLIPTextModel``), ``tokenizer/`` and
``scheduler/`` (DDIM config), so ``StableDiffusionInstructPix2PixPipeline.from_pretrained``
loads it in PyTorch. When the editor came from a diffusers folder, its unchanged parts are
copied from there instead of re-written.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping, Optional

from rl4pix_jax import pipeline
from rl4pix_jax.models.clip import CLIPTextConfig
from rl4pix_jax.weights import diffusers_models, folders, transformers_clip

PIPELINE_CLASS = "StableDiffusionInstructPix2PixPipeline"
DIFFUSERS_VERSION = "0.42.1"
COPIED_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")
# Ours, beside model_index.json (diffusers ignores it): the run's sampler, which
# ``launch.edit --pretrained`` and ``run_loading.load_pretrained_editor`` use as defaults.
SAMPLER_FILE = "rl4pix_sampler.json"
SAMPLER_KEYS = ("num_steps", "guidance_scale", "image_guidance_scale", "eta")


def sampler_settings(sampler_config: Mapping) -> dict:
  """The exported sampler fields of a run's ``config.sampler``."""
  return {k: sampler_config[k] for k in SAMPLER_KEYS if k in sampler_config}


def read_sampler(folder: str) -> dict:
  """The ``SAMPLER_FILE`` of an exported folder, or {} (not ours, a hub id, or absent)."""
  path = os.path.join(folder, SAMPLER_FILE)
  if not os.path.isfile(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return {k: v for k, v in json.load(f).items() if k in SAMPLER_KEYS}


def _match_json_modes(folder: str) -> None:
  """Gives every file the mode of a freshly written JSON file (safetensors writes 0600)."""
  umask = os.umask(0)
  os.umask(umask)
  for root, _, names in os.walk(folder):
    for name in names:
      os.chmod(os.path.join(root, name), 0o666 & ~umask)


def model_index() -> dict:
  """The ``model_index.json`` of an InstructPix2Pix pipeline without safety checker."""
  return {
      "_class_name": PIPELINE_CLASS, "_diffusers_version": DIFFUSERS_VERSION,
      "feature_extractor": [None, None], "image_encoder": [None, None],
      "requires_safety_checker": False, "safety_checker": [None, None],
      "scheduler": ["diffusers", "DDIMScheduler"],
      "text_encoder": ["transformers", "CLIPTextModel"],
      "tokenizer": ["transformers", "CLIPTokenizer"],
      "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
  }


def clip_text_config_json(config: CLIPTextConfig) -> dict:
  """A transformers ``CLIPTextModel`` config.json dict for a Flax text tower config."""
  return {
      "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
      "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_hidden_layers,
      "num_attention_heads": config.num_attention_heads,
      "max_position_embeddings": config.max_position_embeddings,
      "hidden_act": config.hidden_act, "layer_norm_eps": config.layer_norm_eps,
      "bos_token_id": 49406, "eos_token_id": config.eos_token_id, "pad_token_id": 49407,
      "attention_dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
  }


def export_text_encoder(params: Any, config: CLIPTextConfig, folder: str) -> str:
  """Writes a transformers CLIPTextModel folder (any ``text_projection`` is left out)."""
  params = {k: v for k, v in dict(params).items() if k != "text_projection"}
  state = transformers_clip.clip_text_state_dict_from_params(params, prefix="")
  return folders.write_state_dict(state, folder, clip_text_config_json(config),
                                  weights_name=folders.TRANSFORMERS_WEIGHTS_NAME)


def _write_json(path: str, value: Mapping) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(dict(value), f, indent=2, sort_keys=True)


def export_pipeline(models: pipeline.EditorModels, params: pipeline.EditorParams,
                    tokenizer: Any, scheduler_config: Mapping, folder: str,
                    base_folder: Optional[str] = None,
                    sampler_config: Optional[Mapping] = None) -> str:
  """Writes a complete diffusers InstructPix2Pix pipeline folder.

  Args:
    models, params, tokenizer: the editor (``params.unet`` with any LoRA already merged).
    scheduler_config: the DDIM scheduler config dict (the run's).
    folder: output folder (created; existing files of the same names are replaced).
    base_folder: the diffusers folder the editor was loaded from; its VAE, text encoder,
      tokenizer and scheduler are copied unchanged. None writes them from ``params``.
    sampler_config: the run's ``config.sampler``; its steps, guidance, image guidance and
      eta are written to ``SAMPLER_FILE``.
  Returns:
    ``folder``.
  """
  os.makedirs(folder, exist_ok=True)
  diffusers_models.export_unet(params.unet, models.unet.config, os.path.join(folder, "unet"))
  if base_folder is not None:
    for part in COPIED_PARTS:
      target = os.path.join(folder, part)
      if os.path.isdir(target):
        shutil.rmtree(target)
      shutil.copytree(os.path.join(base_folder, part), target)
  else:
    diffusers_models.export_vae(params.vae, models.vae.config, os.path.join(folder, "vae"))
    export_text_encoder(params.text_encoder, models.text_encoder.config,
                        os.path.join(folder, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    scheduler = dict(scheduler_config)
    scheduler.setdefault("_class_name", "DDIMScheduler")
    scheduler.setdefault("_diffusers_version", DIFFUSERS_VERSION)
    _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), scheduler)
  _write_json(os.path.join(folder, "model_index.json"), model_index())
  if sampler_config is not None:
    _write_json(os.path.join(folder, SAMPLER_FILE), sampler_settings(sampler_config))
  _match_json_modes(folder)
  return folder
