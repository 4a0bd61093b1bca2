"""The two core reward terms as registered rewards: ``attention`` and ``clip``.

Each reads its options from the ``c.reward`` config section (``RewardContext.config``):

  attention: ``attention_region`` ("mask": ``RewardInputs.mask`` area-averaged to the map
    side; "reference": ``RewardInputs.reference_region``), ``attention_distance``,
    ``attention_last_steps``. Value: -distance, <= 0 (see ``rewards.attention``).
  clip: ``clip_text`` ("caption": target caption ids; "instruction": the instruction ids,
    for data without captions) and ``clip_directional``. Value: a cosine in [-1, 1].
"""

from __future__ import annotations

import jax.numpy as jnp

from rl4pix_jax.rewards import attention, clip_score
from rl4pix_jax.rewards.inputs import RewardContext, RewardInputs
from rl4pix_jax.rewards.registry import register_reward

ATTENTION_REGIONS = ("mask", "reference")
CLIP_TEXTS = ("caption", "instruction")


def attention_region(inputs: RewardInputs, source: str, side: int) -> jnp.ndarray:
  """The (B, r, r) target region from the inputs, for ``attention_region`` = ``source``."""
  if source == "mask":
    inputs.require("mask", reward="attention (attention_region='mask')")
    return attention.resize_region_to_maps(inputs.mask, side)
  if source == "reference":
    inputs.require("reference_region", reward="attention (attention_region='reference')")
    return inputs.reference_region
  raise ValueError(f"attention_region={source!r} is unknown; expected one of "
                   f"{ATTENTION_REGIONS}.")


@register_reward("attention")
def attention_reward(inputs: RewardInputs, context: RewardContext) -> jnp.ndarray:
  """-distance between the counted-step mean attention map and the target region, (B,)."""
  inputs.require("attention_maps", reward="attention")
  config = context.config
  region = attention_region(inputs, config["attention_region"],
                            inputs.attention_maps.shape[-1])
  return attention.attention_map_reward(inputs.attention_maps, region,
                                        config["attention_distance"],
                                        config["attention_last_steps"])


@register_reward("clip")
def clip_reward(inputs: RewardInputs, context: RewardContext) -> jnp.ndarray:
  """CLIP image-text cosine of the edit (or the directional variant), (B,)."""
  if context.clip_text_model is None or context.clip_vision_model is None:
    raise ValueError("The clip reward needs CLIP models: pass clip_text_model and "
                     "clip_vision_model to make_reward_fn (or set c.reward.clip_weight=0).")
  if context.clip_params is None:
    raise ValueError("The clip reward needs clip_params={'text': ..., 'vision': ...}.")
  config = context.config
  text_field = {"caption": "caption_ids", "instruction": "input_ids"}.get(
      config["clip_text"])
  if text_field is None:
    raise ValueError(f"clip_text={config['clip_text']!r} is unknown; expected one of "
                     f"{CLIP_TEXTS}.")
  models = (context.clip_text_model, context.clip_vision_model,
            context.clip_params["text"], context.clip_params["vision"])
  if config["clip_directional"]:
    inputs.require("edited_images", "source_images", "caption_ids", "source_caption_ids",
                   reward="clip (clip_directional=True)")
    return clip_score.clip_directional_similarity(
        *models, inputs.edited_images, inputs.source_images, inputs.caption_ids,
        inputs.source_caption_ids)
  inputs.require("edited_images", text_field, reward="clip")
  return clip_score.clip_similarity(*models, inputs.edited_images,
                                    getattr(inputs, text_field))
