"""Stage 2: the tiny CLIP, contrastively on (image, caption) pairs of shapes scenes.

Each batch of B examples gives 2B pairs: (target image, target caption) and (source image,
source caption). The loss is CLIP's symmetric InfoNCE with a learnable logit scale
(``exp(logit_scale)``, initialised to 1/0.07 and capped at 100 as in CLIP).
"""

from __future__ import annotations

import math
import time
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rl4pix_jax.models import clip as clip_lib
from rl4pix_jax.pretrain import data as data_lib
from rl4pix_jax.pretrain import training_loop
from rl4pix_jax.workdir import stages as ckpt

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


def clip_model_config(config) -> Dict[str, Any]:
  """transformers-style CLIPConfig dict of ``config.model.text_encoder/vision_encoder``."""
  text = dict(config.model.text_encoder)
  vision = dict(config.model.vision_encoder)
  projection = text.pop("projection_dim")
  if vision.pop("projection_dim") != projection:
    raise ValueError("config.model.text_encoder.projection_dim and "
                     "config.model.vision_encoder.projection_dim must be equal.")
  return {"model_type": "clip", "projection_dim": projection,
          "logit_scale_init_value": LOGIT_SCALE_INIT,
          "text_config": dict(text, model_type="clip_text_model"),
          "vision_config": dict(vision, model_type="clip_vision_model")}


def make_clip(model_config: Dict[str, Any]):
  """(CLIPTextModel, CLIPVisionModel) with projections from a CLIPConfig dict."""
  text = clip_lib.CLIPTextModel(clip_lib.CLIPTextConfig.from_transformers(model_config))
  vision = clip_lib.CLIPVisionModel(clip_lib.CLIPVisionConfig.from_transformers(model_config))
  return text, vision


def init_clip_params(text_model, vision_model, key: jax.Array, resolution: int):
  """{"text", "vision", "logit_scale"} float32 params."""
  text_key, vision_key = jax.random.split(key)
  return {
      "text": text_model.init(text_key, jnp.zeros((1, 77), jnp.int32))["params"],
      "vision": vision_model.init(vision_key, jnp.zeros(
          (1, vision_model.config.image_size, vision_model.config.image_size, 3)))["params"],
      "logit_scale": jnp.asarray(LOGIT_SCALE_INIT, jnp.float32),
  }


def embed_pairs(text_model, vision_model, params, images: jax.Array, input_ids: jax.Array):
  """Unit text and image embeddings, each (N, P) float32; images (N, R, R, 3) in [-1, 1]."""
  text = clip_lib.clip_text_embeddings(text_model, params["text"], input_ids)
  image = clip_lib.clip_image_embeddings(vision_model, params["vision"], (images + 1.0) / 2.0)
  return text, image


def contrastive_loss(text: jax.Array, image: jax.Array, logit_scale: jax.Array) -> jax.Array:
  """Symmetric InfoNCE of matching rows of (N, P) unit embeddings; scalar float32."""
  logits = jnp.exp(jnp.minimum(logit_scale, LOGIT_SCALE_MAX)) * image @ text.T
  labels = jnp.arange(logits.shape[0])
  image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  return 0.5 * (image_to_text + text_to_image)


def pair_batch(arrays: Dict[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
  """(images (2B, R, R, 3), ids (2B, L)): targets with target captions, then sources."""
  images = np.concatenate([arrays["target"], arrays["source"]])
  ids = np.concatenate([arrays["caption_ids"], arrays["source_caption_ids"]])
  return images, ids


def make_clip_train_step(text_model, vision_model, optimizer):
  """Jitted ``(params, opt_state, (images, ids), key) -> (params, opt_state, metrics)``."""

  def loss_fn(params, images, ids):
    text, image = embed_pairs(text_model, vision_model, params, images, ids)
    return contrastive_loss(text, image, params["logit_scale"])

  def step(params, opt_state, batch, key):
    del key
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "logit_scale": jnp.exp(params["logit_scale"])}

  return jax.jit(step, donate_argnums=(0, 1))


def retrieval_accuracy(text_model, vision_model, params, images: np.ndarray, ids: np.ndarray,
                       captions) -> float:
  """Fraction of images whose most similar caption (among the batch's) is its own text.

  Captions that repeat in the batch count as correct when the retrieved one has the same
  text (a duplicate is not an error of the model).
  """
  text, image = jax.jit(lambda p, x, i: embed_pairs(text_model, vision_model, p, x, i))(
      params, images, ids)
  best = np.asarray(jnp.argmax(image @ text.T, axis=-1))
  return float(np.mean([captions[j] == captions[i] for i, j in enumerate(best)]))


def train_clip(config, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes, or skips) the CLIP stage; returns its model_config.json dict."""
  stage = "clip"
  completed = training_loop.completed_stage(workdir, stage)
  if completed is not None:
    return completed
  started = time.time()
  settings = config.pretrain.clip
  dataset_dir = data_lib.ensure_shapes_dataset(config, workdir)
  train = data_lib.load_split(dataset_dir, "train", config.resolution)
  model_config = clip_model_config(config)
  text_model, vision_model = make_clip(model_config)
  params = init_clip_params(text_model, vision_model, jax.random.PRNGKey(config.seed + 2),
                            config.resolution)
  optimizer = training_loop.stage_optimizer(settings, settings["steps"])
  opt_state = optimizer.init(params)
  train_step = make_clip_train_step(text_model, vision_model, optimizer)
  size = len(train.arrays["source"])
  make_batch = lambda step: pair_batch(data_lib.take(train.arrays, data_lib.batch_indices(
      config.seed, step, size, settings["batch_size"])))
  models = {"clip": model_config}
  metadata = {"dataset_dir": dataset_dir, "settings": dict(settings)}
  params, opt_state, metrics, manager = training_loop.run_training(
      workdir, stage, settings["steps"], params, opt_state, train_step, make_batch,
      config.seed, settings["log_every"], settings["checkpoint_every"], models, metadata)
  validation = data_lib.load_split(dataset_dir, "validation", config.resolution,
                                   max_examples=settings["batch_size"])
  images, ids = pair_batch(validation.arrays)
  captions = validation.texts["target_caption"] + validation.texts["source_caption"]
  accuracy = retrieval_accuracy(text_model, vision_model, params, images, ids, captions)
  metadata.update(validation_retrieval_accuracy=accuracy, validation_pairs=len(captions),
                  final_metrics=metrics, wall_time_s=time.time() - started)
  training_loop.finish_stage(manager, workdir, stage, settings["steps"], params, opt_state,
                             models, metadata)
  print(f"clip: validation caption retrieval {accuracy:.3f} over {len(captions)} pairs, "
        f"{metadata['wall_time_s']:.0f} s")
  return ckpt.read_model_config(workdir, stage)
