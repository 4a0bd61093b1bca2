"""CLIP rewards: image-text cosine similarity and CLIP directional similarity.

Images are preprocessed inside jit by ``models.clip.preprocess_clip_images`` (shortest side
to the tower's image size, bicubic; centre crop; OpenAI mean/std). Embeddings are the
projected, L2-normalised ``image_embeds`` / ``text_embeds``.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from rl4pix_jax.models import clip

NORM_EPSILON = 1e-8
# An image direction shorter than this (unit-norm embeddings: the edit did not move the CLIP
# embedding) scores 0 instead of the cosine of round-off noise.
MIN_DIRECTION_NORM = 1e-4


def cosine_similarity(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """a . b / max(|a| |b|, eps) over the last axis of (B, P) arrays -> (B,) float32.

  A zero vector (e.g. an edit identical to its source in the directional variant) gives 0.
  """
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return (a * b).sum(-1) / jnp.maximum(norms, NORM_EPSILON)


def clip_similarity(
    text_model: clip.CLIPTextModel,
    vision_model: clip.CLIPVisionModel,
    text_params: Any,
    vision_params: Any,
    images: jnp.ndarray,
    text_ids: jnp.ndarray,
) -> jnp.ndarray:
  """cos(E_img(images), E_txt(text_ids)), (B,) float32 in [-1, 1].

  Args:
    text_model, vision_model: CLIP towers with projections (``load_clip``).
    text_params, vision_params: their parameters.
    images: (B, H, W, 3) float in [0, 1], any size.
    text_ids: (B, L) int32 CLIP token ids (e.g. the target caption).
  """
  image_embeds = clip.clip_image_embeddings(vision_model, vision_params, images)
  text_embeds = clip.clip_text_embeddings(text_model, text_params, text_ids)
  return cosine_similarity(image_embeds, text_embeds)


def clip_directional_similarity(
    text_model: clip.CLIPTextModel,
    vision_model: clip.CLIPVisionModel,
    text_params: Any,
    vision_params: Any,
    edited_images: jnp.ndarray,
    source_images: jnp.ndarray,
    target_ids: jnp.ndarray,
    source_ids: jnp.ndarray,
) -> jnp.ndarray:
  """cos(E_img(edited) - E_img(source), E_txt(target) - E_txt(source)), (B,) float32.

  The embeddings are normalised before the differences (as InstructPix2Pix's directional
  CLIP metric). An edit whose image direction is shorter than ``MIN_DIRECTION_NORM`` (e.g.
  equal to its source) gives 0.

  Args:
    edited_images, source_images: (B, H, W, 3) float in [0, 1].
    target_ids, source_ids: (B, L) int32 ids of the target and source captions.
  """
  batch = edited_images.shape[0]
  images = jnp.concatenate([edited_images, source_images], axis=0)
  image_embeds = clip.clip_image_embeddings(vision_model, vision_params, images)
  text_embeds = clip.clip_text_embeddings(text_model, text_params,
                                          jnp.concatenate([target_ids, source_ids], axis=0))
  image_direction = image_embeds[:batch] - image_embeds[batch:]
  text_direction = text_embeds[:batch] - text_embeds[batch:]
  moved = jnp.linalg.norm(image_direction, axis=-1) >= MIN_DIRECTION_NORM
  return jnp.where(moved, cosine_similarity(image_direction, text_direction), 0.0)
