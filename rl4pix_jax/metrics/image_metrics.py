"""MagicBrush image-editing metrics (L1, L2, CLIP-I, DINO, CLIP-T), batched and jit-able.

Definitions, as MagicBrush's ``evaluation/image_eval.py`` (OSU-NLP-Group/MagicBrush) computes
them; every score is per (edited, ground-truth target) pair, and a setting's score is the plain
mean over its pairs:

* L1: ``torch.nn.L1Loss`` between the two images as ``ToTensor`` tensors, i.e. the mean of
  |edited - target| over all C*H*W values in [0, 1]. The edited image is first resized to the
  target's size (``PIL.Image.resize``, bicubic by default); the images are 8-bit PNG files.
* L2: ``torch.nn.MSELoss`` on the same tensors: the MEAN SQUARED error (no square root).
* CLIP-I: cosine similarity of the OpenAI CLIP ViT-B/32 image embeddings (``encode_image``:
  projected, unnormalised; cosine via scipy) of edited and target, each preprocessed by CLIP's
  own transform (Resize(224, bicubic) of the short side, CenterCrop(224), OpenAI mean/std).
* DINO: cosine similarity of DINO ViT-S/16 embeddings (torch.hub ``dino_vits16``: the CLS token
  after the final LayerNorm) of edited and target, preprocessed with Resize(256, bicubic) of the
  short side, CenterCrop(224), ImageNet mean/std.
* CLIP-T: cosine similarity of the edited image's CLIP ViT-B/32 image embedding and the text
  embedding (``encode_text`` of ``clip.tokenize(caption)``) of the target's LOCAL caption
  (``local_captions.json``: the caption of the output image of that turn). The script also
  reports the "oracle" CLIP-T of the ground-truth target itself.
* Settings: single-turn ("all_turn" in the script) scores every turn edited independently from
  the ground-truth input of that turn; multi-turn ("final_turn") edits each turn from the
  previous turn's edited output and scores only the final turn's image.

Here: images are float (B, H, W, 3) in [0, 1]; the CLIP/DINO preprocessing resamples in float
with ``jax.image.resize`` (bicubic, antialiased) instead of PIL on uint8, so embeddings differ
from the script's by resampling only. Not confirmed: the exact Pillow version (its default
``resize`` filter) the paper's numbers were produced with. CLIP tokenization here truncates
captions longer than 77 tokens where ``clip.tokenize`` would raise. To mirror the PNG files the
script reads, pass edited images through ``to_png_levels`` first.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from rl4pix_jax.models import clip
from rl4pix_jax.models import vit

MAGICBRUSH_METRICS = ("l1", "l2", "clip_i", "dino", "clip_t")
MAGICBRUSH_REFERENCE_SOURCE = ("MagicBrush paper (Zhang et al., NeurIPS 2023 Datasets and "
                               "Benchmarks), Table 2, single-turn test set")
MAGICBRUSH_REFERENCE_SETTING = "single_turn"  # the setting the reference numbers belong to
MAGICBRUSH_REFERENCE = {
    "InstructPix2Pix": dict(l1=0.1122, l2=0.0371, clip_i=0.8524, dino=0.7428, clip_t=0.2764),
    "InstructPix2Pix fine-tuned on MagicBrush": dict(l1=0.0625, l2=0.0203, clip_i=0.9332,
                                                     dino=0.8987, clip_t=0.2781),
}


def _check_pair(edited: jax.Array, target: jax.Array, what: str) -> None:
  if edited.ndim != 4 or edited.shape[-1] != 3:
    raise ValueError(f"{what}: edited images have shape {edited.shape}, expected (B, H, W, 3) "
                     "in [0, 1].")
  if edited.shape != target.shape:
    raise ValueError(f"{what}: edited {edited.shape} and target {target.shape} differ; resize "
                     "the edited images to the target's size first (resize_to, as MagicBrush "
                     "resizes the generated image to the ground truth's size).")


def to_png_levels(images: jax.Array) -> jax.Array:
  """Clips to [0, 1] and rounds to the 256 levels of an 8-bit PNG (what the script reads).

  Args:
    images: float array in [0, 1] (any shape).
  Returns:
    float32 array of the same shape, values k / 255.
  """
  return jnp.round(jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0) / 255.0


def resize_to(images: jax.Array, height: int, width: int) -> jax.Array:
  """Bicubic (antialiased) resize of (B, H, W, C) images to (B, height, width, C), float32.

  Stands in for MagicBrush's ``gen_img.resize(gt_img.size)`` (PIL bicubic on uint8).
  """
  if images.ndim != 4:
    raise ValueError(f"resize_to: images have shape {images.shape}, expected (B, H, W, C).")
  batch, _, _, channels = images.shape
  return jax.image.resize(images.astype(jnp.float32), (batch, height, width, channels),
                          method="bicubic", antialias=True)


def l1_distance(edited: jax.Array, target: jax.Array) -> jax.Array:
  """MagicBrush L1: mean |edited - target| over H, W and channels, per image.

  Args:
    edited, target: (B, H, W, 3) float in [0, 1], same shape.
  Returns:
    (B,) float32.
  """
  _check_pair(edited, target, "l1_distance")
  difference = edited.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(jnp.abs(difference), axis=(1, 2, 3))


def l2_distance(edited: jax.Array, target: jax.Array) -> jax.Array:
  """MagicBrush "L2": mean SQUARED difference over H, W and channels (MSE, no root), per image.

  Args:
    edited, target: (B, H, W, 3) float in [0, 1], same shape.
  Returns:
    (B,) float32.
  """
  _check_pair(edited, target, "l2_distance")
  difference = edited.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(jnp.square(difference), axis=(1, 2, 3))


def dino_resize_for(image_size: int) -> int:
  """DINO's short side before the centre crop for a ViT of ``image_size``: the 256/224 ratio
  of the DINO evaluation transform (256 for ViT-S/16 at 224; 37 for a 32-pixel test ViT).

  Raises:
    ValueError: ``image_size`` < 1.
  """
  if image_size < 1:
    raise ValueError(f"dino_resize_for: image_size={image_size} must be >= 1.")
  return int(round(image_size * vit.DINO_RESIZE / vit.DINO_CROP))


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """Row-wise cosine similarity of (B, D) arrays -> (B,) float32 (scipy's 1 - cosine)."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.sum(a * b, axis=-1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))


def clip_image_similarity(vision_model: clip.CLIPVisionModel, vision_params, edited: jax.Array,
                          target: jax.Array) -> jax.Array:
  """CLIP-I: cosine of the CLIP image embeddings of edited and target.

  Args:
    vision_model: ``CLIPVisionModel`` with ``projection_dim`` (CLIP ViT-B/32 for MagicBrush).
    vision_params: its params.
    edited, target: (B, H, W, 3) float in [0, 1], same shape (each is preprocessed with
      ``clip.preprocess_clip_images`` to the tower's image_size).
  Returns:
    (B,) float32 in [-1, 1].
  """
  _check_pair(edited, target, "clip_image_similarity")
  embeddings = clip.clip_image_embeddings(vision_model, vision_params,
                                          jnp.concatenate([edited, target], axis=0))
  batch = edited.shape[0]
  return cosine_similarity(embeddings[:batch], embeddings[batch:])


def clip_text_similarity(text_model: clip.CLIPTextModel, text_params,
                         vision_model: clip.CLIPVisionModel, vision_params, images: jax.Array,
                         caption_ids: jax.Array) -> jax.Array:
  """CLIP-T: cosine of each image's CLIP embedding and its caption's CLIP text embedding.

  Args:
    text_model, text_params: ``CLIPTextModel`` with ``projection_dim`` and its params.
    vision_model, vision_params: ``CLIPVisionModel`` with ``projection_dim`` and its params.
    images: (B, H, W, 3) float in [0, 1] (the edited images; the target for the oracle).
    caption_ids: (B, L) int ids of the target's local caption
      (``rl4pix_jax.tokenizer.tokenize``).
  Returns:
    (B,) float32 in [-1, 1].
  """
  if images.ndim != 4 or caption_ids.ndim != 2 or caption_ids.shape[0] != images.shape[0]:
    raise ValueError(f"clip_text_similarity: images {images.shape} and caption_ids "
                     f"{caption_ids.shape} must be (B, H, W, 3) and (B, L) with the same B.")
  image = clip.clip_image_embeddings(vision_model, vision_params, images)
  text = clip.clip_text_embeddings(text_model, text_params, caption_ids)
  return cosine_similarity(image, text)


def dino_similarity(dino_model: vit.ViTModel, dino_params, edited: jax.Array,
                    target: jax.Array, resize: int = vit.DINO_RESIZE) -> jax.Array:
  """DINO: cosine of the DINO CLS embeddings of edited and target.

  Args:
    dino_model, dino_params: a ``ViTModel`` (DINO ViT-S/16, ``load_vit``) and its params.
    edited, target: (B, H, W, 3) float in [0, 1], same shape.
    resize: short side before the center crop to the model's image_size (256 for 224).
  Returns:
    (B,) float32 in [-1, 1].
  """
  _check_pair(edited, target, "dino_similarity")
  embeddings = vit.dino_image_embeddings(dino_model, dino_params,
                                         jnp.concatenate([edited, target], axis=0), resize)
  batch = edited.shape[0]
  return cosine_similarity(embeddings[:batch], embeddings[batch:])


@struct.dataclass
class EvaluationModels:
  """The frozen embedding models of the MagicBrush metrics (a pytree: params are leaves, the
  modules are static), so ``jax.jit(magicbrush_metrics)`` works as is.

  Attributes:
    clip_text, clip_vision: CLIP towers with projections (``load_clip`` of a CLIPModel folder,
      ``openai/clip-vit-base-patch32`` for the MagicBrush protocol).
    dino: ``ViTModel`` (``load_vit`` of ``facebook/dino-vits16``).
    dino_resize: short side before DINO's crop (256 for 224; ``dino_resize_for``).
  """
  clip_text_params: Any
  clip_vision_params: Any
  dino_params: Any
  clip_text: clip.CLIPTextModel = struct.field(pytree_node=False)
  clip_vision: clip.CLIPVisionModel = struct.field(pytree_node=False)
  dino: vit.ViTModel = struct.field(pytree_node=False)
  dino_resize: int = struct.field(pytree_node=False, default=vit.DINO_RESIZE)


def magicbrush_metrics(models: EvaluationModels, edited: jax.Array, target: jax.Array,
                       caption_ids: jax.Array) -> Dict[str, jax.Array]:
  """All MagicBrush metrics of a batch (see the module docstring for the definitions).

  Args:
    models: the embedding models.
    edited: (B, H, W, 3) float in [0, 1], the edited images at the target's resolution.
    target: (B, H, W, 3) float in [0, 1], the ground-truth targets.
    caption_ids: (B, L) int ids of each target's local caption.
  Returns:
    {"l1", "l2", "clip_i", "dino", "clip_t", "clip_t_oracle"} -> (B,) float32 per example.
  """
  _check_pair(edited, target, "magicbrush_metrics")
  batch = edited.shape[0]
  both = jnp.concatenate([edited, target], axis=0)
  clip_images = clip.clip_image_embeddings(models.clip_vision, models.clip_vision_params, both)
  text = clip.clip_text_embeddings(models.clip_text, models.clip_text_params, caption_ids)
  dino = vit.dino_image_embeddings(models.dino, models.dino_params, both, models.dino_resize)
  return {
      "l1": l1_distance(edited, target),
      "l2": l2_distance(edited, target),
      "clip_i": cosine_similarity(clip_images[:batch], clip_images[batch:]),
      "dino": cosine_similarity(dino[:batch], dino[batch:]),
      "clip_t": cosine_similarity(clip_images[:batch], text),
      "clip_t_oracle": cosine_similarity(clip_images[batch:], text),
  }


def reference_markdown_rows(keys: Sequence[str] = MAGICBRUSH_METRICS, digits: int = 4,
                            reference: Mapping[str, Mapping[str, float]] = MAGICBRUSH_REFERENCE
                            ) -> list:
  """Markdown table rows of the published numbers, to print next to a run's results.

  Returns:
    one ``| name (paper) | v | v | ... |`` string per reference model, columns in ``keys``
    order ("-" where the paper gives none).
  """
  rows = []
  for name, values in reference.items():
    cells = [f"{values[k]:.{digits}f}" if k in values else "-" for k in keys]
    rows.append("| " + " | ".join([f"{name} (paper)"] + cells) + " |")
  return rows
